//! Quantization ops: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, MatMulInteger,
//! ConvInteger, QLinearMatMul, QLinearConv, and com.microsoft's MatMulIntegerToFloat.
//!
//! Float arithmetic follows the ONNX reference implementation step by step (which dtype each
//! intermediate is rounded to), so outputs match the conformance data bit for bit, ties included.
//! Integer products accumulate in i32 with wrap-around, as ONNX's int32 outputs imply.

use super::{input, norm_axis, opt_input, OpCtx, Registry};
use crate::kernels::quant::{self as kq, Q8};
use rayon::prelude::*;
use smelt_tensor::{
    bail, bf16, broadcast_shapes, broadcast_strides, checked_numel, f16, max_elements,
    BroadcastIter, DType, Data, Error, Result, Tensor,
};

pub fn register(r: &mut Registry) {
    r.insert("QuantizeLinear", quantize_linear);
    r.insert("DequantizeLinear", dequantize_linear);
    r.insert("DynamicQuantizeLinear", dynamic_quantize_linear);
    r.insert("MatMulInteger", matmul_integer);
    r.insert("ConvInteger", conv_integer);
    r.insert("QLinearMatMul", qlinear_matmul);
    r.insert("QLinearConv", qlinear_conv);
    // onnxruntime's contrib versions of the two linear ops have the same semantics.
    r.insert("com.microsoft.QuantizeLinear", quantize_linear);
    r.insert("com.microsoft.DequantizeLinear", dequantize_linear);
    r.insert(
        "com.microsoft.MatMulIntegerToFloat",
        matmul_integer_to_float,
    );
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// Names an ONNX dtype code smelt cannot hold (int4, float8, ...), for error messages.
fn onnx_type_name(code: i64) -> String {
    let known = match code {
        17 => "float8e4m3fn",
        18 => "float8e4m3fnuz",
        19 => "float8e5m2",
        20 => "float8e5m2fnuz",
        21 => "uint4",
        22 => "int4",
        23 => "float4e2m1",
        24 => "float8e8m0",
        25 => "uint2",
        26 => "int2",
        _ => "",
    };
    if known.is_empty() {
        format!("type code {code}")
    } else {
        known.to_string()
    }
}

/// The saturation range of an integer quantized type.
fn int_range(dt: DType) -> Option<(i64, i64)> {
    Some(match dt {
        DType::U8 => (0, 255),
        DType::I8 => (-128, 127),
        DType::U16 => (0, 65535),
        DType::I16 => (-32768, 32767),
        DType::U4 => (0, 15),
        DType::I4 => (-8, 7),
        DType::U2 => (0, 3),
        DType::I2 => (-2, 1),
        _ => return None,
    })
}

pub(crate) fn quant_range(dt: DType) -> Result<(i64, i64)> {
    int_range(dt).ok_or_else(|| {
        Error::Unsupported(format!(
            "quantized type {dt} (supported: uint8, int8, uint16, int16, uint4, int4, uint2, int2)"
        ))
    })
}

/// Integer values already saturated into `dt`'s range, as a tensor of that dtype.
fn int_data(dt: DType, v: Vec<i64>) -> Result<Data> {
    Ok(match dt {
        DType::U8 => Data::U8(v.into_iter().map(|x| x as u8).collect()),
        DType::I8 => Data::I8(v.into_iter().map(|x| x as i8).collect()),
        DType::U16 => Data::U16(v.into_iter().map(|x| x as u16).collect()),
        DType::I16 => Data::I16(v.into_iter().map(|x| x as i16).collect()),
        DType::I32 => Data::I32(v.into_iter().map(|x| x as i32).collect()),
        // Checked: a value outside the 4/2-bit range is an error, never a wrapped element.
        DType::U4 | DType::I4 | DType::U2 | DType::I2 => Data::from_ints(dt, &v)?,
        _ => bail!(Unsupported, "integer output type {dt}"),
    })
}

/// Float values as a tensor of float dtype `dt` (each rounded once from f64).
fn float_data(dt: DType, v: Vec<f64>) -> Result<Data> {
    Ok(match dt {
        DType::F32 => Data::F32(v.into_iter().map(|x| x as f32).collect()),
        DType::F64 => Data::F64(v),
        DType::F16 => Data::F16(v.into_iter().map(f16::from_f64).collect()),
        DType::BF16 => Data::BF16(v.into_iter().map(bf16::from_f64).collect()),
        _ => bail!(Unsupported, "float output type {dt}"),
    })
}

/// Rounds `v` to the nearest value of float type `dt`. Rounding an f64 quotient or product of
/// two `dt` values this way equals doing the operation in `dt` (f64 has more than 2p+2 bits).
fn round_to(dt: DType, v: f64) -> f64 {
    match dt {
        DType::F32 => v as f32 as f64,
        DType::F16 => f16::from_f64(v).to_f64(),
        DType::BF16 => bf16::from_f64(v).to_f64(),
        _ => v,
    }
}

/// The dtype numpy gives a binary op on two float dtypes (f16/bf16 meet at f32).
fn promote_float(a: DType, b: DType) -> DType {
    if a == b {
        a
    } else if a == DType::F64 || b == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Integer quantized values as i32 (2/4/8/16-bit and int32 inputs).
pub(crate) fn int_values(t: &Tensor, what: &str) -> Result<Vec<i32>> {
    Ok(match t.data() {
        Data::I8(v) => v.iter().map(|&x| x as i32).collect(),
        Data::U8(v) => v.iter().map(|&x| x as i32).collect(),
        Data::I16(v) => v.iter().map(|&x| x as i32).collect(),
        Data::U16(v) => v.iter().map(|&x| x as i32).collect(),
        Data::I32(v) => v.clone(),
        Data::I4(v) => v.iter().map(|&x| i32::from(x)).collect(),
        Data::U4(v) => v.iter().map(|&x| i32::from(x)).collect(),
        Data::I2(v) => v.iter().map(|&x| i32::from(x)).collect(),
        Data::U2(v) => v.iter().map(|&x| i32::from(x)).collect(),
        _ => bail!(
            Unsupported,
            "{what} has type {}; expected a 2-, 4-, 8- or 16-bit integer or int32",
            t.dtype()
        ),
    })
}

fn float_values(t: &Tensor, what: &str) -> Result<Vec<f64>> {
    if !t.dtype().is_float() {
        bail!(Shape, "{what} must be a float tensor, got {}", t.dtype());
    }
    t.to_f64_vec()
}

/// How the elements of a tensor map to quantization parameters (scale / zero point).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Layout {
    PerTensor,
    /// One parameter per index along an axis; `inner` is the product of the later dims.
    PerAxis {
        len: usize,
        inner: usize,
    },
    /// One parameter per `block` consecutive indices along an axis.
    Blocked {
        len: usize,
        inner: usize,
        block: usize,
        plen: usize,
    },
}

impl Layout {
    /// The parameter layout for `param_shape` against data of shape `shape`, following
    /// ONNX's rules: a single value is per-tensor, a 1-D tensor is per-axis, and with
    /// `block_size` the parameters have the data's rank with the axis divided into blocks.
    pub(crate) fn new(
        shape: &[usize],
        param_shape: &[usize],
        axis: i64,
        block: i64,
    ) -> Result<Layout> {
        let pn: usize = param_shape.iter().product();
        if pn == 1 {
            return Ok(Layout::PerTensor);
        }
        let ax = norm_axis(axis, shape.len())?;
        let len = *shape.get(ax).ok_or_else(|| {
            Error::Shape("per-axis quantization needs a tensor of rank > 0".into())
        })?;
        let inner: usize = shape[ax + 1..].iter().product();
        if block <= 0 {
            if param_shape.len() != 1 || param_shape[0] != len {
                bail!(
                    Shape,
                    "quantization parameter of shape {param_shape:?} does not fit data of shape \
                     {shape:?} along axis {ax} (expected a scalar or a vector of {len})"
                );
            }
            return Ok(Layout::PerAxis { len, inner });
        }
        let block = block as usize;
        let plen = len.div_ceil(block);
        let ok = param_shape.len() == shape.len()
            && param_shape
                .iter()
                .zip(shape)
                .enumerate()
                .all(|(i, (&p, &d))| if i == ax { p == plen } else { p == d });
        if !ok {
            bail!(
                Shape,
                "blocked quantization parameter of shape {param_shape:?} does not fit data of \
                 shape {shape:?} with block_size {block} on axis {ax}"
            );
        }
        Ok(Layout::Blocked {
            len,
            inner,
            block,
            plen,
        })
    }

    #[inline]
    pub(crate) fn index(&self, i: usize) -> usize {
        match *self {
            Layout::PerTensor => 0,
            Layout::PerAxis { len, inner } => (i / inner) % len,
            Layout::Blocked {
                len,
                inner,
                block,
                plen,
            } => {
                let oa = i / inner;
                let (o, a) = (oa / len, oa % len);
                (o * plen + a / block) * inner + i % inner
            }
        }
    }
}

/// A tensor's values minus its zero point broadcast to it. A 1-D zero point of length
/// `rows` on a tensor of rank >= 2 is per-row (ONNX's convention for matmul's A input).
fn minus_zero_point(
    t: &Tensor,
    zp: Option<&Tensor>,
    per_row: bool,
    what: &str,
) -> Result<Vec<i32>> {
    let mut v = int_values(t, what)?;
    let Some(zp) = zp else { return Ok(v) };
    if zp.dtype() != t.dtype() {
        bail!(
            Shape,
            "zero point of {what} has type {}, but {what} has type {}",
            zp.dtype(),
            t.dtype()
        );
    }
    let z = int_values(zp, what)?;
    if z.len() == 1 {
        let z0 = z[0];
        v.iter_mut().for_each(|x| *x = x.wrapping_sub(z0));
        return Ok(v);
    }
    let shape = t.shape();
    let mut zshape = zp.shape().to_vec();
    if per_row && zshape.len() == 1 && shape.len() >= 2 {
        zshape.push(1);
    }
    if broadcast_shapes(shape, &zshape)? != shape {
        bail!(
            Shape,
            "zero point of shape {:?} does not fit {what} of shape {shape:?}",
            zp.shape()
        );
    }
    for (x, zi) in v.iter_mut().zip(BroadcastIter::broadcast(&zshape, shape)) {
        *x = x.wrapping_sub(z[zi]);
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear

fn quantize_linear(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let scale = input(inputs, 1)?;
    let zp = opt_input(inputs, 2);
    let axis = ctx.int("axis", 1)?;
    let block = ctx.int("block_size", 0)?;
    let out_attr = ctx.int("output_dtype", 0)?;
    let precision = ctx.int("precision", 0)?;

    let attr_dt = if out_attr != 0 {
        Some(DType::from_onnx(out_attr as i32).ok_or_else(|| {
            Error::Unsupported(format!("output_dtype {}", onnx_type_name(out_attr)))
        })?)
    } else {
        None
    };
    let out_dt = match (zp, attr_dt) {
        (Some(z), Some(a)) if z.dtype() != a => {
            bail!(
                Invalid,
                "output_dtype {a} differs from the zero point's type {}",
                z.dtype()
            )
        }
        (Some(z), _) => z.dtype(),
        (None, Some(a)) => a,
        (None, None) => DType::U8,
    };
    let (lo, hi) = quant_range(out_dt)?;
    if !(x.dtype().is_float() || x.dtype() == DType::I32) {
        bail!(
            Shape,
            "QuantizeLinear input has type {}; expected float or int32",
            x.dtype()
        );
    }
    // The dtype x / scale is computed in: numpy's promotion, or the `precision` attribute.
    let prec = if precision != 0 {
        match DType::from_onnx(precision as i32) {
            Some(d) if d.is_float() => d,
            _ => bail!(Unsupported, "precision {}", onnx_type_name(precision)),
        }
    } else if x.dtype().is_float() {
        promote_float(x.dtype(), scale.dtype())
    } else {
        DType::F64
    };

    let shape = x.shape();
    if let Some(t) = quantize_fast(x, scale, zp, out_dt, prec)? {
        return Ok(vec![t]);
    }
    let s_lay = Layout::new(shape, scale.shape(), axis, block)?;
    let scales = float_values(scale, "y_scale")?;
    let (z_lay, zps) = match zp {
        Some(z) => (
            Layout::new(shape, z.shape(), axis, block)?,
            int_values(z, "y_zero_point")?,
        ),
        None => (Layout::PerTensor, vec![0]),
    };
    let xs = x.to_f64_vec()?;
    let (lo_f, hi_f) = (lo as f64, hi as f64);
    let q: Vec<i64> = xs
        .iter()
        .enumerate()
        .map(|(i, &xv)| {
            let r = round_to(prec, xv / scales[s_lay.index(i)]).round_ties_even();
            (r + zps[z_lay.index(i)] as f64).clamp(lo_f, hi_f) as i64
        })
        .collect();
    Ok(vec![Tensor::new(shape.to_vec(), int_data(out_dt, q)?)?])
}

fn dequantize_linear(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let scale = input(inputs, 1)?;
    let zp = opt_input(inputs, 2);
    let axis = ctx.int("axis", 1)?;
    let block = ctx.int("block_size", 0)?;
    let out_attr = ctx.int("output_dtype", 0)?;

    if !scale.dtype().is_float() {
        bail!(
            Shape,
            "x_scale must be a float tensor, got {}",
            scale.dtype()
        );
    }
    let out_dt = if out_attr != 0 {
        match DType::from_onnx(out_attr as i32) {
            Some(d) if d.is_float() => d,
            _ => bail!(Unsupported, "output_dtype {}", onnx_type_name(out_attr)),
        }
    } else {
        scale.dtype()
    };
    if let Some(t) = dequantize_fast(x, scale, zp, out_dt)? {
        return Ok(vec![t]);
    }
    let shape = x.shape();
    let s_lay = Layout::new(shape, scale.shape(), axis, block)?;
    let scales = scale.to_f64_vec()?;
    let (z_lay, zps) = match zp {
        Some(z) => {
            if z.dtype() != x.dtype() {
                bail!(
                    Shape,
                    "x_zero_point has type {}, but x has type {}",
                    z.dtype(),
                    x.dtype()
                );
            }
            (
                Layout::new(shape, z.shape(), axis, block)?,
                int_values(z, "x_zero_point")?,
            )
        }
        None => (Layout::PerTensor, vec![0]),
    };
    if out_dt == DType::F32 && scale.dtype() == DType::F32 {
        // 8-bit codes per axis or block, straight to f32 in the same arithmetic as below,
        // without widening every code to i64 and every result to f64 (for a dequantized
        // embedding table of 12M entries, 200 MB held for a moment).
        let s = scale.as_slice::<f32>()?;
        let y = |q: &mut dyn Iterator<Item = f32>| -> Vec<f32> {
            q.enumerate()
                .map(|(i, q)| (q - zps[z_lay.index(i)] as f32) * s[s_lay.index(i)])
                .collect()
        };
        let y = match x.data() {
            Data::U8(v) => Some(y(&mut v.iter().map(|&q| q as f32))),
            Data::I8(v) => Some(y(&mut v.iter().map(|&q| q as f32))),
            _ => None,
        };
        if let Some(y) = y {
            return Ok(vec![Tensor::from_vec(shape.to_vec(), y)?]);
        }
    }
    // The reference works in float32: (float(x) - zp) * scale, then casts to the output type.
    // Only an int32 zero point widens the difference to float64, as numpy would.
    let xv = int_values(x, "DequantizeLinear input")?;
    let wide = x.dtype() == DType::I32 && zp.is_some();
    let y: Vec<f64> = xv
        .iter()
        .enumerate()
        .map(|(i, &q)| {
            let s = scales[s_lay.index(i)];
            let z = zps[z_lay.index(i)];
            if wide {
                ((q as f32 as f64) - z as f64) * s
            } else {
                ((q as f32 - z as f32) * s as f32) as f64
            }
        })
        .collect();
    Ok(vec![Tensor::new(shape.to_vec(), float_data(out_dt, y)?)?])
}

/// The common case, f32 to 8 bits with one scale and zero point, without the generic path's
/// f64 round trip. `None` when the case does not apply.
fn quantize_fast(
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    out_dt: DType,
    prec: DType,
) -> Result<Option<Tensor>> {
    if x.dtype() != DType::F32 || prec != DType::F32 || scale.numel() != 1 {
        return Ok(None);
    }
    let s = scale.to_f32_vec()?[0];
    let xs = x.as_slice::<f32>()?;
    let shape = x.shape().to_vec();
    Ok(Some(match (out_dt, zp.map(|z| z.data())) {
        (DType::U8, None) => quantized::<u8>(xs, s, 0, shape)?,
        (DType::U8, Some(Data::U8(z))) if z.len() == 1 => quantized(xs, s, z[0], shape)?,
        (DType::I8, None) => quantized::<i8>(xs, s, 0, shape)?,
        (DType::I8, Some(Data::I8(z))) if z.len() == 1 => quantized(xs, s, z[0], shape)?,
        _ => return Ok(None),
    }))
}

fn quantized<T: Q8 + smelt_tensor::Element>(
    xs: &[f32],
    s: f32,
    z: T,
    shape: Vec<usize>,
) -> Result<Tensor> {
    let mut q = vec![T::default(); xs.len()];
    kq::quantize(xs, s, z, &mut q);
    Tensor::from_vec(shape, q)
}

/// 8 bits to f32 with one scale and zero point (see [`quantize_fast`]).
fn dequantize_fast(
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    out_dt: DType,
) -> Result<Option<Tensor>> {
    if out_dt != DType::F32 || scale.dtype() != DType::F32 || scale.numel() != 1 {
        return Ok(None);
    }
    let s = scale.to_f32_vec()?[0];
    let mut out = vec![0f32; x.numel()];
    match (x.data(), zp.map(|z| z.data())) {
        (Data::U8(q), None) => kq::dequantize(q, s, 0, &mut out),
        (Data::U8(q), Some(Data::U8(z))) if z.len() == 1 => kq::dequantize(q, s, z[0], &mut out),
        (Data::I8(q), None) => kq::dequantize(q, s, 0, &mut out),
        (Data::I8(q), Some(Data::I8(z))) if z.len() == 1 => kq::dequantize(q, s, z[0], &mut out),
        _ => return Ok(None),
    }
    Ok(Some(Tensor::from_vec(x.shape().to_vec(), out)?))
}

fn dynamic_quantize_linear(_ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    if !x.dtype().is_float() {
        bail!(
            Shape,
            "DynamicQuantizeLinear input must be float, got {}",
            x.dtype()
        );
    }
    let xs = x.to_f32_vec()?;
    let (mn, mx) = xs
        .iter()
        .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    // An all-zero input would give scale 0; ONNX defines the scale as 1 then.
    let scale = if mx == mn { 1f32 } else { (mx - mn) / 255f32 };
    let zp = (0f32 - mn / scale).clamp(0.0, 255.0).round_ties_even();
    let y: Vec<u8> = xs
        .iter()
        .map(|&v| ((v / scale).round_ties_even() + zp).clamp(0.0, 255.0) as u8)
        .collect();
    let scale_t = Tensor::scalar(scale).cast(x.dtype())?;
    Ok(vec![
        Tensor::from_vec(x.shape().to_vec(), y)?,
        scale_t,
        Tensor::scalar(zp as u8),
    ])
}

// ---------------------------------------------------------------------------------------------
// Integer matmul

/// Batched i32 matmul with numpy semantics (1-D operands promoted and squeezed, batch dims
/// broadcast). Returns the product and its shape.
fn matmul_i32(
    a: &[i32],
    ash: &[usize],
    b: &[i32],
    bsh: &[usize],
) -> Result<(Vec<i32>, Vec<usize>)> {
    if ash.is_empty() || bsh.is_empty() {
        bail!(
            Shape,
            "matmul operands must have rank >= 1, got {ash:?} and {bsh:?}"
        );
    }
    let a2: Vec<usize> = if ash.len() == 1 {
        vec![1, ash[0]]
    } else {
        ash.to_vec()
    };
    let b2: Vec<usize> = if bsh.len() == 1 {
        vec![bsh[0], 1]
    } else {
        bsh.to_vec()
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (kb, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != kb {
        bail!(Shape, "matmul inner dimensions differ: {ash:?} x {bsh:?}");
    }
    let (abatch, bbatch) = (&a2[..a2.len() - 2], &b2[..b2.len() - 2]);
    let batch = broadcast_shapes(abatch, bbatch)?;
    let mut out_shape = batch.clone();
    if ash.len() > 1 {
        out_shape.push(m);
    }
    if bsh.len() > 1 {
        out_shape.push(n);
    }
    let nb: usize = batch.iter().product();
    let total = checked_numel(&[nb, m, n], max_elements())?;
    let mut out = vec![0i32; total];
    if total == 0 {
        return Ok((out, out_shape));
    }
    let a_offs: Vec<usize> = BroadcastIter::new(&batch, broadcast_strides(abatch, &batch), 0)
        .map(|o| o * m * k)
        .collect();
    let b_offs: Vec<usize> = BroadcastIter::new(&batch, broadcast_strides(bbatch, &batch), 0)
        .map(|o| o * k * n)
        .collect();
    // 8-bit operands (minus zero points) fit in i16: B is then packed as interleaved row pairs
    // so each step is two i16 products summed into i32, which compiles to `pmaddwd`.
    let fits16 = |v: &[i32]| v.iter().all(|&x| i16::try_from(x).is_ok());
    let packed = if k >= 2 && fits16(a) && fits16(b) {
        Some(pack_row_pairs(b, k, n))
    } else {
        None
    };
    let kp = k.div_ceil(2);
    // A block of up to ROWS output rows of batch `bi` starting at row `i0`: the sum of B's rows
    // weighted by A's rows, so the inner loop runs over contiguous memory, and each packed B
    // row pair loaded serves every row of the block.
    let block_fn = |bi: usize, i0: usize, rows: &mut [i32]| {
        let r = rows.len() / n;
        let arows: Vec<&[i32]> = (0..r)
            .map(|rr| &a[a_offs[bi] + (i0 + rr) * k..][..k])
            .collect();
        if let Some(bp) = &packed {
            let bmat = &bp[b_offs[bi] / (k * n) * kp * 2 * n..][..kp * 2 * n];
            let mut aps = [(0i16, 0i16); ROWS];
            for p in 0..kp {
                for (ap, arow) in aps.iter_mut().zip(&arows) {
                    let a1 = arow.get(2 * p + 1).copied().unwrap_or(0);
                    *ap = (arow[2 * p] as i16, a1 as i16);
                }
                if aps[..r].iter().all(|&ap| ap == (0, 0)) {
                    continue;
                }
                pair_axpy_rows(rows, n, &bmat[p * 2 * n..][..2 * n], &aps[..r]);
            }
            return;
        }
        let bmat = &b[b_offs[bi]..][..k * n];
        for (row, arow) in rows.chunks_exact_mut(n).zip(&arows) {
            for (kk, &av) in arow.iter().enumerate() {
                if av == 0 {
                    continue;
                }
                let brow = &bmat[kk * n..][..n];
                for (o, &bv) in row.iter_mut().zip(brow) {
                    *o = o.wrapping_add(av.wrapping_mul(bv));
                }
            }
        }
    };
    if (total as u64) * (k as u64) >= 1 << 16 {
        out.par_chunks_mut(m * n).enumerate().for_each(|(bi, mat)| {
            mat.par_chunks_mut(ROWS * n)
                .enumerate()
                .for_each(|(rb, rows)| block_fn(bi, rb * ROWS, rows))
        });
    } else {
        for (bi, mat) in out.chunks_mut(m * n).enumerate() {
            for (rb, rows) in mat.chunks_mut(ROWS * n).enumerate() {
                block_fn(bi, rb * ROWS, rows);
            }
        }
    }
    Ok((out, out_shape))
}

/// Output rows per block in the integer matmul.
const ROWS: usize = 4;

/// For each row `rr` of `rows` (`aps.len()` rows of `n`):
/// `row[j] += a0 * bpair[2j] + a1 * bpair[2j + 1]` (wrapping), with AVX2's `vpmaddwd` when
/// the CPU has it: it does exactly this pairwise i16 product-sum into i32 lanes.
fn pair_axpy_rows(rows: &mut [i32], n: usize, bpair: &[i16], aps: &[(i16, i16)]) {
    assert!(aps.len() <= ROWS && rows.len() == aps.len() * n && bpair.len() >= 2 * n);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present, and the kernel stays within `rows` and `bpair` (checked above).
        unsafe { pair_axpy_rows_avx2(rows, n, bpair, aps) };
        return;
    }
    for (row, &ap) in rows.chunks_exact_mut(n).zip(aps) {
        pair_axpy_scalar(row, bpair, ap);
    }
}

fn pair_axpy_scalar(row: &mut [i32], bpair: &[i16], (a0, a1): (i16, i16)) {
    let (a0, a1) = (a0 as i32, a1 as i32);
    for (o, bv) in row.iter_mut().zip(bpair.chunks_exact(2)) {
        let t = (a0 * bv[0] as i32).wrapping_add(a1 * bv[1] as i32);
        *o = o.wrapping_add(t);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pair_axpy_rows_avx2(rows: &mut [i32], n: usize, bpair: &[i16], aps: &[(i16, i16)]) {
    use std::arch::x86_64::*;
    let mut avs = [_mm256_setzero_si256(); ROWS];
    for (v, &(a0, a1)) in avs.iter_mut().zip(aps) {
        *v = _mm256_set1_epi32((((a1 as u16 as u32) << 16) | a0 as u16 as u32) as i32);
    }
    let mut j = 0;
    while j + 8 <= n {
        let b = _mm256_loadu_si256(bpair.as_ptr().add(2 * j) as *const __m256i);
        for (rr, av) in avs.iter().enumerate().take(aps.len()) {
            let o = rows.as_mut_ptr().add(rr * n + j) as *mut __m256i;
            _mm256_storeu_si256(
                o,
                _mm256_add_epi32(_mm256_loadu_si256(o), _mm256_madd_epi16(b, *av)),
            );
        }
        j += 8;
    }
    for (row, &ap) in rows.chunks_exact_mut(n).zip(aps) {
        pair_axpy_scalar(&mut row[j..], &bpair[2 * j..], ap);
    }
}

/// Packs each [k, n] matrix of `b` as ceil(k/2) rows of n interleaved pairs
/// (b[2p][j], b[2p+1][j]), the second zero when k is odd. Values must fit in i16.
fn pack_row_pairs(b: &[i32], k: usize, n: usize) -> Vec<i16> {
    let kp = k.div_ceil(2);
    let mats = b.len().checked_div(k * n).unwrap_or(0);
    let mut out = vec![0i16; mats * kp * 2 * n];
    for (src, dst) in b.chunks_exact(k * n).zip(out.chunks_exact_mut(kp * 2 * n)) {
        for kk in 0..k {
            let (p, half) = (kk / 2, kk % 2);
            for j in 0..n {
                dst[p * 2 * n + 2 * j + half] = src[kk * n + j] as i16;
            }
        }
    }
    out
}

fn matmul_integer(_ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = input(inputs, 0)?;
    let b = input(inputs, 1)?;
    check_8bit(a, "A")?;
    check_8bit(b, "B")?;
    let av = minus_zero_point(a, opt_input(inputs, 2), true, "A")?;
    let bv = minus_zero_point(b, opt_input(inputs, 3), false, "B")?;
    let (y, shape) = matmul_i32(&av, a.shape(), &bv, b.shape())?;
    Ok(vec![Tensor::from_vec(shape, y)?])
}

fn check_8bit(t: &Tensor, what: &str) -> Result<()> {
    if !matches!(t.dtype(), DType::U8 | DType::I8) {
        bail!(Shape, "{what} must be uint8 or int8, got {}", t.dtype());
    }
    Ok(())
}

/// Per-row (of A) and per-column (of B) scale vectors for a matmul output, each either one
/// value or one per row/column.
fn row_col_scales(t: &Tensor, len: usize, what: &str) -> Result<Vec<f64>> {
    let v = float_values(t, what)?;
    if v.len() != 1 && v.len() != len {
        bail!(
            Shape,
            "{what} of shape {:?} must be a scalar or have {len} elements",
            t.shape()
        );
    }
    Ok(v)
}

/// Rows (m) and columns (n) of a matmul output of `shape` given the operands' ranks.
fn out_rows_cols(shape: &[usize], a_rank: usize, b_rank: usize) -> (usize, usize) {
    let r = shape.len();
    let n = if b_rank > 1 { shape[r - 1] } else { 1 };
    let m = if a_rank > 1 {
        shape[r - 1 - usize::from(b_rank > 1)]
    } else {
        1
    };
    (m, n)
}

fn qlinear_matmul(_ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = input(inputs, 0)?;
    let a_scale = input(inputs, 1)?;
    let b = input(inputs, 3)?;
    let b_scale = input(inputs, 4)?;
    let y_scale = input(inputs, 6)?;
    let y_zp = opt_input(inputs, 7);
    check_8bit(a, "a")?;
    check_8bit(b, "b")?;
    let av = minus_zero_point(a, opt_input(inputs, 2), true, "a")?;
    let bv = minus_zero_point(b, opt_input(inputs, 5), false, "b")?;
    let (acc, shape) = matmul_i32(&av, a.shape(), &bv, b.shape())?;
    let (m, n) = out_rows_cols(&shape, a.rank(), b.rank());

    let out_dt = y_zp.map_or(a.dtype(), |z| z.dtype());
    let (lo, hi) = quant_range(out_dt)?;
    let sdt = a_scale.dtype();
    let sa = row_col_scales(a_scale, m, "a_scale")?;
    let sb = row_col_scales(b_scale, n, "b_scale")?;
    let sy = row_col_scales(y_scale, 1, "y_scale")?[0];
    let zy = match y_zp {
        Some(z) => *int_values(z, "y_zero_point")?
            .first()
            .ok_or_else(|| Error::Shape("y_zero_point is empty".into()))?,
        None => 0,
    };
    // The multiplier a_scale * b_scale / y_scale is formed in the scales' dtype, then applied
    // to the int32 accumulator in float64 (numpy's int32 x float promotion).
    let mult: Vec<f64> = (0..m * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            let ab = round_to(
                sdt,
                sa[if sa.len() == 1 { 0 } else { r }] * sb[if sb.len() == 1 { 0 } else { c }],
            );
            round_to(sdt, ab / sy)
        })
        .collect();
    let y: Vec<i64> = acc
        .iter()
        .enumerate()
        .map(|(i, &v)| requant(v, mult[i % (m * n)], zy, lo, hi))
        .collect();
    Ok(vec![Tensor::new(shape, int_data(out_dt, y)?)?])
}

/// rint(acc * mult + zp), saturated.
#[inline]
fn requant(acc: i32, mult: f64, zp: i32, lo: i64, hi: i64) -> i64 {
    (acc as f64 * mult + zp as f64)
        .round_ties_even()
        .clamp(lo as f64, hi as f64) as i64
}

fn matmul_integer_to_float(_ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = input(inputs, 0)?;
    let b = input(inputs, 1)?;
    let a_scale = input(inputs, 2)?;
    let b_scale = input(inputs, 3)?;
    check_8bit(a, "A")?;
    check_8bit(b, "B")?;
    let av = minus_zero_point(a, opt_input(inputs, 4), true, "A")?;
    let bv = minus_zero_point(b, opt_input(inputs, 5), false, "B")?;
    let (acc, shape) = matmul_i32(&av, a.shape(), &bv, b.shape())?;
    let (_, n) = out_rows_cols(&shape, a.rank(), b.rank());
    let sa = row_col_scales(a_scale, 1, "a_scale")?[0] as f32;
    let sb = row_col_scales(b_scale, n, "b_scale")?;
    let bias = match opt_input(inputs, 6) {
        Some(t) => {
            let v = t.to_f32_vec()?;
            if v.len() != n {
                bail!(
                    Shape,
                    "bias of shape {:?} must have {n} elements",
                    t.shape()
                );
            }
            Some(v)
        }
        None => None,
    };
    let y: Vec<f64> = acc
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = if n == 0 { 0 } else { i % n };
            let s = sa * sb[if sb.len() == 1 { 0 } else { c }] as f32;
            let mut r = v as f32 * s;
            if let Some(bias) = &bias {
                r += bias[c];
            }
            r as f64
        })
        .collect();
    Ok(vec![Tensor::new(shape, float_data(a_scale.dtype(), y)?)?])
}

// ---------------------------------------------------------------------------------------------
// Integer convolution

/// Convolution geometry from the node's attributes and the input/weight shapes.
struct ConvGeom {
    batch: usize,
    in_ch: usize,
    out_ch: usize,
    group: usize,
    in_sp: Vec<usize>,
    k_sp: Vec<usize>,
    out_sp: Vec<usize>,
    strides: Vec<usize>,
    dils: Vec<usize>,
    pad_begin: Vec<usize>,
}

fn attr_or(ctx: &OpCtx, key: &str, len: usize, default: usize) -> Result<Vec<usize>> {
    match ctx.ints(key)? {
        None => Ok(vec![default; len]),
        Some(v) => {
            if v.len() != len || v.iter().any(|&x| x < 0) {
                bail!(
                    Invalid,
                    "attribute {key} = {v:?} must hold {len} non-negative values"
                );
            }
            Ok(v.iter().map(|&x| x as usize).collect())
        }
    }
}

fn conv_geometry(ctx: &OpCtx, xs: &[usize], ws: &[usize]) -> Result<ConvGeom> {
    if xs.len() < 3 || ws.len() != xs.len() {
        bail!(Shape, "conv needs input [N, C, spatial...] and weights of the same rank, got {xs:?} and {ws:?}");
    }
    let nsp = xs.len() - 2;
    let group = ctx.int("group", 1)?;
    if group < 1 {
        bail!(Invalid, "group must be >= 1, got {group}");
    }
    let group = group as usize;
    let (batch, in_ch, out_ch) = (xs[0], xs[1], ws[0]);
    if in_ch % group != 0 || out_ch % group != 0 || ws[1].checked_mul(group) != Some(in_ch) {
        bail!(
            Shape,
            "conv channels do not fit: input {xs:?}, weights {ws:?}, group {group}"
        );
    }
    let in_sp = xs[2..].to_vec();
    let k_sp = match ctx.ints("kernel_shape")? {
        Some(k) => {
            let k: Vec<usize> = k.iter().map(|&v| v.max(0) as usize).collect();
            if k != ws[2..] {
                bail!(
                    Shape,
                    "kernel_shape {k:?} differs from the weights' {:?}",
                    &ws[2..]
                );
            }
            k
        }
        None => ws[2..].to_vec(),
    };
    if k_sp.contains(&0) {
        bail!(Shape, "conv kernel has an empty dimension: {k_sp:?}");
    }
    let strides = attr_or(ctx, "strides", nsp, 1)?;
    let dils = attr_or(ctx, "dilations", nsp, 1)?;
    if strides.contains(&0) || dils.contains(&0) {
        bail!(Invalid, "strides and dilations must be positive");
    }
    let auto_pad = ctx.string("auto_pad", "NOTSET")?;
    let mut pad_begin = vec![0; nsp];
    let mut out_sp = vec![0; nsp];
    let pads = attr_or(ctx, "pads", 2 * nsp, 0)?;
    for j in 0..nsp {
        let eff = (k_sp[j] - 1) * dils[j] + 1;
        match auto_pad.as_str() {
            "NOTSET" | "" => {
                pad_begin[j] = pads[j];
                let padded = in_sp[j] + pads[j] + pads[j + nsp];
                if padded < eff {
                    bail!(
                        Shape,
                        "conv kernel (extent {eff}) is larger than the padded input ({padded})"
                    );
                }
                out_sp[j] = (padded - eff) / strides[j] + 1;
            }
            "VALID" => {
                if in_sp[j] < eff {
                    bail!(
                        Shape,
                        "conv kernel (extent {eff}) is larger than the input ({})",
                        in_sp[j]
                    );
                }
                out_sp[j] = (in_sp[j] - eff) / strides[j] + 1;
            }
            "SAME_UPPER" | "SAME_LOWER" => {
                let o = in_sp[j].div_ceil(strides[j]);
                let total = ((o.max(1) - 1) * strides[j] + eff).saturating_sub(in_sp[j]);
                pad_begin[j] = if auto_pad == "SAME_UPPER" {
                    total / 2
                } else {
                    total - total / 2
                };
                out_sp[j] = o;
            }
            other => bail!(Invalid, "unknown auto_pad value {other:?}"),
        }
    }
    // Refuse outputs (and the im2col buffer) too large to allocate before allocating.
    let mut out_shape = vec![batch, out_ch];
    out_shape.extend_from_slice(&out_sp);
    checked_numel(&out_shape, max_elements())?;
    let mut col_shape = vec![ws[1]];
    col_shape.extend_from_slice(&k_sp);
    col_shape.extend_from_slice(&out_sp);
    checked_numel(&col_shape, max_elements())?;
    Ok(ConvGeom {
        batch,
        in_ch,
        out_ch,
        group,
        in_sp,
        k_sp,
        out_sp,
        strides,
        dils,
        pad_begin,
    })
}

/// Direct N-d convolution in i32 via im2col per (image, group). Padding reads 0, i.e. the
/// zero point once it has been subtracted.
fn conv_i32(g: &ConvGeom, x: &[i32], w: &[i32], bias: Option<&[i32]>) -> Vec<i32> {
    let nsp = g.in_sp.len();
    let isz: usize = g.in_sp.iter().product();
    let ksz: usize = g.k_sp.iter().product();
    let osz: usize = g.out_sp.iter().product();
    let cg = g.in_ch / g.group;
    let mg = g.out_ch / g.group;
    let rows = cg * ksz;
    let mut out = vec![0i32; g.batch * g.out_ch * osz];
    if out.is_empty() {
        return out;
    }
    let in_strides = smelt_tensor::strides_of(&g.in_sp);
    // tables[j][kj * out_j + oj]: input coordinate along dim j, or -1 when in the padding.
    let tables: Vec<Vec<isize>> = (0..nsp)
        .map(|j| {
            let mut t = Vec::with_capacity(g.k_sp[j] * g.out_sp[j]);
            for kj in 0..g.k_sp[j] {
                for oj in 0..g.out_sp[j] {
                    let c = (oj * g.strides[j] + kj * g.dils[j]) as isize - g.pad_begin[j] as isize;
                    t.push(if c >= 0 && (c as usize) < g.in_sp[j] {
                        c
                    } else {
                        -1
                    });
                }
            }
            t
        })
        .collect();
    let mut col = vec![0i32; rows * osz];
    let mut kidx = vec![0usize; nsp];
    let mut oidx = vec![0usize; nsp];
    for n in 0..g.batch {
        for grp in 0..g.group {
            for c in 0..cg {
                let xbase = (n * g.in_ch + grp * cg + c) * isz;
                for kf in 0..ksz {
                    let mut rem = kf;
                    for j in (0..nsp).rev() {
                        kidx[j] = rem % g.k_sp[j];
                        rem /= g.k_sp[j];
                    }
                    let row = &mut col[(c * ksz + kf) * osz..][..osz];
                    oidx.iter_mut().for_each(|v| *v = 0);
                    for dst in row.iter_mut() {
                        let mut off = 0usize;
                        let mut inside = true;
                        for j in 0..nsp {
                            let t = tables[j][kidx[j] * g.out_sp[j] + oidx[j]];
                            if t < 0 {
                                inside = false;
                                break;
                            }
                            off += t as usize * in_strides[j];
                        }
                        *dst = if inside { x[xbase + off] } else { 0 };
                        for j in (0..nsp).rev() {
                            oidx[j] += 1;
                            if oidx[j] < g.out_sp[j] {
                                break;
                            }
                            oidx[j] = 0;
                        }
                    }
                }
            }
            let ochunk = &mut out[(n * g.out_ch + grp * mg) * osz..][..mg * osz];
            let col = &col;
            let chan = |mi: usize, orow: &mut [i32]| {
                let m = grp * mg + mi;
                if let Some(b) = bias {
                    orow.iter_mut().for_each(|o| *o = b[m]);
                }
                let wrow = &w[m * rows..][..rows];
                for (r, &wv) in wrow.iter().enumerate() {
                    if wv == 0 {
                        continue;
                    }
                    for (o, &cv) in orow.iter_mut().zip(&col[r * osz..][..osz]) {
                        *o = o.wrapping_add(wv.wrapping_mul(cv));
                    }
                }
            };
            if (mg * rows * osz) as u64 >= 1 << 16 {
                ochunk
                    .par_chunks_mut(osz)
                    .enumerate()
                    .for_each(|(mi, r)| chan(mi, r));
            } else {
                ochunk
                    .chunks_mut(osz)
                    .enumerate()
                    .for_each(|(mi, r)| chan(mi, r));
            }
        }
    }
    out
}

fn conv_out_shape(g: &ConvGeom) -> Vec<usize> {
    let mut s = vec![g.batch, g.out_ch];
    s.extend_from_slice(&g.out_sp);
    s
}

/// Weights minus a zero point that is either one value or one per output channel.
fn weights_minus_zp(w: &Tensor, zp: Option<&Tensor>) -> Result<Vec<i32>> {
    let mut v = int_values(w, "W")?;
    let Some(zp) = zp else { return Ok(v) };
    if zp.dtype() != w.dtype() {
        bail!(
            Shape,
            "w_zero_point has type {}, but W has type {}",
            zp.dtype(),
            w.dtype()
        );
    }
    let z = int_values(zp, "w_zero_point")?;
    let m = w.shape()[0];
    let per = v.len().checked_div(m).unwrap_or(0);
    if z.len() == 1 {
        v.iter_mut().for_each(|x| *x = x.wrapping_sub(z[0]));
    } else if z.len() == m {
        for (i, x) in v.iter_mut().enumerate() {
            *x = x.wrapping_sub(z[i / per]);
        }
    } else {
        bail!(
            Shape,
            "w_zero_point of shape {:?} must be a scalar or have one value per output channel ({m})",
            zp.shape()
        );
    }
    Ok(v)
}

fn scalar_zero_point(x: &Tensor, zp: Option<&Tensor>, what: &str) -> Result<Option<Tensor>> {
    match zp {
        Some(z) if z.numel() != 1 => {
            bail!(Shape, "{what} must be a scalar, got shape {:?}", z.shape())
        }
        Some(z) if z.dtype() != x.dtype() => {
            bail!(
                Shape,
                "{what} has type {}, but its input has type {}",
                z.dtype(),
                x.dtype()
            )
        }
        Some(z) => Ok(Some(z.clone())),
        None => Ok(None),
    }
}

fn conv_integer(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let w = input(inputs, 1)?;
    check_8bit(x, "x")?;
    check_8bit(w, "w")?;
    let g = conv_geometry(ctx, x.shape(), w.shape())?;
    let xzp = scalar_zero_point(x, opt_input(inputs, 2), "x_zero_point")?;
    let xv = minus_zero_point(x, xzp.as_ref(), false, "x")?;
    let wv = weights_minus_zp(w, opt_input(inputs, 3))?;
    let y = conv_i32(&g, &xv, &wv, None);
    Ok(vec![Tensor::from_vec(conv_out_shape(&g), y)?])
}

fn qlinear_conv(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let x_scale = input(inputs, 1)?;
    let w = input(inputs, 3)?;
    let w_scale = input(inputs, 4)?;
    let y_scale = input(inputs, 6)?;
    let y_zp = opt_input(inputs, 7);
    check_8bit(x, "x")?;
    check_8bit(w, "w")?;
    let g = conv_geometry(ctx, x.shape(), w.shape())?;
    let xzp = scalar_zero_point(x, opt_input(inputs, 2), "x_zero_point")?;
    let xv = minus_zero_point(x, xzp.as_ref(), false, "x")?;
    let wv = weights_minus_zp(w, opt_input(inputs, 5))?;
    let bias = match opt_input(inputs, 8) {
        Some(b) => {
            let Data::I32(v) = b.data() else {
                bail!(Shape, "QLinearConv bias must be int32, got {}", b.dtype());
            };
            if v.len() != g.out_ch {
                bail!(
                    Shape,
                    "bias of shape {:?} must have {} elements",
                    b.shape(),
                    g.out_ch
                );
            }
            Some(v.as_slice())
        }
        None => None,
    };
    let acc = conv_i32(&g, &xv, &wv, bias);

    let out_dt = y_zp.map_or(x.dtype(), |z| z.dtype());
    let (lo, hi) = quant_range(out_dt)?;
    let sdt = x_scale.dtype();
    let sx = row_col_scales(x_scale, 1, "x_scale")?[0];
    let sw = row_col_scales(w_scale, g.out_ch, "w_scale")?;
    let sy = row_col_scales(y_scale, 1, "y_scale")?[0];
    let zy = match y_zp {
        Some(z) => {
            if z.numel() != 1 {
                bail!(
                    Shape,
                    "y_zero_point must be a scalar, got shape {:?}",
                    z.shape()
                );
            }
            int_values(z, "y_zero_point")?[0]
        }
        None => 0,
    };
    let mult: Vec<f64> = (0..g.out_ch)
        .map(|c| {
            round_to(
                sdt,
                round_to(sdt, sx * sw[if sw.len() == 1 { 0 } else { c }]) / sy,
            )
        })
        .collect();
    let osz: usize = g.out_sp.iter().product();
    let y: Vec<i64> = acc
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = (i / osz.max(1)) % g.out_ch;
            requant(v, mult[c], zy, lo, hi)
        })
        .collect();
    Ok(vec![Tensor::new(conv_out_shape(&g), int_data(out_dt, y)?)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_ir::{Attr, Node};

    fn run(
        op: crate::ops::OpFn,
        node: Node,
        opset: i64,
        inputs: &[Option<&Tensor>],
    ) -> Vec<Tensor> {
        op(&OpCtx::new(&node, opset), inputs).unwrap()
    }

    fn node(op: &str) -> Node {
        Node::new(op, "", &[], &["y"])
    }

    fn t<T: smelt_tensor::Element>(shape: &[usize], v: Vec<T>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    #[test]
    fn quantize_rounds_half_even_and_saturates() {
        // ONNX spec example, uint8 with zero point 128.
        let x = t(&[6], vec![0f32, 2.0, 3.0, 1000.0, -254.0, -1000.0]);
        let s = Tensor::scalar(2f32);
        let z = Tensor::scalar(128u8);
        let y = run(
            quantize_linear,
            node("QuantizeLinear"),
            13,
            &[Some(&x), Some(&s), Some(&z)],
        );
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[128, 129, 130, 255, 1, 0]);

        // int8: ties go to the even neighbour (0.5 -> 0, 2.5 -> 2, -1.5 -> -2), then saturate.
        let x = t(&[6], vec![1f32, 5.0, -1.0, -3.0, 300.0, -300.0]);
        let z = Tensor::scalar(0i8);
        let y = run(
            quantize_linear,
            node("QuantizeLinear"),
            13,
            &[Some(&x), Some(&s), Some(&z)],
        );
        assert_eq!(y[0].as_slice::<i8>().unwrap(), &[0, 2, 0, -2, 127, -128]);

        // No zero point: uint8 output, negatives clamp to 0.
        let x = t(&[3], vec![-4f32, 7.0, 9.0]);
        let y = run(
            quantize_linear,
            node("QuantizeLinear"),
            10,
            &[Some(&x), Some(&s)],
        );
        assert_eq!(y[0].dtype(), DType::U8);
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[0, 4, 4]);

        // output_dtype without zero point (opset 21): int16.
        let n = node("QuantizeLinear").with_attr("output_dtype", Attr::Int(5));
        let x = t(&[2], vec![-70000f32, 301.0]);
        let y = run(quantize_linear, n, 21, &[Some(&x), Some(&s)]);
        assert_eq!(y[0].as_slice::<i16>().unwrap(), &[-32768, 150]);

        // output_dtype int4 saturates to [-8, 7].
        let n = node("QuantizeLinear").with_attr("output_dtype", Attr::Int(22));
        let y = run(quantize_linear, n, 21, &[Some(&x), Some(&s)]);
        assert_eq!(y[0].dtype(), DType::I4);
        assert_eq!(y[0].to_i64_vec().unwrap(), vec![-8, 7]);

        // float8 is not representable yet.
        let n = node("QuantizeLinear").with_attr("output_dtype", Attr::Int(17));
        let err = quantize_linear(&OpCtx::new(&n, 21), &[Some(&x), Some(&s)]);
        assert!(matches!(err, Err(Error::Unsupported(_))));
    }

    fn sub(dt: DType, shape: &[usize], v: &[i64]) -> Tensor {
        Tensor::new(shape.to_vec(), Data::from_ints(dt, v).unwrap()).unwrap()
    }

    #[test]
    fn quantize_to_sub_byte_types_saturates() {
        // The ONNX suite's int4 per-axis case (zero point 1 on each row).
        let x = t(
            &[3, 4],
            vec![0f32, 2.5, 4.8, 8.6, -30., -20., 6., 9., 12., 15., 16., 40.],
        );
        let s = t(&[3], vec![2f32, 3., 4.]);
        let n = node("QuantizeLinear").with_attr("axis", Attr::Int(0));
        let z = sub(DType::I4, &[3], &[1, 1, 1]);
        let y = run(
            quantize_linear,
            n.clone(),
            21,
            &[Some(&x), Some(&s), Some(&z)],
        );
        assert_eq!(y[0].dtype(), DType::I4);
        assert_eq!(
            y[0].to_i64_vec().unwrap(),
            vec![1, 2, 3, 5, -8, -6, 3, 4, 4, 5, 5, 7]
        );
        let z = sub(DType::U4, &[3], &[1, 1, 1]);
        let y = run(quantize_linear, n, 21, &[Some(&x), Some(&s), Some(&z)]);
        assert_eq!(
            y[0].to_i64_vec().unwrap(),
            vec![1, 2, 3, 5, 0, 0, 3, 4, 4, 5, 5, 11]
        );
        // uint2 from output_dtype alone: x / 2 = [-0.5, 0.5, 2.5, 50] -> [0, 0, 2, 3].
        let n = node("QuantizeLinear").with_attr("output_dtype", Attr::Int(25));
        let x = t(&[4], vec![-1f32, 1., 5., 100.]);
        let y = run(
            quantize_linear,
            n,
            21,
            &[Some(&x), Some(&Tensor::scalar(2f32))],
        );
        assert_eq!(y[0].dtype(), DType::U2);
        assert_eq!(y[0].to_i64_vec().unwrap(), vec![0, 0, 2, 3]);
    }

    #[test]
    fn dequantize_sub_byte_per_tensor_and_blocked() {
        // The ONNX suite's int4 case: (x - 1) * 2.
        let x = sub(DType::I4, &[5], &[0, 1, 7, -4, -8]);
        let z = sub(DType::I4, &[1], &[1]);
        let y = run(
            dequantize_linear,
            node("DequantizeLinear").with_attr("axis", Attr::Int(0)),
            21,
            &[Some(&x), Some(&Tensor::scalar(2f32)), Some(&z)],
        );
        assert_eq!(y[0].as_slice::<f32>().unwrap(), &[-2., 0., 12., -10., -18.]);

        // Blocks of 2 along axis 1, a scale and zero point per block.
        let x = sub(DType::I4, &[2, 4], &[-8, 7, 1, -1, 3, 0, -2, 5]);
        let s = t(&[2, 2], vec![0.5f32, 2., 1., 0.25]);
        let z = sub(DType::I4, &[2, 2], &[1, -1, 0, 2]);
        let n = node("DequantizeLinear")
            .with_attr("axis", Attr::Int(1))
            .with_attr("block_size", Attr::Int(2));
        let y = run(dequantize_linear, n, 21, &[Some(&x), Some(&s), Some(&z)]);
        assert_eq!(
            y[0].as_slice::<f32>().unwrap(),
            &[-4.5, 3., 4., 0., 3., 0., -1., 0.75]
        );

        // A zero point of another type is refused.
        let z8 = Tensor::scalar(1i8);
        let n = node("DequantizeLinear");
        let e = dequantize_linear(
            &OpCtx::new(&n, 21),
            &[Some(&x), Some(&Tensor::scalar(1f32)), Some(&z8)],
        );
        assert!(matches!(e, Err(Error::Shape(_))));
    }

    #[test]
    fn int4_weights_move_through_layout_ops_but_not_arithmetic() {
        let op = |name: &str| crate::ops::lookup("", name).unwrap();
        let w = sub(DType::I4, &[2, 3], &[-8, 1, 2, 3, 4, 7]);
        let n = node("Transpose").with_attr("perm", Attr::Ints(vec![1, 0]));
        let tw = run(op("Transpose"), n, 21, &[Some(&w)]);
        assert_eq!(tw[0].dtype(), DType::I4);
        assert_eq!(tw[0].shape(), &[3, 2]);
        assert_eq!(tw[0].to_i64_vec().unwrap(), vec![-8, 3, 1, 4, 2, 7]);
        let shape = t(&[1], vec![6i64]);
        let r = run(
            op("Reshape"),
            node("Reshape"),
            21,
            &[Some(&tw[0]), Some(&shape)],
        );
        assert_eq!(r[0].dtype(), DType::I4);
        assert_eq!(r[0].shape(), &[6]);
        let idx = t(&[2], vec![5i64, 0]);
        let g = run(op("Gather"), node("Gather"), 21, &[Some(&r[0]), Some(&idx)]);
        assert_eq!(g[0].dtype(), DType::I4);
        assert_eq!(g[0].to_i64_vec().unwrap(), vec![7, -8]);
        let c = run(
            op("Concat"),
            node("Concat").with_attr("axis", Attr::Int(0)),
            21,
            &[Some(&g[0]), Some(&g[0])],
        );
        assert_eq!(c[0].to_i64_vec().unwrap(), vec![7, -8, 7, -8]);
        let id = run(op("Identity"), node("Identity"), 21, &[Some(&c[0])]);
        assert_eq!(id[0], c[0]);
        // Arithmetic on int4 is refused rather than silently computed in another dtype.
        let n = node("Add");
        let e = op("Add")(&OpCtx::new(&n, 21), &[Some(&w), Some(&w)]);
        assert!(e.is_err());
    }

    #[test]
    fn quantize_per_axis_matches_spec() {
        let x = t(
            &[1, 3, 3, 2],
            vec![
                -162f32, 10., -100., 232., -20., -50., -76., 0., 0., 252., 32., -44., 245., -485.,
                -960., -270., -375., -470.,
            ],
        );
        let s = t(&[3], vec![2f32, 4., 5.]);
        let z = t(&[3], vec![84u8, 24, 196]);
        let y = run(
            quantize_linear,
            node("QuantizeLinear"),
            13,
            &[Some(&x), Some(&s), Some(&z)],
        );
        assert_eq!(
            y[0].as_slice::<u8>().unwrap(),
            &[3, 89, 34, 200, 74, 59, 5, 24, 24, 87, 32, 13, 245, 99, 4, 142, 121, 102]
        );
        // And back: dequantize with the same parameters restores x exactly.
        let d = run(
            dequantize_linear,
            node("DequantizeLinear"),
            13,
            &[Some(&y[0]), Some(&s), Some(&z)],
        );
        assert_eq!(
            d[0].as_slice::<f32>().unwrap(),
            x.as_slice::<f32>().unwrap()
        );
    }

    #[test]
    fn quantize_and_dequantize_blocked() {
        // x [2, 5], blocks of 2 along axis 1 -> 3 scale columns (the last block is short).
        let x = t(&[2, 5], vec![1f32, 2., 3., 4., 5., -1., -2., -3., -4., -5.]);
        let s = t(&[2, 3], vec![1f32, 2., 4., 0.5, 1., 10.]);
        let z = t(&[2, 3], vec![0i8, 1, -1, 0, 0, 2]);
        let n = node("QuantizeLinear")
            .with_attr("axis", Attr::Int(1))
            .with_attr("block_size", Attr::Int(2));
        let y = run(quantize_linear, n, 21, &[Some(&x), Some(&s), Some(&z)]);
        // Row 0: 1/1, 2/1 | 3/2=1.5->2 +1, 4/2=2 +1 | 5/4=1.25->1 -1
        // Row 1: -1/.5, -2/.5 | -3, -4 | -5/10=-0.5->0 +2
        assert_eq!(
            y[0].as_slice::<i8>().unwrap(),
            &[1, 2, 3, 3, 0, -2, -4, -3, -4, 2]
        );
        let n = node("DequantizeLinear").with_attr("block_size", Attr::Int(2));
        let d = run(dequantize_linear, n, 21, &[Some(&y[0]), Some(&s), Some(&z)]);
        assert_eq!(
            d[0].as_slice::<f32>().unwrap(),
            &[1., 2., 4., 4., 4., -1., -2., -3., -4., 0.]
        );
        // A scale that does not tile x is rejected.
        let bad = t(&[2, 2], vec![1f32; 4]);
        let n = node("QuantizeLinear").with_attr("block_size", Attr::Int(2));
        assert!(quantize_linear(&OpCtx::new(&n, 21), &[Some(&x), Some(&bad)]).is_err());
    }

    #[test]
    fn dequantize_per_tensor_int32_and_f16() {
        let x = t(&[4], vec![0u8, 3, 128, 255]);
        let s = Tensor::scalar(2f32);
        let z = Tensor::scalar(128u8);
        let d = run(
            dequantize_linear,
            node("DequantizeLinear"),
            13,
            &[Some(&x), Some(&s), Some(&z)],
        );
        assert_eq!(d[0].as_slice::<f32>().unwrap(), &[-256., -250., 0., 254.]);

        let x = t(&[3], vec![-41i32, 0, 1 << 20]);
        let d = run(
            dequantize_linear,
            node("DequantizeLinear"),
            13,
            &[Some(&x), Some(&s)],
        );
        assert_eq!(d[0].as_slice::<f32>().unwrap(), &[-82., 0., 2097152.]);

        // Opset 19+: the output takes the scale's dtype.
        let x = t(&[2], vec![-3i8, 5]);
        let s = Tensor::scalar(f16::from_f32(0.5));
        let d = run(
            dequantize_linear,
            node("DequantizeLinear"),
            19,
            &[Some(&x), Some(&s)],
        );
        assert_eq!(d[0].dtype(), DType::F16);
        assert_eq!(d[0].to_f32_vec().unwrap(), vec![-1.5, 2.5]);

        // The zero point must have x's type.
        let z = Tensor::scalar(1u8);
        let s = Tensor::scalar(1f32);
        assert!(dequantize_linear(
            &OpCtx::new(&node("DequantizeLinear"), 13),
            &[Some(&x), Some(&s), Some(&z)]
        )
        .is_err());
    }

    #[test]
    fn dynamic_quantize_matches_spec() {
        let x = t(&[6], vec![0f32, 2., -3., -2.5, 1.34, 0.5]);
        let y = run(
            dynamic_quantize_linear,
            node("DynamicQuantizeLinear"),
            11,
            &[Some(&x)],
        );
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[153, 255, 0, 26, 221, 179]);
        let s = y[1].as_slice::<f32>().unwrap()[0];
        assert_eq!(s, 5f32 / 255f32);
        assert_eq!(y[2].as_slice::<u8>().unwrap(), &[153]);

        // All positive: min is 0, zero point 0; all zero: scale 1.
        let x = t(&[3], vec![1f32, 2.55, 0.5]);
        let y = run(
            dynamic_quantize_linear,
            node("DynamicQuantizeLinear"),
            11,
            &[Some(&x)],
        );
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[100, 255, 50]);
        assert_eq!(y[2].as_slice::<u8>().unwrap(), &[0]);
        let x = t(&[2], vec![0f32, 0.]);
        let y = run(
            dynamic_quantize_linear,
            node("DynamicQuantizeLinear"),
            11,
            &[Some(&x)],
        );
        assert_eq!(y[1].as_slice::<f32>().unwrap(), &[1.]);
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[0, 0]);
    }

    #[test]
    fn matmul_integer_with_zero_points() {
        // ONNX spec example.
        let a = t(&[4, 3], vec![11u8, 7, 3, 10, 6, 2, 9, 5, 1, 8, 4, 0]);
        let b = t(&[3, 2], vec![1u8, 4, 2, 5, 3, 6]);
        let az = Tensor::scalar(12u8);
        let bz = Tensor::scalar(0u8);
        let y = run(
            matmul_integer,
            node("MatMulInteger"),
            10,
            &[Some(&a), Some(&b), Some(&az), Some(&bz)],
        );
        assert_eq!(y[0].shape(), &[4, 2]);
        assert_eq!(
            y[0].as_slice::<i32>().unwrap(),
            &[-38, -83, -44, -98, -50, -113, -56, -128]
        );

        // Per-row A zero points and per-column B zero points, int8.
        let a = t(&[2, 2], vec![1i8, 2, 3, 4]);
        let b = t(&[2, 3], vec![1i8, 0, -1, 2, 5, 0]);
        let az = t(&[2], vec![1i8, 2]); // A - az = [[0, 1], [1, 2]]
        let bz = t(&[3], vec![1i8, 0, -1]); // B - bz = [[0, 0, 0], [1, 5, 1]]
        let y = run(
            matmul_integer,
            node("MatMulInteger"),
            10,
            &[Some(&a), Some(&b), Some(&az), Some(&bz)],
        );
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[1, 5, 1, 2, 10, 2]);

        // Batched with a broadcast B and a 1-D A.
        let a = t(&[2, 1, 2], vec![1u8, 2, 3, 4]);
        let b = t(&[2, 2], vec![1u8, 0, 0, 1]);
        let y = run(
            matmul_integer,
            node("MatMulInteger"),
            10,
            &[Some(&a), Some(&b)],
        );
        assert_eq!(y[0].shape(), &[2, 1, 2]);
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[1, 2, 3, 4]);
        let v = t(&[2], vec![2u8, 3]);
        let y = run(
            matmul_integer,
            node("MatMulInteger"),
            10,
            &[Some(&v), Some(&b)],
        );
        assert_eq!(y[0].shape(), &[2]);
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[2, 3]);
    }

    #[test]
    fn matmul_integer_large_matches_naive() {
        // Big enough to take the parallel path; odd k and n exercise the packing's padding
        // and the SIMD remainder; extreme values check that nothing saturates.
        for (m, k, n) in [(37, 70, 45), (9, 301, 19), (3, 1, 8)] {
            let a: Vec<u8> = (0..m * k)
                .map(|i| {
                    if i % 5 == 0 {
                        255
                    } else {
                        (i * 31 % 256) as u8
                    }
                })
                .collect();
            let b: Vec<i8> = (0..k * n)
                .map(|i| {
                    if i % 7 == 0 {
                        -128
                    } else {
                        (i * 17 % 256) as u8 as i8
                    }
                })
                .collect();
            let at = t(&[m, k], a.clone());
            let bt = t(&[k, n], b.clone());
            let az = Tensor::scalar(7u8);
            let y = run(
                matmul_integer,
                node("MatMulInteger"),
                10,
                &[Some(&at), Some(&bt), Some(&az)],
            );
            let got = y[0].as_slice::<i32>().unwrap();
            for i in 0..m {
                for j in 0..n {
                    let want: i32 = (0..k)
                        .map(|p| (a[i * k + p] as i32 - 7) * b[p * n + j] as i32)
                        .sum();
                    assert_eq!(got[i * n + j], want, "{m}x{k}x{n} at ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn pair_kernel_matches_scalar_reference() {
        // Whatever kernel the CPU selects must equal the plain pairwise sum, tail included.
        let n = 19;
        let bpair: Vec<i16> = (0..2 * n as i32)
            .map(|i| (i * 37 % 511 - 255) as i16)
            .collect();
        let aps = [(-255i16, 255i16), (7, -3), (0, 1)];
        let mut rows: Vec<i32> = (0..3 * n as i32).collect();
        let mut want = rows.clone();
        pair_axpy_rows(&mut rows, n, &bpair, &aps);
        for (row, &ap) in want.chunks_exact_mut(n).zip(&aps) {
            for (j, o) in row.iter_mut().enumerate() {
                *o += ap.0 as i32 * bpair[2 * j] as i32 + ap.1 as i32 * bpair[2 * j + 1] as i32;
            }
        }
        assert_eq!(rows, want);
    }

    #[test]
    fn qlinear_matmul_matches_spec() {
        let a = t(&[2, 4], vec![208u8, 236, 0, 238, 3, 214, 255, 29]);
        let b = t(
            &[4, 3],
            vec![152u8, 51, 244, 60, 26, 255, 0, 127, 246, 127, 254, 247],
        );
        let ins = [
            Tensor::scalar(0.0066f32),
            Tensor::scalar(113u8),
            Tensor::scalar(0.00705f32),
            Tensor::scalar(114u8),
            Tensor::scalar(0.0107f32),
            Tensor::scalar(118u8),
        ];
        let y = run(
            qlinear_matmul,
            node("QLinearMatMul"),
            10,
            &[
                Some(&a),
                Some(&ins[0]),
                Some(&ins[1]),
                Some(&b),
                Some(&ins[2]),
                Some(&ins[3]),
                Some(&ins[4]),
                Some(&ins[5]),
            ],
        );
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[168, 115, 255, 1, 66, 151]);
    }

    #[test]
    fn conv_integer_matches_spec() {
        let x = t(&[1, 1, 3, 3], (2u8..11).collect());
        let w = t(&[1, 1, 2, 2], vec![1u8; 4]);
        let xz = Tensor::scalar(1u8);
        let y = run(
            conv_integer,
            node("ConvInteger"),
            10,
            &[Some(&x), Some(&w), Some(&xz)],
        );
        assert_eq!(y[0].shape(), &[1, 1, 2, 2]);
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[12, 16, 24, 28]);

        let n = node("ConvInteger").with_attr("pads", Attr::Ints(vec![1, 1, 1, 1]));
        let y = run(conv_integer, n, 10, &[Some(&x), Some(&w), Some(&xz)]);
        assert_eq!(y[0].shape(), &[1, 1, 4, 4]);
        assert_eq!(
            y[0].as_slice::<i32>().unwrap(),
            &[1, 3, 5, 3, 5, 12, 16, 9, 11, 24, 28, 15, 7, 15, 17, 9]
        );

        // Strides, SAME_UPPER padding and two groups with per-channel weight zero points.
        let x = t(&[1, 2, 2, 2], vec![1i8, 2, 3, 4, 5, 6, 7, 8]);
        let w = t(&[2, 1, 1, 1], vec![3i8, -2]);
        let wz = t(&[2], vec![1i8, -1]); // effective weights [2, -1]
        let n = node("ConvInteger")
            .with_attr("group", Attr::Int(2))
            .with_attr("strides", Attr::Ints(vec![2, 2]))
            .with_attr("auto_pad", Attr::String(b"SAME_UPPER".to_vec()));
        let y = run(conv_integer, n, 10, &[Some(&x), Some(&w), None, Some(&wz)]);
        assert_eq!(y[0].shape(), &[1, 2, 1, 1]);
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[2, -5]);
    }

    #[test]
    fn qlinear_conv_requantizes_per_channel() {
        let x = t(&[1, 1, 2, 2], vec![10u8, 20, 30, 40]);
        let w = t(&[2, 1, 1, 1], vec![130u8, 120]);
        let ins = [
            Tensor::scalar(0.5f32),
            Tensor::scalar(10u8),
            t(&[2], vec![1f32, 0.25]),
            t(&[2], vec![128u8, 128]),
            Tensor::scalar(1f32),
            Tensor::scalar(4u8),
            t(&[2], vec![1i32, -2]),
        ];
        let y = run(
            qlinear_conv,
            node("QLinearConv"),
            10,
            &[
                Some(&x),
                Some(&ins[0]),
                Some(&ins[1]),
                Some(&w),
                Some(&ins[2]),
                Some(&ins[3]),
                Some(&ins[4]),
                Some(&ins[5]),
                Some(&ins[6]),
            ],
        );
        // ch0: (2 * [0,10,20,30] + 1) * 0.5 + 4 = [4.5, 14.5, 24.5, 34.5] -> ties to even.
        // ch1: (-8 * [0,10,20,30] - 2) * 0.125 + 4 = [3.75, -6.25, ...] -> saturate at 0.
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[4, 14, 24, 34, 4, 0, 0, 0]);
    }

    #[test]
    fn matmul_integer_to_float_scales_and_bias() {
        let a = t(&[1, 2], vec![3u8, 5]);
        let b = t(&[2, 2], vec![1u8, 2, 3, 4]);
        let sa = Tensor::scalar(0.5f32);
        let sb = t(&[2], vec![1f32, 2.]);
        let az = Tensor::scalar(1u8);
        let bias = t(&[2], vec![0.25f32, -1.]);
        // (A - 1) = [2, 4]; acc = [14, 20]; * [0.5, 1.0] + bias
        let y = run(
            matmul_integer_to_float,
            node("MatMulIntegerToFloat"),
            1,
            &[
                Some(&a),
                Some(&b),
                Some(&sa),
                Some(&sb),
                Some(&az),
                None,
                Some(&bias),
            ],
        );
        assert_eq!(y[0].as_slice::<f32>().unwrap(), &[7.25, 19.]);
    }
}
