//! Gradients of fake quantization, for quantization-aware training.
//!
//! QuantizeLinear rounds, which has no useful derivative: the straight-through estimator
//! passes the gradient through where the value was inside the integer range and stops it
//! where it saturated. Both ops also give their scale a gradient; with a QuantizeLinear /
//! DequantizeLinear pair sharing one scale, the two sum to LSQ's step-size gradient
//! (Esser et al. 2020): `(q - zp) - x / s` inside the range, `q - zp` at its ends.

use super::{f32s, GradRegistry};
use crate::ops::quant::{int_values, quant_range, Layout};
use crate::ops::{input, opt_input, OpCtx};
use smelt_tensor::{Result, Tensor};

pub fn register(r: &mut GradRegistry) {
    r.insert("QuantizeLinear", quantize_grad);
    r.insert("DequantizeLinear", dequantize_grad);
}

type Grads = Result<Vec<Option<Tensor>>>;

/// Scale and zero-point layouts and values of a Q / DQ node over data of `shape`.
fn params(
    ctx: &OpCtx,
    shape: &[usize],
    scale: &Tensor,
    zp: Option<&Tensor>,
) -> Result<(Layout, Vec<f32>, Layout, Vec<i32>)> {
    let axis = ctx.int("axis", 1)?;
    let block = ctx.int("block_size", 0)?;
    let s_lay = Layout::new(shape, scale.shape(), axis, block)?;
    let (z_lay, zps) = match zp {
        Some(z) => (
            Layout::new(shape, z.shape(), axis, block)?,
            int_values(z, "zero point")?,
        ),
        None => (Layout::PerTensor, vec![0]),
    };
    Ok((s_lay, scale.to_f32_vec()?, z_lay, zps))
}

fn quantize_grad(
    ctx: &OpCtx,
    i: &[Option<&Tensor>],
    o: &[&Tensor],
    d: &[Option<&Tensor>],
) -> Grads {
    let (x, scale) = (input(i, 0)?, input(i, 1)?);
    let mut out = vec![None; i.len()];
    let Some(dq) = d[0] else {
        return Ok(out);
    };
    let (lo, hi) = quant_range(o[0].dtype())?;
    let (s_lay, s, z_lay, z) = params(ctx, x.shape(), scale, opt_input(i, 2))?;
    let (xv, gv) = (f32s(x)?, f32s(dq)?);
    let mut dx = vec![0f32; xv.len()];
    let mut ds = vec![0f32; s.len()];
    for (k, (&xk, &g)) in xv.iter().zip(gv).enumerate() {
        let (p, sk) = (s_lay.index(k), s[s_lay.index(k)]);
        let r = (xk / sk).round_ties_even() as i64 + z[z_lay.index(k)] as i64;
        if (lo..=hi).contains(&r) {
            dx[k] = g / sk;
            ds[p] -= g * xk / (sk * sk);
        }
    }
    out[0] = Some(Tensor::from_vec(x.shape().to_vec(), dx)?);
    out[1] = Some(Tensor::from_vec(scale.shape().to_vec(), ds)?);
    Ok(out)
}

fn dequantize_grad(
    ctx: &OpCtx,
    i: &[Option<&Tensor>],
    _: &[&Tensor],
    d: &[Option<&Tensor>],
) -> Grads {
    let (q, scale) = (input(i, 0)?, input(i, 1)?);
    let mut out = vec![None; i.len()];
    let Some(dy) = d[0] else {
        return Ok(out);
    };
    let (s_lay, s, z_lay, z) = params(ctx, q.shape(), scale, opt_input(i, 2))?;
    let (qv, gv) = (int_values(q, "DequantizeLinear input")?, f32s(dy)?);
    let mut dq = vec![0f32; qv.len()];
    let mut ds = vec![0f32; s.len()];
    for (k, (&qk, &g)) in qv.iter().zip(gv).enumerate() {
        let p = s_lay.index(k);
        dq[k] = g * s[p];
        ds[p] += g * (qk - z[z_lay.index(k)]) as f32;
    }
    out[0] = Some(Tensor::from_vec(q.shape().to_vec(), dq)?);
    out[1] = Some(Tensor::from_vec(scale.shape().to_vec(), ds)?);
    Ok(out)
}
