//! Gradients of elementwise ops: arithmetic with broadcasting, and activations.

use super::{f32s, reduce_to, GradRegistry};
use crate::ops::{input, OpCtx};
use smelt_tensor::{bail, Result, Tensor};

pub fn register(r: &mut GradRegistry) {
    r.insert("Add", add);
    r.insert("Sub", sub);
    r.insert("Mul", mul);
    r.insert("Div", div);
    r.insert("Pow", pow);
    r.insert("Neg", |_, i, o, d| unary(i, o, d, |_, _, g| -g));
    r.insert("Identity", |_, i, o, d| unary(i, o, d, |_, _, g| g));
    r.insert("Relu", |_, i, o, d| {
        unary(i, o, d, |x, _, g| if x > 0.0 { g } else { 0.0 })
    });
    r.insert("LeakyRelu", leaky_relu);
    r.insert("Sigmoid", |_, i, o, d| {
        unary(i, o, d, |_, y, g| g * y * (1.0 - y))
    });
    r.insert("Tanh", |_, i, o, d| {
        unary(i, o, d, |_, y, g| g * (1.0 - y * y))
    });
    r.insert("Exp", |_, i, o, d| unary(i, o, d, |_, y, g| g * y));
    r.insert("Log", |_, i, o, d| unary(i, o, d, |x, _, g| g / x));
    r.insert("Sqrt", |_, i, o, d| unary(i, o, d, |_, y, g| g * 0.5 / y));
    r.insert("Erf", |_, i, o, d| {
        unary(i, o, d, |x, _, g| {
            g * std::f32::consts::FRAC_2_SQRT_PI * (-x * x).exp()
        })
    });
    r.insert("HardSigmoid", hard_sigmoid);
    r.insert("HardSwish", |_, i, o, d| {
        unary(i, o, d, |x, _, g| {
            if x <= -3.0 {
                0.0
            } else if x >= 3.0 {
                g
            } else {
                g * (2.0 * x + 3.0) / 6.0
            }
        })
    });
    r.insert("Clip", clip);
    r.insert("Gelu", gelu);
    r.insert("Where", where_grad);
    r.insert("Cast", cast_grad);
}

type Grads = Result<Vec<Option<Tensor>>>;

/// Gradient of a one-input op from `f(x, y, dy)`, where y is its output. Other inputs
/// (Clip's bounds) get no gradient.
fn unary(
    inputs: &[Option<&Tensor>],
    outputs: &[&Tensor],
    dy: &[Option<&Tensor>],
    f: impl Fn(f32, f32, f32) -> f32,
) -> Grads {
    let x = input(inputs, 0)?;
    let mut out = vec![None; inputs.len()];
    let Some(g) = dy[0] else {
        return Ok(out);
    };
    let v: Vec<f32> = f32s(x)?
        .iter()
        .zip(f32s(outputs[0])?)
        .zip(f32s(g)?)
        .map(|((&x, &y), &g)| f(x, y, g))
        .collect();
    out[0] = Some(Tensor::from_vec(x.shape().to_vec(), v)?);
    Ok(out)
}

/// `t` broadcast to `shape`, as a flat vector.
pub(crate) fn expand(t: &Tensor, shape: &[usize]) -> Result<Vec<f32>> {
    if t.shape() == shape {
        return Ok(f32s(t)?.to_vec());
    }
    let strides = smelt_tensor::broadcast_strides(t.shape(), shape);
    let src = f32s(t)?;
    let n: usize = shape.iter().product();
    let rank = shape.len();
    let mut idx = vec![0usize; rank];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let off: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
        out.push(src[off]);
        for k in (0..rank).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Ok(out)
}

/// Gradients of a binary op: `fa(a, b, dy)` and `fb(a, b, dy)` per element of the broadcast
/// result, then summed back to each operand's shape.
fn binary(
    inputs: &[Option<&Tensor>],
    dy: &[Option<&Tensor>],
    fa: impl Fn(f32, f32, f32) -> f32,
    fb: impl Fn(f32, f32, f32) -> f32,
) -> Grads {
    let (a, b) = (input(inputs, 0)?, input(inputs, 1)?);
    let Some(g) = dy[0] else {
        return Ok(vec![None, None]);
    };
    let shape = g.shape().to_vec();
    let (av, bv, gv) = (expand(a, &shape)?, expand(b, &shape)?, f32s(g)?);
    let mk = |f: &dyn Fn(f32, f32, f32) -> f32, like: &Tensor| -> Result<Tensor> {
        let v: Vec<f32> = (0..gv.len()).map(|i| f(av[i], bv[i], gv[i])).collect();
        reduce_to(&Tensor::from_vec(shape.clone(), v)?, like.shape())
    };
    Ok(vec![Some(mk(&fa, a)?), Some(mk(&fb, b)?)])
}

fn add(_: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    binary(i, d, |_, _, g| g, |_, _, g| g)
}

fn sub(_: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    binary(i, d, |_, _, g| g, |_, _, g| -g)
}

fn mul(_: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    binary(i, d, |_, b, g| g * b, |a, _, g| g * a)
}

fn div(_: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    binary(i, d, |_, b, g| g / b, |a, b, g| -g * a / (b * b))
}

fn pow(_: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    binary(
        i,
        d,
        |a, b, g| g * b * a.powf(b - 1.0),
        |a, b, g| if a > 0.0 { g * a.powf(b) * a.ln() } else { 0.0 },
    )
}

fn leaky_relu(ctx: &OpCtx, i: &[Option<&Tensor>], o: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let alpha = ctx.float("alpha", 0.01)?;
    unary(i, o, d, |x, _, g| if x > 0.0 { g } else { alpha * g })
}

fn hard_sigmoid(ctx: &OpCtx, i: &[Option<&Tensor>], o: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let (alpha, beta) = (ctx.float("alpha", 0.2)?, ctx.float("beta", 0.5)?);
    unary(i, o, d, |x, _, g| {
        let v = alpha * x + beta;
        if v > 0.0 && v < 1.0 {
            g * alpha
        } else {
            0.0
        }
    })
}

fn clip(_: &OpCtx, i: &[Option<&Tensor>], o: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let bound = |k: usize, default: f32| -> Result<f32> {
        match i.get(k).copied().flatten() {
            Some(t) if t.numel() == 1 => Ok(f32s(t)?[0]),
            Some(_) => bail!(Shape, "Clip bounds must be scalars"),
            None => Ok(default),
        }
    };
    let (lo, hi) = (bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?);
    unary(i, o, d, |x, _, g| if x >= lo && x <= hi { g } else { 0.0 })
}

fn gelu(ctx: &OpCtx, i: &[Option<&Tensor>], o: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let tanh = ctx.string("approximate", "none")? == "tanh";
    let c = (2.0 / std::f64::consts::PI).sqrt();
    unary(i, o, d, |x, y, g| {
        let v = x as f64;
        let slope = if tanh {
            let t = (c * (v + 0.044715 * v * v * v)).tanh();
            0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * v * v)
        } else {
            // y = x * Phi(x), so Phi(x) = y / x away from 0 (where it is 1/2).
            let phi_cdf = if v.abs() > 1e-6 { y as f64 / v } else { 0.5 };
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            phi_cdf + v * pdf
        };
        (g as f64 * slope) as f32
    })
}

/// Where(c, x, y): the gradient goes to x where c holds and to y elsewhere.
fn where_grad(_: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let (c, x, y) = (input(i, 0)?, input(i, 1)?, input(i, 2)?);
    let Some(g) = d[0] else {
        return Ok(vec![None; 3]);
    };
    let shape = g.shape().to_vec();
    let strides = smelt_tensor::broadcast_strides(c.shape(), &shape);
    let cv = c.as_slice::<bool>()?;
    let gv = f32s(g)?;
    let (mut dx, mut dy) = (vec![0f32; gv.len()], vec![0f32; gv.len()]);
    let mut idx = vec![0usize; shape.len()];
    for k in 0..gv.len() {
        let off: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
        if cv[off] {
            dx[k] = gv[k];
        } else {
            dy[k] = gv[k];
        }
        for a in (0..shape.len()).rev() {
            idx[a] += 1;
            if idx[a] < shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    let back = |v: Vec<f32>, like: &Tensor| -> Result<Option<Tensor>> {
        if !like.dtype().is_float() {
            return Ok(None);
        }
        Ok(Some(reduce_to(
            &Tensor::from_vec(shape.clone(), v)?,
            like.shape(),
        )?))
    };
    Ok(vec![None, back(dx, x)?, back(dy, y)?])
}

/// A cast between float types passes the gradient through; from integers there is none.
fn cast_grad(_: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let x = input(i, 0)?;
    match d[0] {
        Some(g) if x.dtype().is_float() => Ok(vec![Some(g.cast(smelt_tensor::DType::F32)?)]),
        _ => Ok(vec![None]),
    }
}
