//! The engine's own ops (domain `ai.smelt`), which only its passes create and which are never
//! written to a file: QDQ patterns run as integer kernels (see `passes::qdq`).
//!
//! Each equals the QDQ subgraph it replaces up to f32 rounding of the sum: the integer
//! accumulation is exact where the reference adds rounded float products, so an output may
//! differ in its last bits, and a QuantizeLinear after it by one step at a rounding boundary.

use super::nn::conv_geometry;
use super::{input, opt_input, OpCtx, Registry};
use crate::kernels::conv;
use crate::kernels::quant as kq;
use crate::kernels::softmax as ks;
use smelt_tensor::{bail, DType, Data, Result, Tensor};

pub fn register(r: &mut Registry) {
    r.insert("ai.smelt.QConv", qconv);
    r.insert("ai.smelt.ConvRelu", conv_relu);
    r.insert("ai.smelt.QMatMul", qmatmul);
    r.insert("ai.smelt.MatMulBias", matmul_bias);
    r.insert("ai.smelt.FakeQuant", fake_quant);
    r.insert("ai.smelt.Softmax", softmax);
    r.insert("ai.smelt.LayerNormalization", layer_norm);
}

/// A Conv (same inputs and attributes) whose output goes through Relu. A bias taken from an
/// Add (`bias_shape`, see `passes::FuseConvRelu`) must still have that per-channel shape.
fn conv_relu(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    if let (Some(want), Some(b)) = (ctx.ints("bias_shape")?, opt_input(inputs, 2)) {
        let got: Vec<i64> = b.shape().iter().map(|&n| n as i64).collect();
        if got != want {
            bail!(
                Shape,
                "the bias added after this Conv was {want:?} when the model was loaded and is \
                 now {got:?}"
            );
        }
    }
    super::nn::conv_on(ctx, inputs, true)
}

/// A float MatMul whose output goes through a bias Add: inputs a, w (2-D), bias (w's width).
fn matmul_bias(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let b = input(inputs, 2)?;
    if b.rank() != 1 {
        bail!(
            Shape,
            "the bias added after this MatMul must be 1-D, got {:?}",
            b.shape()
        );
    }
    let bias = b.as_slice::<f32>()?;
    super::nn::matmul_on(ctx, &inputs[..2], Some(bias))
}

/// Inputs: LayerNormalization's three, then y_scale and y_zero_point?: its output snapped
/// onto that grid (see `passes::SnapLayerNorm`, which makes it from a following pair).
fn layer_norm(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let g = grid(inputs, 3)?;
    super::nn::layer_norm_on(ctx, &inputs[..inputs.len().min(3)], g)
}

/// An activation as f32 (a cast is exact: QuantizeLinear divides in f32 for any narrower float).
fn activation(x: &Tensor) -> Result<std::borrow::Cow<'_, [f32]>> {
    Ok(match x.data() {
        Data::F32(v) => std::borrow::Cow::Borrowed(v.as_slice()),
        _ if matches!(x.dtype(), DType::F16 | DType::BF16) => {
            std::borrow::Cow::Owned(x.to_f32_vec()?)
        }
        _ => bail!(
            Shape,
            "a quantized activation must be float, got {}",
            x.dtype()
        ),
    })
}

fn scalar_f32(t: &Tensor, what: &str) -> Result<f32> {
    match t.data() {
        Data::F32(v) if v.len() == 1 => Ok(v[0]),
        _ => bail!(
            Shape,
            "{what} must be one f32, got {} {:?}",
            t.dtype(),
            t.shape()
        ),
    }
}

/// The activation's zero point as a signed offset from the quantized type's origin, and
/// whether that type is u8 (absent means u8 with zero point 0).
fn act_zero_point(z: Option<&Tensor>) -> Result<(i32, bool)> {
    Ok(match z.map(|t| t.data()) {
        None => (0, true),
        Some(Data::U8(v)) if v.len() == 1 => (v[0] as i32, true),
        Some(Data::I8(v)) if v.len() == 1 => (v[0] as i32, false),
        Some(_) => bail!(Shape, "an activation zero point must be one u8 or i8 value"),
    })
}

fn f32s<'a>(t: &'a Tensor, len: usize, what: &str) -> Result<&'a [f32]> {
    let v = t.as_slice::<f32>()?;
    if v.len() != len {
        bail!(Shape, "{what} has {} values, expected {len}", v.len());
    }
    Ok(v)
}

/// Inputs: x (float), x_scale, x_zero_point?, w (u8, the Conv's weight shape), w_zero_point
/// (u8, one per output channel), scale (f32 per output channel: x_scale * w_scale), bias?,
/// y_scale?, y_zero_point? (the output snapped to that grid, when a Q/DQ pair followed).
/// The Conv's attributes are kept.
fn qconv(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let sx = scalar_f32(input(inputs, 1)?, "x_scale")?;
    let (zx, is_u8) = act_zero_point(opt_input(inputs, 2))?;
    let w = input(inputs, 3)?;
    let (g, shape) = conv_geometry(ctx, x, w)?;
    let m = g.out_ch;
    let zw = w_zero_points::<u8>(input(inputs, 4)?, m)?;
    let scale = f32s(input(inputs, 5)?, m, "scale")?;
    let bias = opt_input(inputs, 6).map(|b| b.to_f32_vec()).transpose()?;
    // Activations go in as i8: u8 values and their zero point shift down by 128 together.
    let z8 = if is_u8 { zx - 128 } else { zx } as i8;
    let xs = activation(x)?;
    let mut q = vec![0i8; xs.len()];
    kq::quantize(&xs, sx, z8, &mut q);
    let wq = w.as_slice::<u8>()?;
    let plan = ctx.prepared(&[3, 4], || conv::ConvPlan::int8(&g, wq, zw))?;
    let mut out = ctx.output_f32(shape.iter().product());
    conv::qconv(
        plan,
        &g,
        &q,
        z8,
        wq,
        zw,
        scale,
        bias.as_deref(),
        grid(inputs, 7)?,
        &mut out,
    )?;
    Ok(vec![Tensor::from_vec(shape, out)?])
}

fn w_zero_points<T: smelt_tensor::Element>(t: &Tensor, len: usize) -> Result<&[T]> {
    let v = t.as_slice::<T>()?;
    if v.len() != len {
        bail!(
            Shape,
            "weight zero point has {} values, expected {len}",
            v.len()
        );
    }
    Ok(v)
}

/// Inputs: x (float, `[..., K]`), x_scale, x_zero_point?, w (i8, `[K, N]`), w_zero_point (i8,
/// `[N]`), scale (f32 `[N]`: x_scale * w_scale), bias? (`[N]`), y_scale?, y_zero_point? (as
/// for QConv). Output `[..., N]`.
fn qmatmul(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let sx = scalar_f32(input(inputs, 1)?, "x_scale")?;
    let (zx, is_u8) = act_zero_point(opt_input(inputs, 2))?;
    let w = input(inputs, 3)?;
    let [k, n] = w.shape() else {
        bail!(Shape, "QMatMul weights must be 2-D, got {:?}", w.shape());
    };
    let (k, n) = (*k, *n);
    let map = input_map(inputs, k)?;
    let k_in = x.shape().last().copied().unwrap_or(0);
    let fits = match &map {
        Some((Some(src), _)) => k_in > 0 && src.iter().all(|&j| j < k_in),
        _ => k_in == k,
    };
    if x.rank() == 0 || !fits {
        bail!(
            Shape,
            "input of shape {:?} does not fit the weights' {k} rows",
            x.shape()
        );
    }
    let zw = w_zero_points::<i8>(input(inputs, 4)?, n)?;
    let scale = f32s(input(inputs, 5)?, n, "scale")?;
    let bias = opt_input(inputs, 6).map(|b| b.to_f32_vec()).transpose()?;
    if bias.as_ref().is_some_and(|b| b.len() != n) {
        bail!(Shape, "bias must have {n} values");
    }
    // Activations go in as u8: i8 values and their zero point shift up by 128 together.
    let z8 = if is_u8 { zx } else { zx + 128 } as u8;
    let xs = activation(x)?;
    let m: usize = x.shape()[..x.rank() - 1].iter().product();
    let mut q = vec![0u8; m * k];
    match &map {
        Some((src, mult)) => kq::quantize_mapped(&xs, k_in, src.as_deref(), mult, sx, z8, &mut q),
        None => kq::quantize(&xs, sx, z8, &mut q),
    }
    // The sums land in the output buffer and are scaled to floats in place.
    let mut out = ctx.output_f32(m * n);
    let acc = bytemuck::cast_slice_mut::<f32, i32>(&mut out);
    let wv = w.as_slice::<i8>()?;
    let packed = if m <= kq::PACKED_MAX_ROWS {
        ctx.prepared(&[3], || kq::PackedQ8::new(k, n, wv))?
    } else {
        None
    };
    let zp = match packed {
        Some(packed) => kq::qgemm_packed(m, &q, &vec![z8; m], packed, zw, acc)?,
        None => kq::qgemm(m, k, n, &q, &vec![z8; m], wv, zw, acc)?,
    };
    let y_grid = grid(inputs, 7)?;
    kq::scale_sums(&mut out, n, &zp, scale, bias.as_deref(), false, y_grid);
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    Ok(vec![Tensor::from_vec(shape, out)?])
}

/// QMatMul's optional input map (inputs 9 and 10): the per-channel multipliers of a Mul and
/// the source channels of a Gather that fed its input, folded in by `fuse-qdq`.
#[allow(clippy::type_complexity)]
fn input_map<'a>(
    inputs: &[Option<&'a Tensor>],
    k: usize,
) -> Result<Option<(Option<Vec<usize>>, &'a [f32])>> {
    let Some(mult) = opt_input(inputs, 9) else {
        return Ok(None);
    };
    let mult = f32s(mult, k, "input multiplier")?;
    let src = match opt_input(inputs, 10) {
        Some(t) => {
            let v = t.to_i64_vec()?;
            if v.len() != k || v.iter().any(|&j| j < 0) {
                bail!(
                    Shape,
                    "input channel map must hold {k} non-negative indices"
                );
            }
            Some(v.into_iter().map(|j| j as usize).collect())
        }
        None => None,
    };
    Ok(Some((src, mult)))
}

/// The grid of a scale and optional zero point (u8 or i8) among the inputs.
fn grid(inputs: &[Option<&Tensor>], at: usize) -> Result<Option<kq::Grid>> {
    let Some(s) = opt_input(inputs, at) else {
        return Ok(None);
    };
    let s = scalar_f32(s, "output scale")?;
    let (z, is_u8) = act_zero_point(opt_input(inputs, at + 1))?;
    Ok(Some(if is_u8 {
        kq::Grid::new(s, z as u8)
    } else {
        kq::Grid::new(s, z as i8)
    }))
}

/// Inputs: x (float), scale, zero_point? (one each). Output: DequantizeLinear(QuantizeLinear(x)).
fn fake_quant(_ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let Some(g) = grid(inputs, 1)? else {
        bail!(Invalid, "FakeQuant needs a scale");
    };
    let xs = activation(x)?;
    let mut out = vec![0f32; xs.len()];
    kq::fake_quantize(&xs, g, &mut out);
    Ok(vec![Tensor::from_vec(x.shape().to_vec(), out)?])
}

/// Inputs: x, mask? (added to x first, either operand broadcast), y_scale?, y_zero_point?;
/// attributes: the Softmax's own, and `nan_to_zero`. Output: `Softmax(x + mask)` with NaN
/// replaced by 0, then snapped onto the grid when one is given (see `passes::FuseSoftmax`).
fn softmax(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let mask = opt_input(inputs, 1);
    let epi = ks::Epilogue {
        nan_to_zero: ctx.int("nan_to_zero", 0)? != 0,
        grid: grid(inputs, 2)?,
    };
    if let Some((full, bias, starts)) = by_rows(ctx, x, mask)? {
        let mut out = vec![0f32; full.numel()];
        let bias = bias.map(|b| ks::RowBias {
            values: b,
            starts: &starts,
        });
        let (_, len, _) = super::reduce::softmax_layout(ctx, full.shape())?;
        ks::softmax_rows_with(full.as_slice::<f32>()?, len, bias, epi, &mut out);
        return Ok(vec![Tensor::from_vec(full.shape().to_vec(), out)?]);
    }
    // Anything else (other float types, a mask the rows cannot index) runs op by op.
    let sum;
    let x = match mask {
        Some(m) => {
            let add = super::lookup("", "Add").expect("Add is registered");
            sum = add(ctx, &[Some(x), Some(m)])?.remove(0);
            &sum
        }
        None => x,
    };
    let y = super::reduce::softmax_op(ctx, &[Some(x)], false)?.remove(0);
    if !epi.nan_to_zero && epi.grid.is_none() {
        return Ok(vec![y]);
    }
    let mut v = y.to_f32_vec()?;
    for v in v.iter_mut() {
        if epi.nan_to_zero && v.is_nan() {
            *v = 0.0;
        }
        if let Some(g) = epi.grid {
            *v = g.snap(*v);
        }
    }
    // A quantize-dequantize pair yields f32 whatever it read.
    let dtype = if epi.grid.is_some() {
        DType::F32
    } else {
        y.dtype()
    };
    Ok(vec![super::nn::from_floats(y.shape().to_vec(), v, dtype)?])
}

type RowOperands<'a> = (&'a Tensor, Option<&'a [f32]>, Vec<usize>);

/// For the fast path: the f32 operand of the output's shape, the other one (if any), and
/// where each softmax row's slice of it starts. None when the softmax does not run along the
/// last axis, or the mask does not broadcast whole rows onto the other operand.
fn by_rows<'a>(
    ctx: &OpCtx,
    x: &'a Tensor,
    mask: Option<&'a Tensor>,
) -> Result<Option<RowOperands<'a>>> {
    let f32_only = |t: &Tensor| t.dtype() == DType::F32;
    let Some(m) = mask else {
        let (_, _, inner) = super::reduce::softmax_layout(ctx, x.shape())?;
        return Ok((f32_only(x) && inner == 1).then(|| (x, None, Vec::new())));
    };
    if !f32_only(x) || !f32_only(m) {
        return Ok(None);
    }
    for (full, part) in [(x, m), (m, x)] {
        let (fs, ps) = (full.shape(), part.shape());
        let Some(&len) = fs.last() else { continue };
        let (_, rlen, inner) = super::reduce::softmax_layout(ctx, fs)?;
        if inner != 1 || rlen != len || ps.len() > fs.len() || ps.last() != Some(&len) {
            continue;
        }
        // Right-aligned, each dimension of `part` equals `full`'s or is 1.
        let pad = fs.len() - ps.len();
        if ps.iter().zip(&fs[pad..]).any(|(&p, &f)| p != f && p != 1) {
            continue;
        }
        // Element strides of `part` along `full`'s row dimensions, 0 where it broadcasts.
        let outer = &fs[..fs.len() - 1];
        let mut strides = vec![0usize; outer.len()];
        let mut acc = len;
        for d in (0..outer.len()).rev() {
            let p = if d >= pad { ps[d - pad] } else { 1 };
            if p != 1 {
                strides[d] = acc;
            }
            acc *= p;
        }
        let rows: usize = outer.iter().product();
        let mut starts = Vec::with_capacity(rows);
        let mut idx = vec![0usize; outer.len()];
        let mut at = 0usize;
        for _ in 0..rows {
            starts.push(at);
            // Odometer step over the row index, keeping `at` in step.
            for d in (0..outer.len()).rev() {
                idx[d] += 1;
                at += strides[d];
                if idx[d] < outer[d] {
                    break;
                }
                at -= strides[d] * idx[d];
                idx[d] = 0;
            }
        }
        return Ok(Some((full, Some(part.as_slice::<f32>()?), starts)));
    }
    Ok(None)
}
