//! Ops that produce constants or change only the shape: Identity, Constant, ConstantOfShape,
//! Shape, Size, Reshape, Flatten, Squeeze, Unsqueeze, Dropout, Range, EyeLike.

use super::{bounded, i64_tensor, scalar_i64, to_dim};
use crate::ops::{input, norm_axis, opt_input, OpCtx, Registry};
use smelt_ir::Attr;
use smelt_tensor::{bail, dispatch, DType, Data, Element, Error, Result, Tensor};

pub(super) fn register(r: &mut Registry) {
    r.insert("Identity", identity);
    r.insert("Constant", constant);
    r.insert("ConstantOfShape", constant_of_shape);
    r.insert("Shape", shape);
    r.insert("Size", size);
    r.insert("Reshape", reshape);
    r.insert("Flatten", flatten);
    r.insert("Squeeze", squeeze);
    r.insert("Unsqueeze", unsqueeze);
    r.insert("Dropout", dropout);
    r.insert("Range", range);
    r.insert("EyeLike", eye_like);
}

fn identity(_: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![input(ins, 0)?.clone()])
}

fn constant(ctx: &OpCtx, _: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let node = ctx.node;
    let mut found = None;
    for (k, v) in &node.attrs {
        let t = match (k.as_str(), v) {
            ("value", Attr::Tensor(t)) => t.clone(),
            ("value_float", Attr::Float(f)) => Tensor::scalar(*f),
            ("value_floats", Attr::Floats(f)) => Tensor::from_vec(vec![f.len()], f.clone())?,
            ("value_int", Attr::Int(i)) => Tensor::scalar(*i),
            ("value_ints", Attr::Ints(i)) => Tensor::from_vec(vec![i.len()], i.clone())?,
            ("value_string", Attr::String(s)) => Tensor::new(
                vec![],
                Data::Str(vec![String::from_utf8_lossy(s).into_owned()]),
            )?,
            ("value_strings", Attr::Strings(s)) => Tensor::new(
                vec![s.len()],
                Data::Str(
                    s.iter()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .collect(),
                ),
            )?,
            ("sparse_value", _) => bail!(Unsupported, "sparse Constant values are not supported"),
            (
                "value" | "value_float" | "value_floats" | "value_int" | "value_ints"
                | "value_string" | "value_strings",
                _,
            ) => bail!(Invalid, "Constant attribute '{k}' has the wrong type"),
            _ => continue,
        };
        if found.is_some() {
            bail!(Invalid, "Constant must have exactly one value attribute");
        }
        found = Some(t);
    }
    match found {
        Some(t) => Ok(vec![t]),
        None => bail!(Invalid, "Constant has no value attribute"),
    }
}

fn constant_of_shape(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let dims = input(ins, 0)?.to_i64_vec()?;
    let shape = dims
        .iter()
        .map(|&d| to_dim(d, "ConstantOfShape dimension"))
        .collect::<Result<Vec<_>>>()?;
    let n = bounded(&shape)?;
    let value = match ctx.node.attr_tensor("value")? {
        Some(v) if v.numel() == 1 => v.data().clone(),
        Some(v) => bail!(
            Invalid,
            "ConstantOfShape value must hold one element, got shape {:?}",
            v.shape()
        ),
        None => Data::F32(vec![0.0]),
    };
    Ok(vec![Tensor::new(
        shape,
        value.gather(std::iter::repeat_n(0, n)),
    )?])
}

fn shape(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let r = t.rank() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let start = clamp(ctx.int("start", 0)?);
    let end = clamp(ctx.int("end", r)?);
    let dims: Vec<i64> = t.shape()[start..end.max(start)]
        .iter()
        .map(|&d| d as i64)
        .collect();
    Ok(vec![i64_tensor(vec![dims.len()], dims)?])
}

fn size(_: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![Tensor::scalar(input(ins, 0)?.numel() as i64)])
}

/// Resolves a Reshape target: 0 copies the input dim (unless `allowzero`), -1 is inferred.
pub(super) fn reshape_target(from: &[usize], spec: &[i64], allowzero: bool) -> Result<Vec<usize>> {
    let total: usize = from.iter().product();
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        out.push(match d {
            -1 => {
                if infer.replace(i).is_some() {
                    bail!(Shape, "Reshape shape {spec:?} has more than one -1");
                }
                1
            }
            0 if !allowzero => match from.get(i) {
                Some(&n) => n,
                None => bail!(
                    Shape,
                    "Reshape shape {spec:?} copies dim {i} which input {from:?} lacks"
                ),
            },
            d => to_dim(d, "Reshape dimension")?,
        });
    }
    let known = bounded(&out)?;
    if let Some(i) = infer {
        if total.checked_rem(known) != Some(0) {
            bail!(Shape, "cannot reshape {from:?} to {spec:?}");
        }
        out[i] = total / known;
    } else if known != total {
        bail!(
            Shape,
            "cannot reshape {from:?} ({total} elements) to {spec:?} ({known} elements)"
        );
    }
    Ok(out)
}

/// The output shape of a view op (Identity, Reshape, Flatten, Squeeze, Unsqueeze): ops whose
/// output is their first input's data under a new shape. The session uses it to hand the
/// input's buffer over instead of copying it when nothing else reads the input; `None` for any
/// other op.
pub fn view_shape(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Option<Result<Vec<usize>>> {
    if !ctx.node.domain.is_empty() {
        return None;
    }
    Some(match ctx.node.op_type.as_str() {
        "Identity" => input(ins, 0).map(|t| t.shape().to_vec()),
        "Reshape" => reshape_shape(ctx, ins),
        "Flatten" => flatten_shape(ctx, ins),
        "Squeeze" => squeeze_shape(ctx, ins),
        "Unsqueeze" => unsqueeze_shape(ctx, ins),
        _ => return None,
    })
}

fn reshape(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let shape = reshape_shape(ctx, ins)?;
    Ok(vec![input(ins, 0)?.clone().reshape(shape)?])
}

fn reshape_shape(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<usize>> {
    let t = input(ins, 0)?;
    let spec = match opt_input(ins, 1) {
        Some(s) => s.to_i64_vec()?,
        None => match ctx.ints("shape")? {
            Some(s) => s,
            None => bail!(Invalid, "Reshape needs a shape input"),
        },
    };
    reshape_target(t.shape(), &spec, ctx.int("allowzero", 0)? != 0)
}

fn flatten(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let shape = flatten_shape(ctx, ins)?;
    Ok(vec![input(ins, 0)?.clone().reshape(shape)?])
}

fn flatten_shape(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<usize>> {
    let t = input(ins, 0)?;
    let r = t.rank() as i64;
    let a = ctx.int("axis", 1)?;
    let a = if a < 0 { a + r } else { a };
    if !(0..=r).contains(&a) {
        bail!(Shape, "Flatten axis {a} is out of range for rank {r}");
    }
    let (outer, inner) = t.shape().split_at(a as usize);
    Ok(vec![outer.iter().product(), inner.iter().product()])
}

/// Axes from the input (opset 13+) or the attribute (before).
fn axes_arg(ctx: &OpCtx, ins: &[Option<&Tensor>], i: usize) -> Result<Option<Vec<i64>>> {
    match opt_input(ins, i) {
        Some(t) => Ok(Some(t.to_i64_vec()?)),
        None => ctx.ints("axes"),
    }
}

fn squeeze(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let shape = squeeze_shape(ctx, ins)?;
    Ok(vec![input(ins, 0)?.clone().reshape(shape)?])
}

fn squeeze_shape(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<usize>> {
    let t = input(ins, 0)?;
    let r = t.rank();
    Ok(match axes_arg(ctx, ins, 1)? {
        Some(axes) if !axes.is_empty() => {
            let mut drop = vec![false; r];
            for a in axes {
                let a = norm_axis(a, r)?;
                if t.shape()[a] != 1 {
                    bail!(
                        Shape,
                        "cannot squeeze axis {a} of size {} in shape {:?}",
                        t.shape()[a],
                        t.shape()
                    );
                }
                drop[a] = true;
            }
            t.shape()
                .iter()
                .zip(&drop)
                .filter(|(_, &d)| !d)
                .map(|(&n, _)| n)
                .collect()
        }
        _ => t.shape().iter().copied().filter(|&n| n != 1).collect(),
    })
}

fn unsqueeze(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let shape = unsqueeze_shape(ctx, ins)?;
    Ok(vec![input(ins, 0)?.clone().reshape(shape)?])
}

fn unsqueeze_shape(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<usize>> {
    let t = input(ins, 0)?;
    let Some(axes) = axes_arg(ctx, ins, 1)? else {
        bail!(Invalid, "Unsqueeze needs axes");
    };
    let r = t.rank() + axes.len();
    let mut new = vec![false; r];
    for a in axes {
        let a = norm_axis(a, r)?;
        if std::mem::replace(&mut new[a], true) {
            bail!(Invalid, "Unsqueeze axis {a} is repeated");
        }
    }
    let mut src = t.shape().iter();
    Ok(new
        .iter()
        .map(|&n| if n { 1 } else { *src.next().unwrap_or(&1) })
        .collect())
}

/// Inference-mode Dropout: the identity, plus an all-true mask when asked for.
fn dropout(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    if let Some(tm) = opt_input(ins, 2) {
        let training = scalar_i64(&tm.cast(DType::I64)?, "training_mode")? != 0;
        let ratio = match opt_input(ins, 1) {
            Some(r) => r.to_f64_vec()?.first().copied().unwrap_or(0.5),
            None => 0.5,
        };
        if training && ratio != 0.0 {
            bail!(
                Unsupported,
                "Dropout in training mode is not supported (smelt runs inference only)"
            );
        }
    }
    let mut out = vec![t.clone()];
    if ctx.node.outputs.len() > 1 {
        let mask = if ctx.opset < 10 {
            Tensor::new(t.shape().to_vec(), Data::Bool(vec![true; t.numel()]))?.cast(t.dtype())?
        } else {
            Tensor::new(t.shape().to_vec(), Data::Bool(vec![true; t.numel()]))?
        };
        out.push(mask);
    }
    Ok(out)
}

fn range(_: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (s, l, d) = (input(ins, 0)?, input(ins, 1)?, input(ins, 2)?);
    if s.dtype() != l.dtype() || s.dtype() != d.dtype() {
        bail!(Shape, "Range inputs must share a dtype");
    }
    for t in [s, l, d] {
        if t.numel() != 1 {
            bail!(
                Shape,
                "Range inputs must be scalars, got shape {:?}",
                t.shape()
            );
        }
    }
    fn go<T: Element>(s: &Tensor, l: &Tensor, d: &Tensor) -> Result<Data> {
        let (s, l, d) = (
            s.as_slice::<T>()?[0],
            l.as_slice::<T>()?[0],
            d.as_slice::<T>()?[0],
        );
        if T::DTYPE.is_float() {
            let (s, l, d) = (s.to_f64(), l.to_f64(), d.to_f64());
            let n = ((l - s) / d).ceil();
            if d == 0.0 || !n.is_finite() {
                bail!(
                    Invalid,
                    "Range with start {s}, limit {l}, delta {d} has no finite length"
                );
            }
            let n = bounded(&[n.max(0.0) as usize])?;
            Ok(T::wrap(
                (0..n).map(|i| T::from_f64(s + i as f64 * d)).collect(),
            ))
        } else {
            let (s, l, d) = (s.to_i128(), l.to_i128(), d.to_i128());
            if d == 0 {
                bail!(Invalid, "Range delta must not be zero");
            }
            let span = l - s;
            let n = if (span > 0) == (d > 0) && span != 0 {
                (span + d - d.signum()) / d
            } else {
                0
            };
            let n = bounded(&[
                usize::try_from(n).map_err(|_| Error::Limit("Range is too long".into()))?
            ])?;
            Ok(T::wrap(
                (0..n).map(|i| T::from_i128(s + i as i128 * d)).collect(),
            ))
        }
    }
    let data = dispatch!(s.data(), T, _v => go::<T>(s, l, d)?);
    let n = data.len();
    Ok(vec![Tensor::new(vec![n], data)?])
}

fn eye_like(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let [r, c] = *t.shape() else {
        bail!(
            Shape,
            "EyeLike needs a 2-D input, got shape {:?}",
            t.shape()
        );
    };
    let dtype = match ctx.node.attr_int("dtype")? {
        Some(code) => DType::from_onnx(code as i32)
            .ok_or_else(|| Error::Unsupported(format!("EyeLike dtype code {code}")))?,
        None => t.dtype(),
    };
    let k = ctx.int("k", 0)?;
    let mut out = Tensor::zeros(dtype, vec![r, c]);
    fn fill<T: Element>(v: &mut [T], r: usize, c: usize, k: i64) {
        for i in 0..r {
            let j = i as i64 + k;
            if (0..c as i64).contains(&j) {
                v[i * c + j as usize] = T::from_f64(1.0);
            }
        }
    }
    dispatch!(out.data_mut(), T, v => fill::<T>(v, r, c, k));
    Ok(vec![out])
}
