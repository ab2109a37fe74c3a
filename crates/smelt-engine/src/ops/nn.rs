//! Neural-network ops: convolutions, matrix products, pooling, normalisations, Einsum, Resize.
//!
//! Float ops compute in f32; other float dtypes are converted on the way in and out (the
//! engine's real workloads are f32, and this keeps one fast path per op).

use super::{input, norm_axis, opt_input, OpCtx, Registry};
use crate::kernels::conv::{self, ConvGeom};
use crate::kernels::gemm;
use crate::kernels::pool::{self, PoolGeom, PoolKind};
use rayon::prelude::*;
use smelt_tensor::{
    bail, broadcast_shapes, dispatch, strides_of, BroadcastIter, DType, Data, Element, Result,
    Tensor,
};
use std::borrow::Cow;

pub fn register(r: &mut Registry) {
    r.insert("Conv", conv_op);
    r.insert("ConvTranspose", conv_transpose_op);
    r.insert("Gemm", gemm_op);
    r.insert("MatMul", matmul_op);
    r.insert("MaxPool", max_pool_op);
    r.insert("AveragePool", average_pool_op);
    r.insert("LpPool", lp_pool_op);
    r.insert("GlobalAveragePool", global_average_pool);
    r.insert("GlobalMaxPool", global_max_pool);
    r.insert("GlobalLpPool", global_lp_pool);
    r.insert("BatchNormalization", batch_norm);
    r.insert("InstanceNormalization", instance_norm);
    r.insert("LayerNormalization", layer_norm);
    r.insert("GroupNormalization", group_norm);
    r.insert("RMSNormalization", rms_norm);
    r.insert("LRN", lrn);
    r.insert("MeanVarianceNormalization", mean_variance_norm);
    r.insert("Einsum", einsum);
    r.insert("Resize", resize);
    r.insert("Upsample", upsample);
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// The tensor's elements as f32, borrowed when already f32.
fn floats(t: &Tensor) -> Result<Cow<'_, [f32]>> {
    match t.data() {
        Data::F32(v) => Ok(Cow::Borrowed(v)),
        Data::F64(_) | Data::F16(_) | Data::BF16(_) => Ok(Cow::Owned(t.to_f32_vec()?)),
        _ => bail!(Unsupported, "expected a float tensor, got {}", t.dtype()),
    }
}

/// Wraps f32 results as a tensor of `dtype` (the op's input type).
pub(crate) fn from_floats(shape: Vec<usize>, v: Vec<f32>, dtype: DType) -> Result<Tensor> {
    let t = Tensor::from_vec(shape, v)?;
    if dtype == DType::F32 {
        Ok(t)
    } else {
        t.cast(dtype)
    }
}

fn usize_dim(v: i64, what: &str) -> Result<usize> {
    if v < 0 {
        bail!(Invalid, "{what} must not be negative, got {v}");
    }
    Ok(v as usize)
}

/// An optional ints attribute of length `n` (spatial), defaulting to `default` everywhere.
fn spatial_attr(ctx: &OpCtx, key: &str, n: usize, default: usize) -> Result<Vec<usize>> {
    match ctx.ints(key)? {
        None => Ok(vec![default; n]),
        Some(v) if v.is_empty() => Ok(vec![default; n]),
        Some(v) => {
            if v.len() != n {
                bail!(
                    Invalid,
                    "attribute '{key}' has {} values, expected {n}",
                    v.len()
                );
            }
            v.iter().map(|&x| usize_dim(x, key)).collect()
        }
    }
}

/// Pads a spatial list (rank 1..=3) to 3-D with leading `fill`.
fn to3(v: &[usize], fill: usize) -> [usize; 3] {
    let mut o = [fill; 3];
    o[3 - v.len()..].copy_from_slice(v);
    o
}

/// Window geometry shared by Conv and the pools: output sizes and begin/end pads.
struct Window {
    output: Vec<usize>,
    pads_begin: Vec<usize>,
    pads_end: Vec<usize>,
}

/// Resolves `auto_pad` / `pads` and the output size for a sliding window.
fn window_geometry(
    ctx: &OpCtx,
    input: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
    ceil_mode: bool,
) -> Result<Window> {
    let n = input.len();
    let auto_pad = ctx.string("auto_pad", "NOTSET")?;
    let mut w = Window {
        output: vec![0; n],
        pads_begin: vec![0; n],
        pads_end: vec![0; n],
    };
    for d in 0..n {
        if strides[d] == 0 || dilations[d] == 0 || kernel[d] == 0 {
            bail!(Invalid, "kernel, strides and dilations must be positive");
        }
    }
    match auto_pad.as_str() {
        "SAME_UPPER" | "SAME_LOWER" => {
            for d in 0..n {
                let eff = (kernel[d] - 1) * dilations[d] + 1;
                let out = input[d].div_ceil(strides[d]);
                let total = ((out.max(1) - 1) * strides[d] + eff).saturating_sub(input[d]);
                let small = total / 2;
                let (b, e) = if auto_pad == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
                w.output[d] = out;
                w.pads_begin[d] = b;
                w.pads_end[d] = e;
            }
            return Ok(w);
        }
        "VALID" => {}
        "NOTSET" => {
            if let Some(p) = ctx.ints("pads")? {
                if !p.is_empty() {
                    if p.len() != 2 * n {
                        bail!(Invalid, "'pads' has {} values, expected {}", p.len(), 2 * n);
                    }
                    for d in 0..n {
                        w.pads_begin[d] = usize_dim(p[d], "pads")?;
                        w.pads_end[d] = usize_dim(p[d + n], "pads")?;
                    }
                }
            }
        }
        other => bail!(Unsupported, "auto_pad '{other}'"),
    }
    for d in 0..n {
        let eff = (kernel[d] - 1) * dilations[d] + 1;
        let padded = input[d] + w.pads_begin[d] + w.pads_end[d];
        if padded < eff {
            bail!(
                Shape,
                "window of {eff} does not fit input of {} (padded {padded})",
                input[d]
            );
        }
        let span = padded - eff;
        let mut out = if ceil_mode {
            span.div_ceil(strides[d]) + 1
        } else {
            span / strides[d] + 1
        };
        // A last window starting inside the end padding is dropped (as PyTorch and ORT do).
        if ceil_mode && (out - 1) * strides[d] >= input[d] + w.pads_begin[d] {
            out -= 1;
        }
        w.output[d] = out;
    }
    Ok(w)
}

fn check_rank(x: &Tensor, what: &str) -> Result<usize> {
    let r = x.rank();
    if !(3..=5).contains(&r) {
        bail!(
            Unsupported,
            "{what} supports 1 to 3 spatial dimensions, input has shape {:?}",
            x.shape()
        );
    }
    Ok(r - 2)
}

// ---------------------------------------------------------------------------------------------
// Convolution

/// The geometry of a Conv node on these input and weight shapes, and its output shape.
pub(crate) fn conv_geometry(ctx: &OpCtx, x: &Tensor, w: &Tensor) -> Result<(ConvGeom, Vec<usize>)> {
    let sp = check_rank(x, "Conv")?;
    if w.rank() != sp + 2 {
        bail!(
            Shape,
            "weight shape {:?} does not match input shape {:?}",
            w.shape(),
            x.shape()
        );
    }
    let group = usize_dim(ctx.int("group", 1)?, "group")?;
    let kernel = match ctx.ints("kernel_shape")? {
        Some(k) if !k.is_empty() => k
            .iter()
            .map(|&v| usize_dim(v, "kernel_shape"))
            .collect::<Result<Vec<_>>>()?,
        _ => w.shape()[2..].to_vec(),
    };
    if kernel != w.shape()[2..] {
        bail!(
            Shape,
            "kernel_shape {:?} disagrees with weight shape {:?}",
            kernel,
            w.shape()
        );
    }
    let strides = spatial_attr(ctx, "strides", sp, 1)?;
    let dilations = spatial_attr(ctx, "dilations", sp, 1)?;
    let win = window_geometry(ctx, &x.shape()[2..], &kernel, &strides, &dilations, false)?;
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let m = w.shape()[0];
    if group == 0 || c != w.shape()[1] * group {
        bail!(
            Shape,
            "input has {c} channels, weight {:?} with group {group} expects {}",
            w.shape(),
            w.shape()[1] * group
        );
    }
    let g = ConvGeom {
        batch: n,
        in_ch: c,
        out_ch: m,
        groups: group,
        input: to3(&x.shape()[2..], 1),
        kernel: to3(&kernel, 1),
        output: to3(&win.output, 1),
        strides: to3(&strides, 1),
        dilations: to3(&dilations, 1),
        pads: to3(&win.pads_begin, 0),
    };
    let mut shape = vec![n, m];
    shape.extend_from_slice(&win.output);
    Ok((g, shape))
}

fn conv_op(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    conv_on(ctx, inputs, false)
}

/// Conv, its output through max(0, v) when `relu` (`ai.smelt.ConvRelu`).
pub(crate) fn conv_on(ctx: &OpCtx, inputs: &[Option<&Tensor>], relu: bool) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let w = input(inputs, 1)?;
    let b = opt_input(inputs, 2);
    let (g, shape) = conv_geometry(ctx, x, w)?;
    let xv = floats(x)?;
    let wv = floats(w)?;
    let bv = b.map(floats).transpose()?;
    let plan = ctx.prepared(&[1], || conv::ConvPlan::new(&g, &wv))?;
    let mut out = ctx.output_f32(shape.iter().product());
    conv::conv_act(plan, &g, &xv, &wv, bv.as_deref(), relu, &mut out)?;
    Ok(vec![from_floats(shape, out, x.dtype())?])
}

fn conv_transpose_op(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let w = input(inputs, 1)?;
    let b = opt_input(inputs, 2);
    let sp = check_rank(x, "ConvTranspose")?;
    if w.rank() != sp + 2 {
        bail!(
            Shape,
            "weight shape {:?} does not match input shape {:?}",
            w.shape(),
            x.shape()
        );
    }
    let group = usize_dim(ctx.int("group", 1)?, "group")?;
    let (n, c) = (x.shape()[0], x.shape()[1]);
    if group == 0 || w.shape()[0] != c || c % group != 0 {
        bail!(
            Shape,
            "input has {c} channels but weight has shape {:?} (group {group})",
            w.shape()
        );
    }
    let m = w.shape()[1] * group;
    let kernel = w.shape()[2..].to_vec();
    let strides = spatial_attr(ctx, "strides", sp, 1)?;
    let dilations = spatial_attr(ctx, "dilations", sp, 1)?;
    if kernel.contains(&0) || strides.contains(&0) || dilations.contains(&0) {
        bail!(Invalid, "kernel, strides and dilations must be positive");
    }
    let out_pad = spatial_attr(ctx, "output_padding", sp, 0)?;
    let auto_pad = ctx.string("auto_pad", "NOTSET")?;
    let ins = &x.shape()[2..];
    let full = |d: usize| {
        strides[d] * (ins[d].max(1) - 1) + out_pad[d] + (kernel[d] - 1) * dilations[d] + 1
    };
    let mut pads_begin = vec![0usize; sp];
    let mut output = vec![0usize; sp];
    let out_shape = match ctx.ints("output_shape")? {
        Some(v) if !v.is_empty() => Some(v[v.len().saturating_sub(sp)..].to_vec()),
        _ if auto_pad.starts_with("SAME") => Some(
            ins.iter()
                .zip(&strides)
                .map(|(&i, &s)| (i * s) as i64)
                .collect(),
        ),
        _ => None,
    };
    if let Some(os) = out_shape {
        if os.len() != sp {
            bail!(
                Invalid,
                "output_shape has {} values, expected {sp}",
                os.len()
            );
        }
        for d in 0..sp {
            let want = usize_dim(os[d], "output_shape")?;
            // May be negative: the output then extends past the full size (zeros plus bias).
            let total = full(d) as i64 - want as i64;
            let small = total.div_euclid(2);
            let begin = if auto_pad == "SAME_UPPER" {
                small
            } else {
                total - small
            };
            if begin < 0 {
                bail!(
                    Unsupported,
                    "output_shape {want} needs negative begin padding"
                );
            }
            pads_begin[d] = begin as usize;
            output[d] = want;
        }
    } else {
        let pads = match ctx.ints("pads")? {
            Some(p) if !p.is_empty() => {
                if p.len() != 2 * sp {
                    bail!(
                        Invalid,
                        "'pads' has {} values, expected {}",
                        p.len(),
                        2 * sp
                    );
                }
                p.iter()
                    .map(|&v| usize_dim(v, "pads"))
                    .collect::<Result<Vec<_>>>()?
            }
            _ => vec![0; 2 * sp],
        };
        for d in 0..sp {
            pads_begin[d] = pads[d];
            let Some(o) = full(d).checked_sub(pads[d] + pads[d + sp]) else {
                bail!(Shape, "pads exceed the transposed output size");
            };
            output[d] = o;
        }
    }
    let g = ConvGeom {
        batch: n,
        in_ch: c,
        out_ch: m,
        groups: group,
        input: to3(ins, 1),
        kernel: to3(&kernel, 1),
        output: to3(&output, 1),
        strides: to3(&strides, 1),
        dilations: to3(&dilations, 1),
        pads: to3(&pads_begin, 0),
    };
    let xv = floats(x)?;
    let wv = floats(w)?;
    let bv = b.map(floats).transpose()?;
    let mut shape = vec![n, m];
    shape.extend_from_slice(&output);
    let mut out = vec![0.0f32; shape.iter().product()];
    conv::conv_transpose(&g, &xv, &wv, bv.as_deref(), &mut out)?;
    Ok(vec![from_floats(shape, out, x.dtype())?])
}

// ---------------------------------------------------------------------------------------------
// Matrix products

/// Plain triple loop for dtypes the GEMM does not cover; accumulates in f64 for floats and
/// wrapping i128 for integers.
#[allow(clippy::too_many_arguments)]
fn naive_matmul<T: Element>(
    m: usize,
    k: usize,
    n: usize,
    a: &[T],
    a_off: usize,
    a_trans: bool,
    b: &[T],
    b_off: usize,
    b_trans: bool,
    out: &mut [T],
) {
    let float = T::DTYPE.is_float();
    for i in 0..m {
        for j in 0..n {
            let (mut sf, mut si) = (0.0f64, 0i128);
            for p in 0..k {
                let x = if a_trans {
                    a[a_off + p * m + i]
                } else {
                    a[a_off + i * k + p]
                };
                let y = if b_trans {
                    b[b_off + j * k + p]
                } else {
                    b[b_off + p * n + j]
                };
                if float {
                    sf += x.to_f64() * y.to_f64();
                } else {
                    si = si.wrapping_add(x.to_i128().wrapping_mul(y.to_i128()));
                }
            }
            out[i * n + j] = if float {
                T::from_f64(sf)
            } else {
                T::from_i128(si)
            };
        }
    }
}

fn gemm_op(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = input(inputs, 0)?;
    let b = input(inputs, 1)?;
    let c = opt_input(inputs, 2);
    if ctx.opset < 11 && c.is_none() {
        bail!(Invalid, "Gemm before opset 11 requires input C");
    }
    if a.rank() != 2 || b.rank() != 2 {
        bail!(
            Shape,
            "Gemm needs 2-D inputs, got {:?} and {:?}",
            a.shape(),
            b.shape()
        );
    }
    if a.dtype() != b.dtype() {
        bail!(
            Shape,
            "Gemm inputs differ in type: {} and {}",
            a.dtype(),
            b.dtype()
        );
    }
    let ta = ctx.int("transA", 0)? != 0;
    let tb = ctx.int("transB", 0)? != 0;
    let alpha = ctx.float("alpha", 1.0)?;
    let beta = ctx.float("beta", 1.0)?;
    let (m, k) = if ta {
        (a.shape()[1], a.shape()[0])
    } else {
        (a.shape()[0], a.shape()[1])
    };
    let (k2, n) = if tb {
        (b.shape()[1], b.shape()[0])
    } else {
        (b.shape()[0], b.shape()[1])
    };
    if k != k2 {
        bail!(
            Shape,
            "Gemm inner dimensions differ: {:?}{} x {:?}{}",
            a.shape(),
            if ta { "^T" } else { "" },
            b.shape(),
            if tb { "^T" } else { "" }
        );
    }
    let c = c.filter(|_| beta != 0.0);
    if let Some(c) = c {
        if broadcast_shapes(c.shape(), &[m, n])? != [m, n] {
            bail!(
                Shape,
                "Gemm C of shape {:?} does not broadcast to [{m}, {n}]",
                c.shape()
            );
        }
        if c.dtype() != a.dtype() {
            bail!(Shape, "Gemm C is {}, A is {}", c.dtype(), a.dtype());
        }
    }
    let shape = vec![m, n];
    if a.dtype() == DType::F32 {
        let (av, bv) = (a.as_slice::<f32>()?, b.as_slice::<f32>()?);
        let mut out = vec![0.0f32; m * n];
        match c {
            None => gemm::sgemm(m, k, n, av, ta, bv, tb, &mut out, alpha, 0.0, None)?,
            Some(c) => {
                let cv = c.as_slice::<f32>()?;
                let per_col = c.numel() == n && c.shape().last() == Some(&n);
                if per_col {
                    let bias: Cow<[f32]> = if beta == 1.0 {
                        Cow::Borrowed(cv)
                    } else {
                        Cow::Owned(cv.iter().map(|v| v * beta).collect())
                    };
                    gemm::sgemm(m, k, n, av, ta, bv, tb, &mut out, alpha, 0.0, Some(&bias))?;
                } else {
                    for (o, i) in out
                        .iter_mut()
                        .zip(BroadcastIter::broadcast(c.shape(), &shape))
                    {
                        *o = cv[i];
                    }
                    gemm::sgemm(m, k, n, av, ta, bv, tb, &mut out, alpha, beta, None)?;
                }
            }
        }
        return Ok(vec![Tensor::from_vec(shape, out)?]);
    }
    let data = dispatch!(a.data(), T, av => {
        let bv = b.as_slice::<T>()?;
        let mut out = vec![T::default(); m * n];
        naive_matmul(m, k, n, av, 0, ta, bv, 0, tb, &mut out);
        let alpha = alpha as f64;
        let beta = beta as f64;
        let cv = match c { Some(c) => Some(c.as_slice::<T>()?), None => None };
        let offs: Vec<usize> = match c { Some(c) => BroadcastIter::broadcast(c.shape(), &shape).collect(), None => vec![] };
        for (i, o) in out.iter_mut().enumerate() {
            let mut v = alpha * o.to_f64();
            if let Some(cv) = cv {
                v += beta * cv[offs[i]].to_f64();
            }
            *o = T::from_f64(v);
        }
        T::wrap(out)
    });
    Ok(vec![Tensor::new(shape, data)?])
}

/// Numpy `matmul`: 1-D operands are promoted and the added dimension dropped afterwards;
/// leading (batch) dimensions broadcast.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_with(a, b, |n| vec![0.0; n])
}

/// [`matmul`], a float product written into `output(len)` (every element overwritten).
fn matmul_with(a: &Tensor, b: &Tensor, output: impl FnOnce(usize) -> Vec<f32>) -> Result<Tensor> {
    if a.rank() == 0 || b.rank() == 0 {
        bail!(
            Shape,
            "MatMul does not accept scalars ({:?} x {:?})",
            a.shape(),
            b.shape()
        );
    }
    if a.dtype() != b.dtype() {
        bail!(
            Shape,
            "MatMul inputs differ in type: {} and {}",
            a.dtype(),
            b.dtype()
        );
    }
    let ash: Vec<usize> = if a.rank() == 1 {
        vec![1, a.shape()[0]]
    } else {
        a.shape().to_vec()
    };
    let bsh: Vec<usize> = if b.rank() == 1 {
        vec![b.shape()[0], 1]
    } else {
        b.shape().to_vec()
    };
    let (m, k) = (ash[ash.len() - 2], ash[ash.len() - 1]);
    let (k2, n) = (bsh[bsh.len() - 2], bsh[bsh.len() - 1]);
    if k != k2 {
        bail!(
            Shape,
            "MatMul inner dimensions differ: {:?} x {:?}",
            a.shape(),
            b.shape()
        );
    }
    let ab = &ash[..ash.len() - 2];
    let bb = &bsh[..bsh.len() - 2];
    let batch_shape = broadcast_shapes(ab, bb)?;
    let a_offs: Vec<usize> = BroadcastIter::broadcast(ab, &batch_shape)
        .map(|o| o * m * k)
        .collect();
    let b_offs: Vec<usize> = BroadcastIter::broadcast(bb, &batch_shape)
        .map(|o| o * k * n)
        .collect();
    let batch = a_offs.len();
    let mut shape = batch_shape.clone();
    if a.rank() > 1 {
        shape.push(m);
    }
    if b.rank() > 1 {
        shape.push(n);
    }
    if a.dtype() == DType::F32 {
        let mut out = output(batch * m * n);
        gemm::batched_matmul(
            m,
            k,
            n,
            a.as_slice()?,
            &a_offs,
            b.as_slice()?,
            &b_offs,
            &mut out,
        )?;
        return Tensor::from_vec(shape, out);
    }
    let data = dispatch!(a.data(), T, av => {
        let bv = b.as_slice::<T>()?;
        let mut out = vec![T::default(); batch * m * n];
        if m * n > 0 {
            for (i, o) in out.chunks_mut(m * n).enumerate() {
                naive_matmul(m, k, n, av, a_offs[i], false, bv, b_offs[i], false, o);
            }
        }
        T::wrap(out)
    });
    Tensor::new(shape, data)
}

fn matmul_op(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    matmul_on(ctx, inputs, None)
}

/// MatMul, plus `bias[j]` on each output column `j` when given (a fused bias Add, see
/// `passes::FuseMatMulBias`: the right side is then a 2-D float weight of the bias's width).
pub(crate) fn matmul_on(
    ctx: &OpCtx,
    inputs: &[Option<&Tensor>],
    bias: Option<&[f32]>,
) -> Result<Vec<Tensor>> {
    let (a, b) = (input(inputs, 0)?, input(inputs, 1)?);
    // 2-D f32 weights: one GEMM over all rows of `a`. Constant ones are packed once for the
    // kernel, not on every run; only for few rows, where packing had cost as much as the
    // product: past them the per-call packing is amortized, and a packed copy of every weight
    // would only hold memory.
    if let ([k, n], true) = (
        b.shape(),
        a.dtype() == DType::F32 && b.dtype() == DType::F32,
    ) {
        let (k, n) = (*k, *n);
        let m = a.numel() / k.max(1);
        let fits = a.rank() >= 1 && a.shape()[a.rank() - 1] == k && k > 0 && n > 0;
        if fits && bias.is_none_or(|v| v.len() == n) {
            let bv = b.as_slice::<f32>()?;
            let packed = if m <= gemm::PACKED_MAX_ROWS {
                ctx.prepared(&[1], || gemm::PackedB::new(k, n, bv, false))?
            } else {
                None
            };
            let mut out = ctx.output_f32(m * n);
            let av = a.as_slice()?;
            // The bias goes in first and the product adds to it (see `FuseMatMulBias`).
            let beta = match bias {
                Some(v) => {
                    out.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(v));
                    1.0
                }
                None => 0.0,
            };
            match packed {
                Some(p) => gemm::sgemm_packed(m, av, false, p, &mut out, 1.0, beta, None)?,
                None => gemm::sgemm(m, k, n, av, false, bv, false, &mut out, 1.0, beta, None)?,
            }
            let mut shape = a.shape()[..a.rank() - 1].to_vec();
            shape.push(n);
            return Ok(vec![Tensor::from_vec(shape, out)?]);
        }
    }
    if let Some(v) = bias {
        bail!(
            Shape,
            "a bias of {} values was fused into this MatMul, whose operands are {:?} {} and \
             {:?} {}",
            v.len(),
            a.shape(),
            a.dtype(),
            b.shape(),
            b.dtype()
        );
    }
    Ok(vec![matmul_with(a, b, |n| ctx.output_f32(n))?])
}

// ---------------------------------------------------------------------------------------------
// Pooling

/// Reads kernel/strides/dilations/pads of a pooling node and builds its geometry.
pub(crate) fn pool_geom(
    ctx: &OpCtx,
    x: &Tensor,
    use_dilations: bool,
) -> Result<(PoolGeom, Vec<usize>)> {
    let sp = check_rank(x, &ctx.node.op_type)?;
    let kernel = match ctx.ints("kernel_shape")? {
        Some(k) if k.len() == sp => k
            .iter()
            .map(|&v| usize_dim(v, "kernel_shape"))
            .collect::<Result<Vec<_>>>()?,
        _ => bail!(Invalid, "kernel_shape must list {sp} sizes"),
    };
    let strides = spatial_attr(ctx, "strides", sp, 1)?;
    let dilations = if use_dilations {
        spatial_attr(ctx, "dilations", sp, 1)?
    } else {
        vec![1; sp]
    };
    let ceil = ctx.int("ceil_mode", 0)? != 0;
    let win = window_geometry(ctx, &x.shape()[2..], &kernel, &strides, &dilations, ceil)?;
    let g = PoolGeom {
        planes: x.shape()[0] * x.shape()[1],
        input: to3(&x.shape()[2..], 1),
        kernel: to3(&kernel, 1),
        output: to3(&win.output, 1),
        strides: to3(&strides, 1),
        dilations: to3(&dilations, 1),
        pads_begin: to3(&win.pads_begin, 0),
        pads_end: to3(&win.pads_end, 0),
    };
    let mut shape = x.shape()[..2].to_vec();
    shape.extend_from_slice(&win.output);
    Ok((g, shape))
}

fn max_pool_op(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let (g, shape) = pool_geom(ctx, x, true)?;
    let want_idx = ctx.node.outputs.get(1).is_some_and(|s| !s.is_empty());
    let col_major = ctx.int("storage_order", 0)? != 0;
    let n: usize = shape.iter().product();
    let mut idx = if want_idx { vec![0i64; n] } else { vec![] };
    let data = dispatch!(x.data(), T, v => {
        let mut out = vec![T::default(); n];
        pool::max_pool(&g, v, &mut out, want_idx.then_some(&mut idx[..]), col_major)?;
        T::wrap(out)
    });
    let mut outs = vec![Tensor::new(shape.clone(), data)?];
    if want_idx {
        outs.push(Tensor::from_vec(shape, idx)?);
    }
    Ok(outs)
}

fn float_pool(
    ctx: &OpCtx,
    inputs: &[Option<&Tensor>],
    kind: PoolKind,
    dilations: bool,
) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let (g, shape) = pool_geom(ctx, x, dilations)?;
    let xv = floats(x)?;
    let mut out = vec![0.0f32; shape.iter().product()];
    pool::pool(&g, kind, &xv, &mut out)?;
    Ok(vec![from_floats(shape, out, x.dtype())?])
}

fn average_pool_op(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let count_include_pad = ctx.int("count_include_pad", 0)? != 0;
    float_pool(ctx, inputs, PoolKind::Avg { count_include_pad }, true)
}

fn lp_pool_op(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let p = ctx.int("p", 2)? as f32;
    float_pool(ctx, inputs, PoolKind::Lp(p), true)
}

/// Reduces every spatial plane of `x` (`[N, C, ...]`) to one value, keeping the rank.
fn global_reduce(x: &Tensor, f: impl Fn(&[f32]) -> f32 + Sync) -> Result<Tensor> {
    if x.rank() < 2 {
        bail!(
            Shape,
            "global pooling needs at least [N, C], got {:?}",
            x.shape()
        );
    }
    let xv = floats(x)?;
    let planes = x.shape()[0] * x.shape()[1];
    let sz: usize = x.shape()[2..].iter().product();
    let out: Vec<f32> = if sz == 0 {
        vec![f(&[]); planes]
    } else {
        xv.par_chunks(sz).map(&f).collect()
    };
    let mut shape = x.shape().to_vec();
    for d in shape.iter_mut().skip(2) {
        *d = 1;
    }
    from_floats(shape, out, x.dtype())
}

fn global_average_pool(_ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    Ok(vec![global_reduce(x, |p| {
        p.iter().sum::<f32>() / p.len() as f32
    })?])
}

fn global_max_pool(_ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    Ok(vec![global_reduce(x, |p| {
        p.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    })?])
}

fn global_lp_pool(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let p = ctx.int("p", 2)? as f32;
    Ok(vec![global_reduce(x, |v| {
        v.iter().map(|x| x.abs().powf(p)).sum::<f32>().powf(1.0 / p)
    })?])
}

// ---------------------------------------------------------------------------------------------
// Normalisation

/// Per-channel affine of `[N, C, ...]`: `y = x * mul[c] + add[c]`.
fn channel_affine(x: &[f32], shape: &[usize], mul: &[f32], add: &[f32]) -> Vec<f32> {
    let c = shape.get(1).copied().unwrap_or(1);
    let sz: usize = shape.iter().skip(2).product();
    let mut out = vec![0.0f32; x.len()];
    if sz == 0 {
        return out;
    }
    out.par_chunks_mut(sz)
        .zip(x.par_chunks(sz))
        .enumerate()
        .for_each(|(p, (o, xi))| {
            let ch = p % c;
            let (m, a) = (mul[ch], add[ch]);
            for (o, &v) in o.iter_mut().zip(xi) {
                *o = v * m + a;
            }
        });
    out
}

fn per_channel<'a>(t: &'a Tensor, c: usize, what: &str) -> Result<Cow<'a, [f32]>> {
    if t.numel() != c {
        bail!(
            Shape,
            "{what} has {} values, expected one per channel ({c})",
            t.numel()
        );
    }
    floats(t)
}

fn batch_norm(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    if x.rank() < 2 {
        bail!(
            Shape,
            "BatchNormalization needs [N, C, ...], got {:?}",
            x.shape()
        );
    }
    let c = x.shape()[1];
    let scale = per_channel(input(inputs, 1)?, c, "scale")?;
    let bias = per_channel(input(inputs, 2)?, c, "B")?;
    let mean = per_channel(input(inputs, 3)?, c, "mean")?;
    let var = per_channel(input(inputs, 4)?, c, "var")?;
    let eps = ctx.float("epsilon", 1e-5)?;
    let xv = floats(x)?;
    let training = ctx.opset >= 14 && ctx.int("training_mode", 0)? != 0;
    if !training {
        let mul: Vec<f32> = (0..c).map(|i| scale[i] / (var[i] + eps).sqrt()).collect();
        let add: Vec<f32> = (0..c).map(|i| bias[i] - mean[i] * mul[i]).collect();
        let y = channel_affine(&xv, x.shape(), &mul, &add);
        return Ok(vec![from_floats(x.shape().to_vec(), y, x.dtype())?]);
    }
    // Training mode: normalise with the batch statistics and report updated running ones.
    let momentum = ctx.float("momentum", 0.9)?;
    let n = x.shape()[0];
    let sz: usize = x.shape()[2..].iter().product();
    let cnt = (n * sz).max(1) as f64;
    let (mut bm, mut bv) = (vec![0.0f64; c], vec![0.0f64; c]);
    for b in 0..n {
        for ch in 0..c {
            for &v in &xv[(b * c + ch) * sz..][..sz] {
                bm[ch] += v as f64;
            }
        }
    }
    bm.iter_mut().for_each(|m| *m /= cnt);
    for b in 0..n {
        for ch in 0..c {
            for &v in &xv[(b * c + ch) * sz..][..sz] {
                bv[ch] += (v as f64 - bm[ch]).powi(2);
            }
        }
    }
    bv.iter_mut().for_each(|v| *v /= cnt);
    let mul: Vec<f32> = (0..c)
        .map(|i| scale[i] / (bv[i] as f32 + eps).sqrt())
        .collect();
    let add: Vec<f32> = (0..c).map(|i| bias[i] - bm[i] as f32 * mul[i]).collect();
    let y = channel_affine(&xv, x.shape(), &mul, &add);
    let rm: Vec<f32> = (0..c)
        .map(|i| mean[i] * momentum + bm[i] as f32 * (1.0 - momentum))
        .collect();
    let rv: Vec<f32> = (0..c)
        .map(|i| var[i] * momentum + bv[i] as f32 * (1.0 - momentum))
        .collect();
    let dt = x.dtype();
    Ok(vec![
        from_floats(x.shape().to_vec(), y, dt)?,
        from_floats(vec![c], rm, dt)?,
        from_floats(vec![c], rv, dt)?,
    ])
}

/// Sum with eight independent f32 lanes: vectorises, and is more accurate than one running sum.
#[inline]
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Mean and 1/sqrt(var + eps) of a slice (two passes, so no catastrophic cancellation).
fn moments(v: &[f32], eps: f64) -> (f32, f32) {
    let n = v.len().max(1) as f32;
    let mean = lane_sum(v, |x| x) / n;
    let var = lane_sum(v, |x| (x - mean) * (x - mean)) / n;
    (mean, (1.0 / (var as f64 + eps).sqrt()) as f32)
}

fn instance_norm(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    if x.rank() < 3 {
        bail!(
            Shape,
            "InstanceNormalization needs [N, C, D1, ...], got {:?}",
            x.shape()
        );
    }
    let c = x.shape()[1];
    let scale = per_channel(input(inputs, 1)?, c, "scale")?;
    let bias = per_channel(input(inputs, 2)?, c, "B")?;
    let eps = ctx.float("epsilon", 1e-5)? as f64;
    let xv = floats(x)?;
    let sz: usize = x.shape()[2..].iter().product();
    let mut out = vec![0.0f32; xv.len()];
    if sz > 0 {
        out.par_chunks_mut(sz)
            .zip(xv.par_chunks(sz))
            .enumerate()
            .for_each(|(p, (o, xi))| {
                let ch = p % c;
                let (mean, inv) = moments(xi, eps);
                let m = inv * scale[ch];
                for (o, &v) in o.iter_mut().zip(xi) {
                    *o = (v - mean) * m + bias[ch];
                }
            });
    }
    Ok(vec![from_floats(x.shape().to_vec(), out, x.dtype())?])
}

/// `t` as `len` values laid out like the trailing dims `shape` (broadcasting if needed).
fn trailing_params<'a>(t: &'a Tensor, shape: &[usize], what: &str) -> Result<Cow<'a, [f32]>> {
    let len: usize = shape.iter().product();
    let v = floats(t)?;
    if t.numel() == len {
        return Ok(v);
    }
    if broadcast_shapes(t.shape(), shape)? != shape {
        bail!(
            Shape,
            "{what} of shape {:?} does not broadcast to {:?}",
            t.shape(),
            shape
        );
    }
    Ok(Cow::Owned(
        BroadcastIter::broadcast(t.shape(), shape)
            .map(|i| v[i])
            .collect(),
    ))
}

fn layer_norm(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    layer_norm_on(ctx, inputs, None)
}

/// LayerNormalization, its output snapped onto `grid` (then f32) when one is given.
pub(crate) fn layer_norm_on(
    ctx: &OpCtx,
    inputs: &[Option<&Tensor>],
    grid: Option<crate::kernels::quant::Grid>,
) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let axis = norm_axis(ctx.int("axis", -1)?, x.rank())?;
    let eps = ctx.float("epsilon", 1e-5)? as f64;
    let d: usize = x.shape()[axis..].iter().product();
    let scale = trailing_params(input(inputs, 1)?, &x.shape()[axis..], "Scale")?;
    let bias = opt_input(inputs, 2)
        .map(|b| trailing_params(b, &x.shape()[axis..], "B"))
        .transpose()?;
    let xv = floats(x)?;
    let rows = xv.len().checked_div(d).unwrap_or(0);
    let mut out = vec![0.0f32; xv.len()];
    let mut stats = vec![(0.0f32, 0.0f32); rows];
    let dt = x.dtype();
    // A narrower float output is rounded to its type before it is quantized: snapped below.
    let snap_rows = grid.filter(|_| dt == DType::F32);
    if d > 0 {
        type Row<'r> = (&'r mut [f32], (&'r [f32], &'r mut (f32, f32)));
        let row = |(o, (xi, st)): Row| {
            let (mean, inv) = moments(xi, eps);
            *st = (mean, inv);
            match &bias {
                Some(b) => {
                    for ((o, &v), (&s, &bb)) in o.iter_mut().zip(xi).zip(scale.iter().zip(b.iter()))
                    {
                        *o = (v - mean) * inv * s + bb;
                    }
                }
                None => {
                    for ((o, &v), &s) in o.iter_mut().zip(xi).zip(scale.iter()) {
                        *o = (v - mean) * inv * s;
                    }
                }
            }
            if let Some(g) = snap_rows {
                crate::kernels::quant::snap_in_place(g, o);
            }
        };
        // Small inputs are not worth waking the thread pool for.
        if xv.len() >= 1 << 15 {
            out.par_chunks_mut(d)
                .zip(xv.par_chunks(d).zip(stats.par_iter_mut()))
                .for_each(row);
        } else {
            out.chunks_mut(d)
                .zip(xv.chunks(d).zip(stats.iter_mut()))
                .for_each(row);
        }
    }
    // A quantize-dequantize pair yields f32 whatever it read.
    let y = match grid {
        None => from_floats(x.shape().to_vec(), out, dt)?,
        Some(_) if dt == DType::F32 => Tensor::from_vec(x.shape().to_vec(), out)?,
        Some(g) => {
            let mut v = from_floats(x.shape().to_vec(), out, dt)?.to_f32_vec()?;
            crate::kernels::quant::snap_in_place(g, &mut v);
            Tensor::from_vec(x.shape().to_vec(), v)?
        }
    };
    let mut outs = vec![y];
    let n_out = ctx.node.outputs.len();
    if n_out > 1 {
        let mut sshape = x.shape().to_vec();
        for s in sshape.iter_mut().skip(axis) {
            *s = 1;
        }
        let stash = if ctx.int("stash_type", 1)? == 1 {
            DType::F32
        } else {
            dt
        };
        outs.push(from_floats(
            sshape.clone(),
            stats.iter().map(|s| s.0).collect(),
            stash,
        )?);
        if n_out > 2 {
            outs.push(from_floats(
                sshape,
                stats.iter().map(|s| s.1).collect(),
                stash,
            )?);
        }
    }
    Ok(outs)
}

fn rms_norm(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let axis = norm_axis(ctx.int("axis", -1)?, x.rank())?;
    let eps = ctx.float("epsilon", 1e-5)? as f64;
    let d: usize = x.shape()[axis..].iter().product();
    let scale = trailing_params(input(inputs, 1)?, &x.shape()[axis..], "scale")?;
    let xv = floats(x)?;
    let mut out = vec![0.0f32; xv.len()];
    if d > 0 {
        out.par_chunks_mut(d)
            .zip(xv.par_chunks(d))
            .for_each(|(o, xi)| {
                let ms = xi.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
                let inv = (1.0 / (ms + eps).sqrt()) as f32;
                for ((o, &v), &s) in o.iter_mut().zip(xi).zip(scale.iter()) {
                    *o = v * inv * s;
                }
            });
    }
    Ok(vec![from_floats(x.shape().to_vec(), out, x.dtype())?])
}

fn group_norm(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    if x.rank() < 2 {
        bail!(
            Shape,
            "GroupNormalization needs [N, C, ...], got {:?}",
            x.shape()
        );
    }
    let groups = usize_dim(ctx.int("num_groups", 1)?, "num_groups")?;
    let eps = ctx.float("epsilon", 1e-5)? as f64;
    let c = x.shape()[1];
    if groups == 0 || c % groups != 0 {
        bail!(Shape, "{c} channels do not split into {groups} groups");
    }
    let cpg = c / groups;
    let scale = floats(input(inputs, 1)?)?;
    let bias = floats(input(inputs, 2)?)?;
    // Opset 18 had one scale per group, opset 21 one per channel.
    let per_group = scale.len() == groups && cpg != 1;
    let want = if per_group { groups } else { c };
    if scale.len() != want || bias.len() != want {
        bail!(
            Shape,
            "scale/bias have {}/{} values, expected {c} (or {groups})",
            scale.len(),
            bias.len()
        );
    }
    let sz: usize = x.shape()[2..].iter().product();
    let xv = floats(x)?;
    let mut out = vec![0.0f32; xv.len()];
    let gsz = cpg * sz;
    if gsz > 0 {
        out.par_chunks_mut(gsz)
            .zip(xv.par_chunks(gsz))
            .enumerate()
            .for_each(|(p, (o, xi))| {
                let g = p % groups;
                let (mean, inv) = moments(xi, eps);
                for j in 0..cpg {
                    let pi = if per_group { g } else { g * cpg + j };
                    let (s, b) = (scale[pi] * inv, bias[pi]);
                    for (o, &v) in o[j * sz..(j + 1) * sz]
                        .iter_mut()
                        .zip(&xi[j * sz..(j + 1) * sz])
                    {
                        *o = (v - mean) * s + b;
                    }
                }
            });
    }
    Ok(vec![from_floats(x.shape().to_vec(), out, x.dtype())?])
}

fn lrn(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    if x.rank() < 2 {
        bail!(Shape, "LRN needs [N, C, ...], got {:?}", x.shape());
    }
    let alpha = ctx.float("alpha", 1e-4)?;
    let beta = ctx.float("beta", 0.75)?;
    let bias = ctx.float("bias", 1.0)?;
    let size = usize_dim(ctx.int("size", 0)?, "size")?;
    if size == 0 {
        bail!(Invalid, "LRN needs a positive 'size'");
    }
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let sz: usize = x.shape()[2..].iter().product();
    let xv = floats(x)?;
    let (lo, hi) = ((size - 1) / 2, (size - 1).div_ceil(2));
    let mut out = vec![0.0f32; xv.len()];
    for b in 0..n {
        for ch in 0..c {
            let c0 = ch.saturating_sub(lo);
            let c1 = (ch + hi).min(c - 1);
            for i in 0..sz {
                let sq: f32 = (c0..=c1).map(|k| xv[(b * c + k) * sz + i].powi(2)).sum();
                let at = (b * c + ch) * sz + i;
                out[at] = xv[at] / (bias + alpha / size as f32 * sq).powf(beta);
            }
        }
    }
    Ok(vec![from_floats(x.shape().to_vec(), out, x.dtype())?])
}

fn mean_variance_norm(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let axes: Vec<usize> = match ctx.ints("axes")? {
        Some(a) => a
            .iter()
            .map(|&v| norm_axis(v, x.rank()))
            .collect::<Result<_>>()?,
        None => vec![0, 2, 3]
            .into_iter()
            .filter(|&a| a < x.rank())
            .collect(),
    };
    let xv = floats(x)?;
    let shape = x.shape();
    // Kept dims index the groups; reduced dims index elements within a group.
    let mut red_shape = shape.to_vec();
    let mut keep_shape = shape.to_vec();
    for (d, (r, k)) in red_shape.iter_mut().zip(keep_shape.iter_mut()).enumerate() {
        if axes.contains(&d) {
            *k = 1;
        } else {
            *r = 1;
        }
    }
    let st = strides_of(shape);
    let red_strides: Vec<usize> = (0..shape.len())
        .map(|d| if axes.contains(&d) { st[d] } else { 0 })
        .collect();
    let keep_strides: Vec<usize> = (0..shape.len())
        .map(|d| if axes.contains(&d) { 0 } else { st[d] })
        .collect();
    let mut out = vec![0.0f32; xv.len()];
    for base in BroadcastIter::new(&keep_shape, keep_strides, 0) {
        let idx: Vec<usize> = BroadcastIter::new(&red_shape, red_strides.clone(), base).collect();
        let vals: Vec<f32> = idx.iter().map(|&i| xv[i]).collect();
        let (mean, _) = moments(&vals, 0.0);
        let var = vals
            .iter()
            .map(|&v| ((v - mean) as f64).powi(2))
            .sum::<f64>()
            / vals.len().max(1) as f64;
        let inv = (1.0 / (var + 1e-9).sqrt()) as f32;
        for &i in &idx {
            out[i] = (xv[i] - mean) * inv;
        }
    }
    Ok(vec![from_floats(shape.to_vec(), out, x.dtype())?])
}

// ---------------------------------------------------------------------------------------------
// Einsum

/// Einsum letters: equation letters as they are, ellipsis dims as private code points.
fn ellipsis_letter(i: usize) -> char {
    char::from_u32(0x100 + i as u32).unwrap_or('?')
}

/// Expands one term of an equation into one letter per dimension.
fn einsum_term(term: &str, rank: Option<usize>, ell_rank: usize) -> Result<Vec<char>> {
    let explicit: usize = term.replace("...", "").chars().count();
    if let Some((pre, post)) = term.split_once("...") {
        if post.contains("...") {
            bail!(Invalid, "Einsum term '{term}' has more than one ellipsis");
        }
        let k = match rank {
            Some(r) if r < explicit => bail!(
                Shape,
                "Einsum term '{term}' has more letters than its input's rank {r}"
            ),
            Some(r) => r - explicit,
            None => ell_rank,
        };
        let mut v: Vec<char> = pre.chars().collect();
        v.extend((ell_rank - k..ell_rank).map(ellipsis_letter));
        v.extend(post.chars());
        Ok(v)
    } else {
        if let Some(r) = rank {
            if r != explicit {
                bail!(
                    Shape,
                    "Einsum term '{term}' names {explicit} dims, its input has rank {r}"
                );
            }
        }
        Ok(term.chars().collect())
    }
}

/// Reorders the axes of a row-major f32 buffer.
fn permute_f32(v: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return v.to_vec();
    }
    let st = strides_of(shape);
    let nshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let nst: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    BroadcastIter::new(&nshape, nst, 0).map(|i| v[i]).collect()
}

fn einsum(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let eq: String = ctx
        .string("equation", "")?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    let ops: Vec<&Tensor> = (0..terms.len())
        .map(|i| input(inputs, i))
        .collect::<Result<_>>()?;
    if inputs.len() != terms.len() {
        bail!(
            Invalid,
            "Einsum equation '{eq}' has {} terms for {} inputs",
            terms.len(),
            inputs.len()
        );
    }
    let dtype = ops[0].dtype();
    if ops.iter().any(|t| t.dtype() != dtype) {
        bail!(Shape, "Einsum inputs must share one type");
    }
    let ell_rank = terms
        .iter()
        .zip(&ops)
        .filter(|(t, _)| t.contains("..."))
        .map(|(t, o)| {
            o.rank()
                .saturating_sub(t.replace("...", "").chars().count())
        })
        .max()
        .unwrap_or(0);
    let letters: Vec<Vec<char>> = terms
        .iter()
        .zip(&ops)
        .map(|(t, o)| einsum_term(t, Some(o.rank()), ell_rank))
        .collect::<Result<_>>()?;
    for l in letters.iter().flatten() {
        if !(l.is_ascii_alphabetic() || *l as u32 >= 0x100) {
            bail!(
                Invalid,
                "Einsum equation '{eq}' has an invalid character '{l}'"
            );
        }
    }
    let out: Vec<char> = match rhs {
        Some(r) => einsum_term(r, None, ell_rank)?,
        None => {
            let mut v: Vec<char> = (0..ell_rank).map(ellipsis_letter).collect();
            let mut once: Vec<char> = letters
                .iter()
                .flatten()
                .filter(|c| {
                    c.is_ascii_alphabetic()
                        && letters.iter().flatten().filter(|d| d == c).count() == 1
                })
                .copied()
                .collect();
            once.sort_unstable();
            v.extend(once);
            v
        }
    };
    // Every letter's extent; size-1 dims broadcast.
    let mut all: Vec<char> = out.clone();
    for l in letters.iter().flatten() {
        if !all.contains(l) {
            all.push(*l);
        }
    }
    let mut size = vec![1usize; all.len()];
    let mut unequal = false;
    for (ls, o) in letters.iter().zip(&ops) {
        for (l, &d) in ls.iter().zip(o.shape()) {
            let i = all.iter().position(|c| c == l).unwrap_or(0);
            if size[i] != d {
                if size[i] != 1 && d != 1 {
                    bail!(Shape, "Einsum letter '{l}' has sizes {} and {d}", size[i]);
                }
                unequal = true;
                size[i] = size[i].max(d);
            }
        }
    }
    for l in &out {
        if !letters.iter().flatten().any(|c| c == l) {
            bail!(Invalid, "Einsum output letter '{l}' appears in no input");
        }
    }
    let out_shape: Vec<usize> = out
        .iter()
        .map(|l| size[all.iter().position(|c| c == l).unwrap_or(0)])
        .collect();
    let sz = |l: &char| size[all.iter().position(|c| c == l).unwrap_or(0)];

    // Two operands with distinct letters and no letter summed inside one operand: a batched
    // matrix product between two transposes.
    let distinct = |v: &[char]| v.iter().enumerate().all(|(i, c)| !v[..i].contains(c));
    if ops.len() == 2
        && dtype == DType::F32
        && !unequal
        && letters.iter().all(|v| distinct(v))
        && distinct(&out)
        && letters
            .iter()
            .flatten()
            .all(|l| out.contains(l) || (letters[0].contains(l) && letters[1].contains(l)))
    {
        let (la, lb) = (&letters[0], &letters[1]);
        let batch: Vec<char> = la
            .iter()
            .filter(|l| lb.contains(l) && out.contains(l))
            .copied()
            .collect();
        let contr: Vec<char> = la
            .iter()
            .filter(|l| lb.contains(l) && !out.contains(l))
            .copied()
            .collect();
        let fa: Vec<char> = la.iter().filter(|l| !lb.contains(l)).copied().collect();
        let fb: Vec<char> = lb.iter().filter(|l| !la.contains(l)).copied().collect();
        let pos = |v: &[char], l: &char| v.iter().position(|c| c == l).unwrap_or(0);
        let pa: Vec<usize> = batch
            .iter()
            .chain(&fa)
            .chain(&contr)
            .map(|l| pos(la, l))
            .collect();
        let pb: Vec<usize> = batch
            .iter()
            .chain(&contr)
            .chain(&fb)
            .map(|l| pos(lb, l))
            .collect();
        let a = permute_f32(ops[0].as_slice()?, ops[0].shape(), &pa);
        let b = permute_f32(ops[1].as_slice()?, ops[1].shape(), &pb);
        let nb: usize = batch.iter().map(sz).product();
        let m: usize = fa.iter().map(sz).product();
        let k: usize = contr.iter().map(sz).product();
        let n: usize = fb.iter().map(sz).product();
        let mut prod = vec![0.0f32; nb * m * n];
        let ao: Vec<usize> = (0..nb).map(|i| i * m * k).collect();
        let bo: Vec<usize> = (0..nb).map(|i| i * k * n).collect();
        gemm::batched_matmul(m, k, n, &a, &ao, &b, &bo, &mut prod)?;
        let got: Vec<char> = batch.iter().chain(&fa).chain(&fb).copied().collect();
        let got_shape: Vec<usize> = got.iter().map(sz).collect();
        let perm: Vec<usize> = out.iter().map(|l| pos(&got, l)).collect();
        let v = permute_f32(&prod, &got_shape, &perm);
        return Ok(vec![Tensor::from_vec(out_shape, v)?]);
    }

    // General case: one loop over every letter, in f64.
    let vals: Vec<Vec<f64>> = ops.iter().map(|t| t.to_f64_vec()).collect::<Result<_>>()?;
    let stride_of = |ls: &[char], shape: &[usize]| -> Vec<usize> {
        let st = strides_of(shape);
        all.iter()
            .map(|l| {
                ls.iter()
                    .zip(shape)
                    .zip(&st)
                    .filter(|((c, &d), _)| *c == l && d != 1)
                    .map(|(_, s)| s)
                    .sum()
            })
            .collect()
    };
    let op_strides: Vec<Vec<usize>> = letters
        .iter()
        .zip(&ops)
        .map(|(l, o)| stride_of(l, o.shape()))
        .collect();
    let out_strides = stride_of(&out, &out_shape);
    let total: usize = size.iter().product();
    let mut res = vec![0.0f64; out_shape.iter().product()];
    if total > 0 {
        let mut idx = vec![0usize; all.len()];
        let mut offs = vec![0usize; ops.len()];
        let mut oo = 0usize;
        for _ in 0..total {
            res[oo] += offs.iter().zip(&vals).map(|(&o, v)| v[o]).product::<f64>();
            for d in (0..all.len()).rev() {
                idx[d] += 1;
                oo += out_strides[d];
                for (o, s) in offs.iter_mut().zip(&op_strides) {
                    *o += s[d];
                }
                if idx[d] < size[d] {
                    break;
                }
                oo -= out_strides[d] * idx[d];
                for (o, s) in offs.iter_mut().zip(&op_strides) {
                    *o -= s[d] * idx[d];
                }
                idx[d] = 0;
            }
        }
    }
    let t = Tensor::from_vec(out_shape, res)?;
    Ok(vec![if dtype == DType::F64 {
        t
    } else {
        t.cast(dtype)?
    }])
}

// ---------------------------------------------------------------------------------------------
// Resize / Upsample

#[derive(Clone, Copy, PartialEq)]
enum Interp {
    Nearest,
    Linear,
    Cubic,
}

/// How one axis maps output positions back to input coordinates.
struct AxisResize<'a> {
    len_in: usize,
    len_out: usize,
    scale: f32,
    roi: (f32, f32),
    coord: &'a str,
}

impl AxisResize<'_> {
    fn source(&self, o: usize) -> f32 {
        let (x, s) = (o as f32, self.scale);
        let (lin, lout) = (self.len_in as f32, self.len_out as f32);
        match self.coord {
            "asymmetric" => x / s,
            "align_corners" => {
                if self.len_out <= 1 {
                    0.0
                } else {
                    // ONNX's reference divides by the unrounded length (scale * input).
                    x * (lin - 1.0) / (s * lin - 1.0)
                }
            }
            "pytorch_half_pixel" => {
                if self.len_out > 1 {
                    (x + 0.5) / s - 0.5
                } else {
                    0.0
                }
            }
            "tf_half_pixel_for_nn" => (x + 0.5) / s,
            "half_pixel_symmetric" => {
                let adj = lout / (s * lin);
                let center = lin / 2.0;
                center * (1.0 - adj) + (x + 0.5) / s - 0.5
            }
            "tf_crop_and_resize" => {
                let (a, b) = self.roi;
                if self.len_out > 1 {
                    a * (lin - 1.0) + x * (b - a) * (lin - 1.0) / (lout - 1.0)
                } else {
                    0.5 * (a + b) * (lin - 1.0)
                }
            }
            _ => (x + 0.5) / s - 0.5,
        }
    }
}

/// Input taps (index, weight) per output position of one axis; `None` means extrapolate.
fn axis_taps(
    ax: &AxisResize,
    interp: Interp,
    nearest_mode: &str,
    cubic_a: f32,
    exclude_outside: bool,
    antialias: bool,
) -> Vec<Option<Vec<(usize, f32)>>> {
    let n_in = ax.len_in as isize;
    let last = (ax.len_in.max(1) - 1) as f32;
    let clamp = |i: isize| i.clamp(0, n_in - 1) as usize;
    (0..ax.len_out)
        .map(|o| {
            let x = ax.source(o);
            if ax.coord == "tf_crop_and_resize" && (x < 0.0 || x > last) {
                return None;
            }
            Some(match interp {
                Interp::Nearest => {
                    let f = x - x.floor();
                    let i = match nearest_mode {
                        "floor" => x.floor(),
                        "ceil" => x.ceil(),
                        "round_prefer_ceil" => {
                            if f == 0.5 {
                                x.ceil()
                            } else {
                                x.round()
                            }
                        }
                        // Pre-opset-11 behaviour: floor when enlarging, ceil when shrinking.
                        "simple" => {
                            if ax.scale >= 1.0 {
                                x.floor()
                            } else {
                                x.ceil()
                            }
                        }
                        _ => {
                            if f == 0.5 {
                                x.floor()
                            } else {
                                x.round()
                            }
                        }
                    };
                    vec![(clamp(i as isize), 1.0)]
                }
                Interp::Linear | Interp::Cubic => {
                    // Taps sit at x_int + start + j with ratio in (0, 1], as ONNX's reference
                    // picks them; with antialias the filter widens by 1 / scale when shrinking.
                    let mut xi = x.floor();
                    let mut r = x - xi;
                    if r == 0.0 {
                        r = 1.0;
                        xi -= 1.0;
                    }
                    let s = if antialias { ax.scale.min(1.0) } else { 1.0 };
                    let a = cubic_a;
                    let (start, kernel): (isize, Box<dyn Fn(f32) -> f32>) =
                        if interp == Interp::Linear {
                            (
                                (-1.0 / s).floor() as isize + 1,
                                Box::new(|d: f32| (1.0 - d.abs()).max(0.0)),
                            )
                        } else {
                            let w = move |d: f32| {
                                let d = d.abs();
                                if d <= 1.0 {
                                    ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
                                } else if d < 2.0 {
                                    ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
                                } else {
                                    0.0
                                }
                            };
                            ((-2.0 / s).floor() as isize + 1, Box::new(w))
                        };
                    let n = 2 - 2 * start;
                    let mut taps: Vec<(isize, f32)> = (0..n)
                        .map(|j| {
                            let off = start + j;
                            (xi as isize + off, kernel(s * (off as f32 - r)))
                        })
                        .collect();
                    if exclude_outside {
                        taps.retain(|&(i, _)| i >= 0 && i < n_in);
                    }
                    if antialias || exclude_outside {
                        let sum: f32 = taps.iter().map(|t| t.1).sum();
                        if sum != 0.0 {
                            taps.iter_mut().for_each(|t| t.1 /= sum);
                        }
                    }
                    taps.into_iter().map(|(i, w)| (clamp(i), w)).collect()
                }
            })
        })
        .collect()
}

/// Resamples `v` (shape `shape`) along `axis` to `taps.len()` positions.
fn resize_axis(
    v: &[f32],
    shape: &[usize],
    axis: usize,
    taps: &[Option<Vec<(usize, f32)>>],
    extrap: f32,
) -> Vec<f32> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let (lin, lout) = (shape[axis], taps.len());
    let mut out = vec![0.0f32; outer * lout * inner];
    for o in 0..outer {
        for (j, t) in taps.iter().enumerate() {
            let dst = &mut out[(o * lout + j) * inner..][..inner];
            match t {
                None => dst.fill(extrap),
                Some(t) => {
                    for &(i, w) in t {
                        let src = &v[(o * lin + i) * inner..][..inner];
                        for (d, &s) in dst.iter_mut().zip(src) {
                            *d += w * s;
                        }
                    }
                }
            }
        }
    }
    out
}

/// Everything Resize and Upsample need once sizes are known.
struct ResizeSpec<'a> {
    out_shape: Vec<usize>,
    scales: Vec<f32>,
    roi: Vec<(f32, f32)>,
    interp: Interp,
    coord: &'a str,
    nearest_mode: &'a str,
    cubic_a: f32,
    exclude_outside: bool,
    antialias: bool,
    extrapolation: f32,
}

fn run_resize(x: &Tensor, spec: &ResizeSpec) -> Result<Tensor> {
    let rank = x.rank();
    let axes: Vec<AxisResize> = (0..rank)
        .map(|d| AxisResize {
            len_in: x.shape()[d],
            len_out: spec.out_shape[d],
            scale: spec.scales[d],
            roi: spec.roi[d],
            coord: spec.coord,
        })
        .collect();
    let changed = |a: &AxisResize| {
        a.len_in != a.len_out || spec.coord == "tf_crop_and_resize" || a.scale != 1.0
    };
    let n_out: usize = spec.out_shape.iter().product();
    if n_out > 0 && x.numel() == 0 {
        bail!(
            Shape,
            "cannot resize an empty tensor to {:?}",
            spec.out_shape
        );
    }
    if n_out == 0 {
        return Ok(Tensor::zeros(x.dtype(), spec.out_shape.clone()));
    }
    if spec.interp == Interp::Nearest {
        // Pure index selection: works for every dtype.
        let maps: Vec<Vec<Option<usize>>> = axes
            .iter()
            .map(|a| {
                axis_taps(a, Interp::Nearest, spec.nearest_mode, 0.0, false, false)
                    .into_iter()
                    .map(|t| t.map(|t| t[0].0))
                    .collect()
            })
            .collect();
        let st = strides_of(x.shape());
        let n: usize = spec.out_shape.iter().product();
        let mut src: Vec<Option<usize>> = Vec::with_capacity(n);
        let mut idx = vec![0usize; rank];
        for _ in 0..n {
            let mut off = Some(0usize);
            for d in 0..rank {
                off = match (off, maps[d][idx[d]]) {
                    (Some(o), Some(i)) => Some(o + i * st[d]),
                    _ => None,
                };
            }
            src.push(off);
            for d in (0..rank).rev() {
                idx[d] += 1;
                if idx[d] < spec.out_shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        let e = spec.extrapolation as f64;
        let data = dispatch!(x.data(), T, v => {
            let fill = T::from_f64(e);
            T::wrap(src.iter().map(|o| o.map_or(fill, |i| v[i])).collect())
        });
        return Tensor::new(spec.out_shape.clone(), data);
    }
    let mut shape = x.shape().to_vec();
    let mut v: Vec<f32> = x.to_f32_vec()?;
    for (d, a) in axes.iter().enumerate() {
        if !changed(a) {
            continue;
        }
        let taps = axis_taps(
            a,
            spec.interp,
            spec.nearest_mode,
            spec.cubic_a,
            spec.exclude_outside,
            spec.antialias,
        );
        v = resize_axis(&v, &shape, d, &taps, spec.extrapolation);
        shape[d] = a.len_out;
    }
    from_floats(shape, v, x.dtype())
}

fn parse_interp(mode: &str) -> Result<Interp> {
    Ok(match mode {
        "nearest" => Interp::Nearest,
        "linear" | "bilinear" | "trilinear" => Interp::Linear,
        "cubic" | "bicubic" => Interp::Cubic,
        other => bail!(Unsupported, "resize mode '{other}'"),
    })
}

fn resize(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let rank = x.rank();
    let nonempty = |i: usize| opt_input(inputs, i).filter(|t| t.numel() > 0);
    let (roi, scales, sizes) = if ctx.opset < 11 {
        (None, nonempty(1), None)
    } else {
        (nonempty(1), nonempty(2), nonempty(3))
    };
    let mode = ctx.string("mode", "nearest")?;
    let interp = parse_interp(&mode)?;
    let coord = if ctx.opset < 11 {
        "asymmetric".to_string()
    } else {
        ctx.string("coordinate_transformation_mode", "half_pixel")?
    };
    let nearest_mode = if ctx.opset < 11 {
        "simple".to_string()
    } else {
        ctx.string("nearest_mode", "round_prefer_floor")?
    };
    let axes: Vec<usize> = match ctx.ints("axes")? {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|&v| norm_axis(v, rank))
            .collect::<Result<_>>()?,
        _ => (0..rank).collect(),
    };
    let na = axes.len();
    let mut out_shape = x.shape().to_vec();
    let mut sc = vec![1.0f32; rank];
    match (scales, sizes) {
        (_, Some(sz)) => {
            let sz = sz.to_i64_vec()?;
            if sz.len() != na {
                bail!(
                    Shape,
                    "Resize 'sizes' has {} values for {na} axes",
                    sz.len()
                );
            }
            let policy = ctx.string("keep_aspect_ratio_policy", "stretch")?;
            let ratios: Vec<f32> = axes
                .iter()
                .zip(&sz)
                .map(|(&a, &s)| s as f32 / x.shape()[a] as f32)
                .collect();
            let common = match policy.as_str() {
                "stretch" => None,
                "not_larger" => Some(ratios.iter().copied().fold(f32::INFINITY, f32::min)),
                "not_smaller" => Some(ratios.iter().copied().fold(f32::NEG_INFINITY, f32::max)),
                other => bail!(Unsupported, "keep_aspect_ratio_policy '{other}'"),
            };
            for (i, &a) in axes.iter().enumerate() {
                match common {
                    None => {
                        out_shape[a] = usize_dim(sz[i], "sizes")?;
                        sc[a] = ratios[i];
                    }
                    Some(s) => {
                        out_shape[a] = (s * x.shape()[a] as f32 + 0.5).floor() as usize;
                        sc[a] = s;
                    }
                }
            }
        }
        (Some(s), None) => {
            let s = s.to_f32_vec()?;
            if s.len() != na {
                bail!(
                    Shape,
                    "Resize 'scales' has {} values for {na} axes",
                    s.len()
                );
            }
            for (i, &a) in axes.iter().enumerate() {
                if s[i].is_nan() || s[i] <= 0.0 {
                    bail!(Invalid, "Resize scales must be positive, got {}", s[i]);
                }
                out_shape[a] = (x.shape()[a] as f32 * s[i]).floor() as usize;
                sc[a] = s[i];
            }
        }
        (None, None) => bail!(Invalid, "Resize needs either scales or sizes"),
    }
    let mut roi_v = vec![(0.0f32, 1.0f32); rank];
    if coord == "tf_crop_and_resize" {
        let Some(r) = roi else {
            bail!(Invalid, "tf_crop_and_resize needs an roi input");
        };
        let r = r.to_f32_vec()?;
        let list: Vec<usize> = if r.len() == 2 * na {
            axes.clone()
        } else if r.len() == 2 * rank {
            (0..rank).collect()
        } else {
            bail!(Shape, "Resize roi has {} values", r.len());
        };
        let k = list.len();
        for (i, &a) in list.iter().enumerate() {
            roi_v[a] = (r[i], r[i + k]);
        }
    }
    let spec = ResizeSpec {
        out_shape,
        scales: sc,
        roi: roi_v,
        interp,
        coord: &coord,
        nearest_mode: &nearest_mode,
        cubic_a: ctx.float("cubic_coeff_a", -0.75)?,
        exclude_outside: ctx.int("exclude_outside", 0)? != 0,
        antialias: ctx.int("antialias", 0)? != 0,
        extrapolation: ctx.float("extrapolation_value", 0.0)?,
    };
    Ok(vec![run_resize(x, &spec)?])
}

fn upsample(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let scales: Vec<f32> = match opt_input(inputs, 1) {
        Some(s) => s.to_f32_vec()?,
        None => match ctx.node.attr_floats("scales")? {
            Some(s) => s.to_vec(),
            None => bail!(Invalid, "Upsample needs scales"),
        },
    };
    if scales.len() != x.rank() || scales.iter().any(|&s| s.is_nan() || s <= 0.0) {
        bail!(
            Shape,
            "Upsample scales {:?} do not fit input shape {:?}",
            scales,
            x.shape()
        );
    }
    let out_shape: Vec<usize> = x
        .shape()
        .iter()
        .zip(&scales)
        .map(|(&d, &s)| (d as f32 * s).floor() as usize)
        .collect();
    let spec = ResizeSpec {
        out_shape,
        scales,
        roi: vec![(0.0, 1.0); x.rank()],
        interp: parse_interp(&ctx.string("mode", "nearest")?)?,
        coord: "asymmetric",
        nearest_mode: "floor",
        cubic_a: -0.75,
        exclude_outside: false,
        antialias: false,
        extrapolation: 0.0,
    };
    Ok(vec![run_resize(x, &spec)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_ir::{Attr, Node};

    fn node(op: &str, n_out: usize, attrs: &[(&str, Attr)]) -> Node {
        let outs: Vec<String> = (0..n_out).map(|i| format!("y{i}")).collect();
        let outs: Vec<&str> = outs.iter().map(String::as_str).collect();
        let mut n = Node::new(op, "t", &["x"], &outs);
        for (k, v) in attrs {
            n = n.with_attr(k, v.clone());
        }
        n
    }

    fn run(
        op: &str,
        n_out: usize,
        attrs: &[(&str, Attr)],
        ins: &[Option<&Tensor>],
    ) -> Result<Vec<Tensor>> {
        let n = node(op, n_out, attrs);
        let ctx = OpCtx::new(&n, 17);
        let f = match op {
            "Conv" => conv_op as super::super::OpFn,
            "Gemm" => gemm_op,
            "MatMul" => matmul_op,
            "MaxPool" => max_pool_op,
            "AveragePool" => average_pool_op,
            "BatchNormalization" => batch_norm,
            "LayerNormalization" => layer_norm,
            "Einsum" => einsum,
            "Resize" => resize,
            "ConvTranspose" => conv_transpose_op,
            _ => panic!("no op {op}"),
        };
        f(&ctx, ins)
    }

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    fn close(got: &Tensor, want: &[f32]) {
        let g = got.as_slice::<f32>().unwrap();
        assert_eq!(g.len(), want.len(), "{g:?} vs {want:?}");
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{g:?} vs {want:?}");
        }
    }

    fn ints(v: &[i64]) -> Attr {
        Attr::Ints(v.to_vec())
    }

    #[test]
    fn conv_same_upper_stride_groups_vs_naive() {
        // x: [1, 4, 5, 5], w: [4, 2, 3, 3], group 2, stride 2, SAME_UPPER -> [1, 4, 3, 3]
        let xv: Vec<f32> = (0..100).map(|i| ((i * 13 % 7) as f32) - 3.0).collect();
        let wv: Vec<f32> = (0..72).map(|i| ((i * 5 % 11) as f32) / 4.0 - 1.0).collect();
        let bv = vec![0.5, -1.0, 2.0, 0.0];
        let out = run(
            "Conv",
            1,
            &[
                ("group", Attr::Int(2)),
                ("strides", ints(&[2, 2])),
                ("auto_pad", Attr::String(b"SAME_UPPER".to_vec())),
            ],
            &[
                Some(&t(&[1, 4, 5, 5], xv.clone())),
                Some(&t(&[4, 2, 3, 3], wv.clone())),
                Some(&t(&[4], bv.clone())),
            ],
        )
        .unwrap();
        assert_eq!(out[0].shape(), &[1, 4, 3, 3]);
        // SAME_UPPER with in 5, stride 2, kernel 3: out 3, total pad 2 -> 1 before, 1 after.
        let mut want = vec![0.0f32; 36];
        for oc in 0..4 {
            let g = oc / 2;
            for oy in 0..3 {
                for ox in 0..3 {
                    let mut s = bv[oc];
                    for c in 0..2 {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let iy = (oy * 2 + ky) as isize - 1;
                                let ix = (ox * 2 + kx) as isize - 1;
                                if (0..5).contains(&iy) && (0..5).contains(&ix) {
                                    s += xv[((g * 2 + c) * 5 + iy as usize) * 5 + ix as usize]
                                        * wv[((oc * 2 + c) * 3 + ky) * 3 + kx];
                                }
                            }
                        }
                    }
                    want[(oc * 3 + oy) * 3 + ox] = s;
                }
            }
        }
        close(&out[0], &want);
    }

    #[test]
    fn conv_transpose_output_shape_pads() {
        // 1-D, x = [1, 2, 3], w = [1, 1], stride 1: full output [1, 3, 5, 3]; output_shape 3
        // trims one: SAME_UPPER-style default puts the extra pad at the start -> [3, 5, 3]
        let out = run(
            "ConvTranspose",
            1,
            &[("output_shape", ints(&[3]))],
            &[
                Some(&t(&[1, 1, 3], vec![1.0, 2.0, 3.0])),
                Some(&t(&[1, 1, 2], vec![1.0, 1.0])),
            ],
        )
        .unwrap();
        close(&out[0], &[3.0, 5.0, 3.0]);
    }

    #[test]
    fn gemm_transposes_alpha_beta_broadcast_c() {
        // A^T where A = [[1, 3], [2, 4]] (stored 2x2), B^T where B = [[1, 0], [1, 1]].
        // op(A) = [[1, 2], [3, 4]], op(B) = [[1, 1], [0, 1]] -> AB = [[1, 3], [3, 7]]
        let a = t(&[2, 2], vec![1.0, 3.0, 2.0, 4.0]);
        let b = t(&[2, 2], vec![1.0, 0.0, 1.0, 1.0]);
        let c = t(&[2, 1], vec![10.0, 20.0]);
        let attrs = [
            ("transA", Attr::Int(1)),
            ("transB", Attr::Int(1)),
            ("alpha", Attr::Float(2.0)),
            ("beta", Attr::Float(0.5)),
        ];
        let out = run("Gemm", 1, &attrs, &[Some(&a), Some(&b), Some(&c)]).unwrap();
        close(&out[0], &[7.0, 11.0, 16.0, 24.0]);
        // Per-column bias fast path.
        let c = t(&[2], vec![1.0, -1.0]);
        let out = run("Gemm", 1, &attrs, &[Some(&a), Some(&b), Some(&c)]).unwrap();
        close(&out[0], &[2.5, 5.5, 6.5, 13.5]);
        // f64 goes through the generic loop.
        let a64 = a.cast(DType::F64).unwrap();
        let b64 = b.cast(DType::F64).unwrap();
        let out = run("Gemm", 1, &attrs, &[Some(&a64), Some(&b64), None]).unwrap();
        assert_eq!(out[0].as_slice::<f64>().unwrap(), &[2.0, 6.0, 6.0, 14.0]);
    }

    #[test]
    fn matmul_batched_broadcast_vs_naive() {
        // [2, 1, 3, 4] x [3, 4, 2] -> [2, 3, 3, 2]
        let av: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bv: Vec<f32> = (0..24).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
        let out = matmul(&t(&[2, 1, 3, 4], av.clone()), &t(&[3, 4, 2], bv.clone())).unwrap();
        assert_eq!(out.shape(), &[2, 3, 3, 2]);
        let mut want = vec![];
        for i in 0..2 {
            for j in 0..3 {
                for r in 0..3 {
                    for c in 0..2 {
                        want.push(
                            (0..4)
                                .map(|p| av[(i * 3 + r) * 4 + p] * bv[(j * 4 + p) * 2 + c])
                                .sum(),
                        );
                    }
                }
            }
        }
        close(&out, &want);
        // 1-D promotion on both sides: a dot product with shape [].
        let d = matmul(&t(&[3], vec![1.0, 2.0, 3.0]), &t(&[3], vec![4.0, 5.0, 6.0])).unwrap();
        assert_eq!(d.shape(), &[] as &[usize]);
        close(&d, &[32.0]);
        // Integer matmul through the generic loop.
        let ai = Tensor::from_vec(vec![1, 2], vec![2i64, 3]).unwrap();
        let bi = Tensor::from_vec(vec![2, 1], vec![4i64, 5]).unwrap();
        assert_eq!(matmul(&ai, &bi).unwrap().as_slice::<i64>().unwrap(), &[23]);
        assert!(matmul(&t(&[2, 3], vec![0.0; 6]), &t(&[2, 3], vec![0.0; 6])).is_err());
    }

    #[test]
    fn max_pool_ceil_mode_with_indices() {
        // 4x4 input 0..16, kernel 3 stride 2, ceil mode -> 2x2 (last windows clipped).
        let x = t(&[1, 1, 4, 4], (0..16).map(|v| v as f32).collect());
        let attrs = [
            ("kernel_shape", ints(&[3, 3])),
            ("strides", ints(&[2, 2])),
            ("ceil_mode", Attr::Int(1)),
        ];
        let out = run("MaxPool", 2, &attrs, &[Some(&x)]).unwrap();
        assert_eq!(out[0].shape(), &[1, 1, 2, 2]);
        close(&out[0], &[10.0, 11.0, 14.0, 15.0]);
        assert_eq!(out[1].as_slice::<i64>().unwrap(), &[10, 11, 14, 15]);
        let floor = run("MaxPool", 1, &attrs[..2], &[Some(&x)]).unwrap();
        assert_eq!(floor[0].shape(), &[1, 1, 1, 1]);
        let avg = run("AveragePool", 1, &attrs, &[Some(&x)]).unwrap();
        // windows: rows 0-2 x cols 0-2 mean 5; cols 2-3 mean (2+3+6+7+10+11)/6 = 6.5, ...
        close(&avg[0], &[5.0, 6.5, 11.0, 12.5]);
    }

    #[test]
    fn batch_norm_inference() {
        // y = scale * (x - mean) / sqrt(var + eps) + b, eps 0 -> exact values.
        let x = t(&[1, 2, 1, 2], vec![1.0, 3.0, 10.0, 20.0]);
        let out = run(
            "BatchNormalization",
            1,
            &[("epsilon", Attr::Float(0.0))],
            &[
                Some(&x),
                Some(&t(&[2], vec![2.0, 1.0])),
                Some(&t(&[2], vec![0.0, 1.0])),
                Some(&t(&[2], vec![1.0, 10.0])),
                Some(&t(&[2], vec![4.0, 25.0])),
            ],
        )
        .unwrap();
        close(&out[0], &[0.0, 2.0, 1.0, 3.0]);
    }

    #[test]
    fn layer_norm_with_stats() {
        // rows [1, 3] and [2, 6]: means 2, 4; variances 1, 4.
        let x = t(&[2, 2], vec![1.0, 3.0, 2.0, 6.0]);
        let out = run(
            "LayerNormalization",
            3,
            &[("epsilon", Attr::Float(0.0))],
            &[
                Some(&x),
                Some(&t(&[2], vec![1.0, 2.0])),
                Some(&t(&[2], vec![0.5, 0.0])),
            ],
        )
        .unwrap();
        close(&out[0], &[-0.5, 2.0, -0.5, 2.0]);
        close(&out[1], &[2.0, 4.0]);
        close(&out[2], &[1.0, 0.5]);
        assert_eq!(out[1].shape(), &[2, 1]);
    }

    #[test]
    fn einsum_matmul_and_general_paths() {
        let a = t(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let b = t(&[3, 2], vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let eq = |s: &str| [("equation", Attr::String(s.as_bytes().to_vec()))];
        let out = run("Einsum", 1, &eq("ij,jk->ki"), &[Some(&a), Some(&b)]).unwrap();
        // A @ B = [[4, 5], [10, 11]], transposed.
        close(&out[0], &[4.0, 10.0, 5.0, 11.0]);
        let sq = t(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let tr = run("Einsum", 1, &eq("ii"), &[Some(&sq)]).unwrap();
        close(&tr[0], &[5.0]);
        let sum = run("Einsum", 1, &eq("...j->..."), &[Some(&a)]).unwrap();
        close(&sum[0], &[6.0, 15.0]);
        let implicit = run("Einsum", 1, &eq("ji"), &[Some(&a)]).unwrap();
        assert_eq!(implicit[0].shape(), &[3, 2]);
        close(&implicit[0], &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }

    #[test]
    fn resize_linear_and_nearest() {
        // [1, 2] -> 4 wide, half_pixel: sources -0.25, 0.25, 0.75, 1.25 -> clamp -> 1, 1.25, 1.75, 2
        let x = t(&[1, 2], vec![1.0, 2.0]);
        let scales = t(&[2], vec![1.0, 2.0]);
        let attrs = [("mode", Attr::String(b"linear".to_vec()))];
        let out = run("Resize", 1, &attrs, &[Some(&x), None, Some(&scales)]).unwrap();
        close(&out[0], &[1.0, 1.25, 1.75, 2.0]);
        let sizes = Tensor::from_vec(vec![2], vec![1i64, 3]).unwrap();
        let attrs = [
            (
                "coordinate_transformation_mode",
                Attr::String(b"align_corners".to_vec()),
            ),
            ("mode", Attr::String(b"linear".to_vec())),
        ];
        let out = run("Resize", 1, &attrs, &[Some(&x), None, None, Some(&sizes)]).unwrap();
        close(&out[0], &[1.0, 1.5, 2.0]);
        let out = run("Resize", 1, &[], &[Some(&x), None, Some(&scales)]).unwrap();
        close(&out[0], &[1.0, 1.0, 2.0, 2.0]);
    }
}
