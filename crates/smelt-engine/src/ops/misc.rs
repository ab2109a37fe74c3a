//! Ops that fit no other family: losses, detection helpers (NonMaxSuppression, RoiAlign),
//! sampling (GridSample, AffineGrid), Col2Im/MaxUnpool, signal processing (DFT, STFT,
//! windows, mel filters), Det, CenterCropPad and StringNormalizer.
//!
//! Float math runs in f64 and results are cast back to the input's dtype: these ops are rare
//! and small, so exactness beats speed here.

use super::{input, norm_axis, opt_input, OpCtx, Registry};
use smelt_ir::Attr;
use smelt_tensor::{bail, strides_of, DType, Data, Element, Result, Tensor};

pub fn register(r: &mut Registry) {
    r.insert("NegativeLogLikelihoodLoss", nll_loss);
    r.insert("SoftmaxCrossEntropyLoss", sce_loss);
    r.insert("NonMaxSuppression", non_max_suppression);
    r.insert("RoiAlign", roi_align);
    r.insert("MaxUnpool", max_unpool);
    r.insert("HannWindow", hann_window);
    r.insert("HammingWindow", hamming_window);
    r.insert("BlackmanWindow", blackman_window);
    r.insert("Det", det);
    r.insert("CenterCropPad", center_crop_pad);
    r.insert("Col2Im", col2im);
    r.insert("AffineGrid", affine_grid);
    r.insert("DFT", dft);
    r.insert("StringNormalizer", string_normalizer);
    r.insert("GridSample", grid_sample);
    r.insert("STFT", stft);
    r.insert("MelWeightMatrix", mel_weight_matrix);
}

/// A float tensor's values as f64, rejecting other dtypes.
fn float_vals(t: &Tensor, what: &str) -> Result<Vec<f64>> {
    if !t.dtype().is_float() {
        bail!(Shape, "{what} must be a float tensor, got {}", t.dtype());
    }
    t.to_f64_vec()
}

/// Builds a tensor of `dtype` (a float type) from f64 values.
fn float_out(shape: Vec<usize>, v: Vec<f64>, dtype: DType) -> Result<Tensor> {
    let t = Tensor::from_vec(shape, v)?;
    if dtype == DType::F64 {
        Ok(t)
    } else {
        t.cast(dtype)
    }
}

/// Shared core of both losses: `logp` is `[N, C, d...]` log-probabilities.
fn nll_core(
    ctx: &OpCtx,
    logp: &[f64],
    shape: &[usize],
    target: &Tensor,
    weight: Option<&Tensor>,
    dtype: DType,
) -> Result<Tensor> {
    if shape.len() < 2 {
        bail!(Shape, "input must have rank >= 2, got shape {shape:?}");
    }
    let (n, c) = (shape[0], shape[1]);
    let inner: usize = shape[2..].iter().product();
    let mut tshape = vec![n];
    tshape.extend_from_slice(&shape[2..]);
    if target.shape() != tshape.as_slice() {
        bail!(
            Shape,
            "target has shape {:?}, expected {:?}",
            target.shape(),
            tshape
        );
    }
    let tgt = target.to_i64_vec()?;
    let w = match weight {
        Some(t) => {
            if t.shape() != [c] {
                bail!(Shape, "weight has shape {:?}, expected [{c}]", t.shape());
            }
            Some(float_vals(t, "weight")?)
        }
        None => None,
    };
    let ignore = ctx.node.attr_int("ignore_index")?;
    let reduction = ctx.string("reduction", "mean")?;
    let mut loss = vec![0.0f64; n * inner];
    let mut wsum = 0.0f64;
    for ni in 0..n {
        for k in 0..inner {
            let i = ni * inner + k;
            let t = tgt[i];
            if Some(t) == ignore {
                continue;
            }
            if t < 0 || t as usize >= c {
                bail!(Input, "target class {t} is outside 0..{c}");
            }
            let wt = w.as_ref().map_or(1.0, |w| w[t as usize]);
            loss[i] = -logp[(ni * c + t as usize) * inner + k] * wt;
            wsum += wt;
        }
    }
    match reduction.as_str() {
        "none" => float_out(tshape, loss, dtype),
        "sum" => float_out(vec![], vec![loss.iter().sum()], dtype),
        "mean" => {
            let s: f64 = loss.iter().sum();
            // Every target ignored: ONNX defines the mean as 0 rather than NaN.
            let m = if wsum == 0.0 { 0.0 } else { s / wsum };
            float_out(vec![], vec![m], dtype)
        }
        r => bail!(Invalid, "unknown reduction '{r}'"),
    }
}

fn nll_loss(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let v = float_vals(x, "input")?;
    let out = nll_core(
        ctx,
        &v,
        x.shape(),
        input(inputs, 1)?,
        opt_input(inputs, 2),
        x.dtype(),
    )?;
    Ok(vec![out])
}

fn sce_loss(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let shape = x.shape();
    if shape.len() < 2 {
        bail!(Shape, "scores must have rank >= 2, got shape {shape:?}");
    }
    let mut v = float_vals(x, "scores")?;
    let (n, c) = (shape[0], shape[1]);
    let inner: usize = shape[2..].iter().product();
    // log_softmax over the class axis, shifted by the max for stability.
    for ni in 0..n {
        for k in 0..inner {
            let at = |j: usize| (ni * c + j) * inner + k;
            let m = (0..c).map(|j| v[at(j)]).fold(f64::NEG_INFINITY, f64::max);
            let lse = m + (0..c).map(|j| (v[at(j)] - m).exp()).sum::<f64>().ln();
            for j in 0..c {
                v[at(j)] -= lse;
            }
        }
    }
    let loss = nll_core(
        ctx,
        &v,
        shape,
        input(inputs, 1)?,
        opt_input(inputs, 2),
        x.dtype(),
    )?;
    let logp = float_out(shape.to_vec(), v, x.dtype())?;
    Ok(vec![loss, logp])
}

/// Clamped scalar read of an optional input: the first element, or `default` when absent.
fn scalar_f64(inputs: &[Option<&Tensor>], i: usize, default: f64) -> Result<f64> {
    match opt_input(inputs, i) {
        Some(t) => match t.to_f64_vec()?.first() {
            Some(&v) => Ok(v),
            None => bail!(Shape, "input {i} must hold one value, it is empty"),
        },
        None => Ok(default),
    }
}

fn scalar_i64(inputs: &[Option<&Tensor>], i: usize, default: i64) -> Result<i64> {
    match opt_input(inputs, i) {
        Some(t) => match t.to_i64_vec()?.first() {
            Some(&v) => Ok(v),
            None => bail!(Shape, "input {i} must hold one value, it is empty"),
        },
        None => Ok(default),
    }
}

fn non_max_suppression(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let boxes_t = input(inputs, 0)?;
    let scores_t = input(inputs, 1)?;
    let (bs, ss) = (boxes_t.shape(), scores_t.shape());
    if bs.len() != 3 || bs[2] != 4 {
        bail!(Shape, "boxes must be [batches, boxes, 4], got {bs:?}");
    }
    if ss.len() != 3 || ss[0] != bs[0] || ss[2] != bs[1] {
        bail!(
            Shape,
            "scores must be [{}, classes, {}], got {ss:?}",
            bs[0],
            bs[1]
        );
    }
    let boxes = float_vals(boxes_t, "boxes")?;
    let scores = float_vals(scores_t, "scores")?;
    let max_out = scalar_i64(inputs, 2, 0)?.max(0) as usize;
    let iou_th = scalar_f64(inputs, 3, 0.0)?;
    let score_th = opt_input(inputs, 4)
        .map(|_| scalar_f64(inputs, 4, 0.0))
        .transpose()?;
    let center = ctx.int("center_point_box", 0)? != 0;
    let (nb, nc, nbox) = (ss[0], ss[1], ss[2]);
    // Normalised corners (y1, x1, y2, x2) with y1 <= y2 and x1 <= x2.
    let corners: Vec<[f64; 4]> = boxes
        .chunks_exact(4)
        .map(|b| {
            if center {
                let (xc, yc, w, h) = (b[0], b[1], b[2], b[3]);
                [yc - h / 2.0, xc - w / 2.0, yc + h / 2.0, xc + w / 2.0]
            } else {
                [
                    b[0].min(b[2]),
                    b[1].min(b[3]),
                    b[0].max(b[2]),
                    b[1].max(b[3]),
                ]
            }
        })
        .collect();
    let iou = |a: &[f64; 4], b: &[f64; 4]| -> f64 {
        let ih = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
        let iw = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
        let inter = ih * iw;
        let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
        if union <= 0.0 {
            0.0
        } else {
            inter / union
        }
    };
    let mut out: Vec<i64> = Vec::new();
    for b in 0..nb {
        for c in 0..nc {
            let sc = &scores[(b * nc + c) * nbox..(b * nc + c + 1) * nbox];
            let mut cand: Vec<usize> = (0..nbox)
                .filter(|&i| score_th.is_none_or(|t| sc[i] > t))
                .collect();
            // Stable sort keeps lower box indices first among equal scores.
            cand.sort_by(|&i, &j| sc[j].total_cmp(&sc[i]));
            let mut kept: Vec<usize> = Vec::new();
            for i in cand {
                if kept.len() >= max_out {
                    break;
                }
                let bi = &corners[b * nbox + i];
                if kept
                    .iter()
                    .all(|&k| iou(&corners[b * nbox + k], bi) <= iou_th)
                {
                    kept.push(i);
                }
            }
            for k in kept {
                out.extend_from_slice(&[b as i64, c as i64, k as i64]);
            }
        }
    }
    let n = out.len() / 3;
    Ok(vec![Tensor::from_vec(vec![n, 3], out)?])
}

/// Bilinear sample of one `h x w` plane with RoiAlign's edge rules; returns the four corner
/// (weight, value) pairs so callers can average or take the max.
fn roi_bilinear(plane: &[f64], h: usize, w: usize, mut y: f64, mut x: f64) -> [(f64, f64); 4] {
    if y < -1.0 || y > h as f64 || x < -1.0 || x > w as f64 || h == 0 || w == 0 {
        return [(0.0, 0.0); 4];
    }
    y = y.max(0.0);
    x = x.max(0.0);
    let (mut yl, mut xl) = (y.floor() as usize, x.floor() as usize);
    let (yh, xh);
    if yl >= h - 1 {
        yl = h - 1;
        yh = h - 1;
        y = yl as f64;
    } else {
        yh = yl + 1;
    }
    if xl >= w - 1 {
        xl = w - 1;
        xh = w - 1;
        x = xl as f64;
    } else {
        xh = xl + 1;
    }
    let (ly, lx) = (y - yl as f64, x - xl as f64);
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    [
        (hy * hx, plane[yl * w + xl]),
        (hy * lx, plane[yl * w + xh]),
        (ly * hx, plane[yh * w + xl]),
        (ly * lx, plane[yh * w + xh]),
    ]
}

fn roi_align(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x_t = input(inputs, 0)?;
    let rois_t = input(inputs, 1)?;
    let idx_t = input(inputs, 2)?;
    let xs = x_t.shape();
    if xs.len() != 4 {
        bail!(Shape, "X must be [N, C, H, W], got {xs:?}");
    }
    let (n, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
    let rs = rois_t.shape();
    if rs.len() != 2 || rs[1] != 4 {
        bail!(Shape, "rois must be [num_rois, 4], got {rs:?}");
    }
    let nr = rs[0];
    if idx_t.shape() != [nr] {
        bail!(
            Shape,
            "batch_indices must be [{nr}], got {:?}",
            idx_t.shape()
        );
    }
    let x = float_vals(x_t, "X")?;
    let rois = float_vals(rois_t, "rois")?;
    let bidx = idx_t.to_i64_vec()?;
    let mode = ctx.string("mode", "avg")?;
    let is_max = match mode.as_str() {
        "avg" => false,
        "max" => true,
        m => bail!(Invalid, "unknown mode '{m}'"),
    };
    let oh = ctx.int("output_height", 1)?;
    let ow = ctx.int("output_width", 1)?;
    if oh <= 0 || ow <= 0 {
        bail!(Invalid, "output size must be positive, got {oh}x{ow}");
    }
    let (oh, ow) = (oh as usize, ow as usize);
    let ratio = ctx.int("sampling_ratio", 0)?.max(0) as usize;
    let scale = ctx.float("spatial_scale", 1.0)? as f64;
    let default_ctm = if ctx.opset >= 16 {
        "half_pixel"
    } else {
        "output_half_pixel"
    };
    let half_pixel = match ctx
        .string("coordinate_transformation_mode", default_ctm)?
        .as_str()
    {
        "half_pixel" => true,
        "output_half_pixel" => false,
        m => bail!(Invalid, "unknown coordinate_transformation_mode '{m}'"),
    };
    let off = if half_pixel { 0.5 } else { 0.0 };
    let mut out = vec![0.0f64; nr * c * oh * ow];
    for r in 0..nr {
        let b = bidx[r];
        if b < 0 || b as usize >= n {
            bail!(Input, "batch index {b} is outside 0..{n}");
        }
        let roi = &rois[r * 4..r * 4 + 4];
        let (sx, sy) = (roi[0] * scale - off, roi[1] * scale - off);
        let (mut rw, mut rh) = (roi[2] * scale - off - sx, roi[3] * scale - off - sy);
        if !half_pixel {
            rw = rw.max(1.0);
            rh = rh.max(1.0);
        }
        let (bh, bw) = (rh / oh as f64, rw / ow as f64);
        let gh = if ratio > 0 {
            ratio
        } else {
            (rh / oh as f64).ceil().max(0.0) as usize
        };
        let gw = if ratio > 0 {
            ratio
        } else {
            (rw / ow as f64).ceil().max(0.0) as usize
        };
        let count = (gh * gw).max(1) as f64;
        for ch in 0..c {
            let plane = &x[((b as usize) * c + ch) * h * w..((b as usize) * c + ch + 1) * h * w];
            for py in 0..oh {
                for px in 0..ow {
                    let mut acc = 0.0;
                    let mut mx: Option<f64> = None;
                    for iy in 0..gh {
                        let y = sy + py as f64 * bh + (iy as f64 + 0.5) * bh / gh as f64;
                        for ix in 0..gw {
                            let xx = sx + px as f64 * bw + (ix as f64 + 0.5) * bw / gw as f64;
                            let taps = roi_bilinear(plane, h, w, y, xx);
                            if is_max {
                                let v = taps.iter().map(|(wt, v)| wt * v).fold(f64::MIN, f64::max);
                                mx = Some(mx.map_or(v, |m| m.max(v)));
                            } else {
                                acc += taps.iter().map(|(wt, v)| wt * v).sum::<f64>();
                            }
                        }
                    }
                    out[((r * c + ch) * oh + py) * ow + px] = if is_max {
                        mx.unwrap_or(0.0)
                    } else {
                        acc / count
                    };
                }
            }
        }
    }
    Ok(vec![float_out(vec![nr, c, oh, ow], out, x_t.dtype())?])
}

fn max_unpool(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let idx_t = input(inputs, 1)?;
    if idx_t.shape() != x.shape() {
        bail!(
            Shape,
            "indices shape {:?} differs from X {:?}",
            idx_t.shape(),
            x.shape()
        );
    }
    let xs = x.shape();
    if xs.len() < 3 {
        bail!(Shape, "X must have rank >= 3, got {xs:?}");
    }
    let sp = xs.len() - 2;
    let Some(kernel) = ctx.ints("kernel_shape")? else {
        bail!(Invalid, "kernel_shape is required");
    };
    if kernel.len() != sp {
        bail!(
            Invalid,
            "kernel_shape has {} dims, X has {sp} spatial dims",
            kernel.len()
        );
    }
    let strides = ctx.ints("strides")?.unwrap_or_else(|| vec![1; sp]);
    let pads = ctx.ints("pads")?.unwrap_or_else(|| vec![0; 2 * sp]);
    if strides.len() != sp || pads.len() != 2 * sp {
        bail!(Invalid, "strides/pads do not match {sp} spatial dims");
    }
    // Indices address the default unpooled shape; an explicit output_shape only adds room
    // at the ends, so each index is re-based by its coordinates.
    let mut inferred = xs[..2].to_vec();
    for i in 0..sp {
        let d = (xs[2 + i] as i64 - 1) * strides[i] + kernel[i] - pads[i] - pads[sp + i];
        if d < 0 {
            bail!(Shape, "computed output dim {d} is negative");
        }
        inferred.push(d as usize);
    }
    let out_shape: Vec<usize> = match opt_input(inputs, 2) {
        Some(t) => t
            .to_i64_vec()?
            .into_iter()
            .map(|d| match usize::try_from(d) {
                Ok(v) => Ok(v),
                Err(_) => bail!(Shape, "bad output_shape dim {d}"),
            })
            .collect::<Result<_>>()?,
        None => inferred.clone(),
    };
    if out_shape.len() != xs.len() {
        bail!(
            Shape,
            "output_shape {out_shape:?} must have rank {}",
            xs.len()
        );
    }
    let total = smelt_tensor::checked_numel(&out_shape, smelt_tensor::max_elements())?;
    let idx = idx_t.to_i64_vec()?;
    let mut out = Data::zeros(x.dtype(), total);
    let in_total: usize = inferred.iter().product();
    let (in_str, out_str) = (strides_of(&inferred), strides_of(&out_shape));
    let dst_idx: Vec<usize> = idx
        .iter()
        .map(|&i| {
            if i < 0 || i as usize >= in_total {
                bail!(Input, "unpool index {i} is outside 0..{in_total}");
            }
            let mut rem = i as usize;
            let mut dst = 0;
            for d in 0..inferred.len() {
                let coord = rem / in_str[d];
                rem %= in_str[d];
                if coord >= out_shape[d] {
                    bail!(
                        Shape,
                        "unpool index {i} does not fit output_shape {out_shape:?}"
                    );
                }
                dst += coord * out_str[d];
            }
            Ok(dst)
        })
        .collect::<Result<_>>()?;
    scatter(x.data(), &mut out, &dst_idx)?;
    Ok(vec![Tensor::new(out_shape, out)?])
}

/// `dst[idx[i]] = src[i]` for same-dtype buffers.
fn scatter(src: &Data, dst: &mut Data, idx: &[usize]) -> Result<()> {
    smelt_tensor::dispatch!(src, T, v => {
        let Some(d) = <T as Element>::slice_mut(dst) else {
            bail!(Shape, "scatter dtype mismatch");
        };
        for (x, &i) in v.iter().zip(idx) {
            d[i] = *x;
        }
    });
    Ok(())
}

fn window(ctx: &OpCtx, inputs: &[Option<&Tensor>], f: fn(f64, f64) -> f64) -> Result<Vec<Tensor>> {
    let size = scalar_i64(inputs, 0, 0)?;
    if !(0..=1 << 28).contains(&size) {
        bail!(Input, "window size {size} is out of range");
    }
    let size = size as usize;
    let periodic = ctx.int("periodic", 1)? != 0;
    let code = ctx.int("output_datatype", 1)?;
    let Some(dtype) = DType::from_onnx(code as i32) else {
        bail!(Invalid, "unknown output_datatype {code}");
    };
    let denom = if periodic {
        size as f64
    } else {
        size as f64 - 1.0
    };
    let v: Vec<f64> = (0..size)
        .map(|i| f(std::f64::consts::TAU * i as f64 / denom, i as f64))
        .collect();
    Ok(vec![Tensor::from_vec(vec![size], v)?.cast(dtype)?])
}

fn hann_window(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    window(ctx, inputs, |a, _| 0.5 - 0.5 * a.cos())
}

fn hamming_window(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    const A0: f64 = 25.0 / 46.0;
    window(ctx, inputs, |a, _| A0 - (1.0 - A0) * a.cos())
}

fn blackman_window(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    window(ctx, inputs, |a, _| {
        0.42 - 0.5 * a.cos() + 0.08 * (2.0 * a).cos()
    })
}

fn det(_ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let s = x.shape();
    if s.len() < 2 || s[s.len() - 1] != s[s.len() - 2] {
        bail!(Shape, "Det needs [..., M, M], got {s:?}");
    }
    let m = s[s.len() - 1];
    let v = float_vals(x, "X")?;
    let batch: usize = s[..s.len() - 2].iter().product();
    let mut out = Vec::with_capacity(batch);
    for b in 0..batch {
        let mut a = v[b * m * m..(b + 1) * m * m].to_vec();
        out.push(lu_det(&mut a, m));
    }
    Ok(vec![float_out(s[..s.len() - 2].to_vec(), out, x.dtype())?])
}

/// Determinant by Gaussian elimination with partial pivoting (destroys `a`).
fn lu_det(a: &mut [f64], m: usize) -> f64 {
    let mut d = 1.0;
    for col in 0..m {
        let piv = (col..m)
            .max_by(|&i, &j| a[i * m + col].abs().total_cmp(&a[j * m + col].abs()))
            .unwrap_or(col);
        if a[piv * m + col] == 0.0 {
            return 0.0;
        }
        if piv != col {
            for k in 0..m {
                a.swap(piv * m + k, col * m + k);
            }
            d = -d;
        }
        let p = a[col * m + col];
        d *= p;
        for r in col + 1..m {
            let f = a[r * m + col] / p;
            for k in col..m {
                a[r * m + k] -= f * a[col * m + k];
            }
        }
    }
    d
}

fn center_crop_pad(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let target = input(inputs, 1)?.to_i64_vec()?;
    let rank = x.rank();
    let axes: Vec<usize> = match ctx.ints("axes")? {
        Some(a) => a
            .iter()
            .map(|&a| norm_axis(a, rank))
            .collect::<Result<_>>()?,
        None => (0..rank).collect(),
    };
    if axes.len() != target.len() {
        bail!(
            Shape,
            "shape has {} values for {} axes",
            target.len(),
            axes.len()
        );
    }
    let mut out_shape = x.shape().to_vec();
    for (&a, &t) in axes.iter().zip(&target) {
        if t < 0 {
            bail!(Shape, "negative target size {t}");
        }
        out_shape[a] = t as usize;
    }
    // Per axis: output index o reads input index o + shift (shift < 0 pads, > 0 crops).
    let shift: Vec<i64> = (0..rank)
        .map(|a| {
            let (i, o) = (x.shape()[a] as i64, out_shape[a] as i64);
            if i >= o {
                (i - o) / 2
            } else {
                -((o - i) / 2)
            }
        })
        .collect();
    let total = smelt_tensor::checked_numel(&out_shape, smelt_tensor::max_elements())?;
    let (in_str, out_str) = (strides_of(x.shape()), strides_of(&out_shape));
    let (mut src, mut dst) = (Vec::new(), Vec::new());
    'outer: for o in 0..total {
        let mut rem = o;
        let mut s = 0usize;
        for a in 0..rank {
            let c = (rem / out_str[a]) as i64;
            rem %= out_str[a];
            let ic = c + shift[a];
            if ic < 0 || ic >= x.shape()[a] as i64 {
                continue 'outer;
            }
            s += ic as usize * in_str[a];
        }
        src.push(s);
        dst.push(o);
    }
    let mut out = Data::zeros(x.dtype(), total);
    scatter(&x.data().gather(src.into_iter()), &mut out, &dst)?;
    Ok(vec![Tensor::new(out_shape, out)?])
}

/// Odometer over a multi-index with the given extents; false once it wraps.
fn next_index(idx: &mut [usize], dims: &[usize]) -> bool {
    for i in (0..idx.len()).rev() {
        idx[i] += 1;
        if idx[i] < dims[i] {
            return true;
        }
        idx[i] = 0;
    }
    false
}

fn col2im(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let to_usize = |v: Vec<i64>, what: &str| -> Result<Vec<usize>> {
        v.into_iter()
            .map(|d| match usize::try_from(d) {
                Ok(u) if u > 0 => Ok(u),
                _ => bail!(Shape, "{what} has a non-positive value {d}"),
            })
            .collect()
    };
    let image = to_usize(input(inputs, 1)?.to_i64_vec()?, "image_shape")?;
    let block = to_usize(input(inputs, 2)?.to_i64_vec()?, "block_shape")?;
    let k = image.len();
    if block.len() != k {
        bail!(Shape, "image_shape and block_shape differ in length");
    }
    let dil = ctx.ints("dilations")?.unwrap_or_else(|| vec![1; k]);
    let strides = ctx.ints("strides")?.unwrap_or_else(|| vec![1; k]);
    let pads = ctx.ints("pads")?.unwrap_or_else(|| vec![0; 2 * k]);
    if dil.len() != k || strides.len() != k || pads.len() != 2 * k {
        bail!(
            Invalid,
            "dilations/strides/pads do not match {k} spatial dims"
        );
    }
    let xs = x.shape();
    let bprod: usize = block.iter().product();
    if xs.len() != 3 || xs[1] % bprod != 0 {
        bail!(Shape, "input must be [N, C*{bprod}, L], got {xs:?}");
    }
    let (n, c, l) = (xs[0], xs[1] / bprod, xs[2]);
    let mut nblocks = Vec::with_capacity(k);
    for i in 0..k {
        let span = dil[i] * (block[i] as i64 - 1) + 1;
        let room = image[i] as i64 + pads[i] + pads[k + i] - span;
        if room < 0 || strides[i] <= 0 || dil[i] <= 0 {
            bail!(Shape, "block does not fit the padded image on dim {i}");
        }
        nblocks.push((room / strides[i] + 1) as usize);
    }
    if nblocks.iter().product::<usize>() != l {
        bail!(
            Shape,
            "L is {l}, but the geometry gives {} blocks",
            nblocks.iter().product::<usize>()
        );
    }
    let v = float_vals(x, "input")?;
    let ipix: usize = image.iter().product();
    let istr = strides_of(&image);
    let mut out = vec![0.0f64; n * c * ipix];
    for ni in 0..n {
        for ci in 0..c {
            let mut bi = vec![0usize; k];
            for b in 0..bprod {
                let row = (ni * c + ci) * bprod + b;
                let mut li = vec![0usize; k];
                for col in 0..l {
                    let mut pos = 0usize;
                    let mut inside = true;
                    for d in 0..k {
                        let p = li[d] as i64 * strides[d] - pads[d] + bi[d] as i64 * dil[d];
                        if p < 0 || p >= image[d] as i64 {
                            inside = false;
                            break;
                        }
                        pos += p as usize * istr[d];
                    }
                    if inside {
                        out[(ni * c + ci) * ipix + pos] += v[row * l + col];
                    }
                    next_index(&mut li, &nblocks);
                }
                next_index(&mut bi, &block);
            }
        }
    }
    let mut shape = vec![n, c];
    shape.extend_from_slice(&image);
    Ok(vec![float_out(shape, out, x.dtype())?])
}

fn affine_grid(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let theta_t = input(inputs, 0)?;
    let size = input(inputs, 1)?.to_i64_vec()?;
    let align = ctx.int("align_corners", 0)? != 0;
    let sp = match size.len() {
        4 => 2,
        5 => 3,
        r => bail!(Shape, "size must have 4 or 5 values, got {r}"),
    };
    let n = size[0].max(0) as usize;
    if theta_t.shape() != [n, sp, sp + 1] {
        bail!(
            Shape,
            "theta has shape {:?}, expected [{n}, {sp}, {}]",
            theta_t.shape(),
            sp + 1
        );
    }
    let dims: Vec<usize> = size[2..].iter().map(|&d| d.max(0) as usize).collect();
    let theta = float_vals(theta_t, "theta")?;
    // Normalised coordinates along one axis of extent `len`.
    let coords = |len: usize| -> Vec<f64> {
        (0..len)
            .map(|i| {
                if align {
                    if len == 1 {
                        -1.0
                    } else {
                        -1.0 + 2.0 * i as f64 / (len - 1) as f64
                    }
                } else {
                    -1.0 + (2 * i + 1) as f64 / len as f64
                }
            })
            .collect()
    };
    // dims are (H, W) or (D, H, W); grid components run x, y(, z), i.e. reversed.
    let axes: Vec<Vec<f64>> = dims.iter().map(|&d| coords(d)).collect();
    let pix: usize = dims.iter().product();
    let mut out = Vec::with_capacity(n * pix * sp);
    for ni in 0..n {
        let th = &theta[ni * sp * (sp + 1)..(ni + 1) * sp * (sp + 1)];
        let mut idx = vec![0usize; sp];
        for _ in 0..pix {
            let mut p: Vec<f64> = (0..sp).map(|a| axes[sp - 1 - a][idx[sp - 1 - a]]).collect();
            p.push(1.0);
            for r in 0..sp {
                out.push((0..=sp).map(|c| th[r * (sp + 1) + c] * p[c]).sum());
            }
            next_index(&mut idx, &dims);
        }
    }
    let mut shape = vec![n];
    shape.extend_from_slice(&dims);
    shape.push(sp);
    Ok(vec![float_out(shape, out, theta_t.dtype())?])
}

/// Reads a `[..., 1|2]` float tensor as (re, im) pairs.
fn complex_vals(t: &Tensor, what: &str) -> Result<Vec<(f64, f64)>> {
    let v = float_vals(t, what)?;
    match t.shape().last() {
        Some(1) => Ok(v.into_iter().map(|r| (r, 0.0)).collect()),
        Some(2) => Ok(v.chunks_exact(2).map(|c| (c[0], c[1])).collect()),
        _ => bail!(
            Shape,
            "{what} must end in a dimension of 1 (real) or 2 (complex), got {:?}",
            t.shape()
        ),
    }
}

/// Naive DFT of `x` (zero-padded or truncated to `len`), returning the first `keep` bins.
fn dft_1d(x: &[(f64, f64)], len: usize, keep: usize, inverse: bool, out: &mut Vec<(f64, f64)>) {
    let sign = if inverse { 1.0 } else { -1.0 };
    let scale = if inverse { 1.0 / len as f64 } else { 1.0 };
    for k in 0..keep {
        let (mut re, mut im) = (0.0, 0.0);
        for (j, &(xr, xi)) in x.iter().take(len).enumerate() {
            // Reduce k*j mod len first so the angle stays small and accurate.
            let a = sign * std::f64::consts::TAU * ((k * j) % len) as f64 / len as f64;
            let (s, c) = a.sin_cos();
            re += xr * c - xi * s;
            im += xr * s + xi * c;
        }
        out.push((re * scale, im * scale));
    }
}

fn dft(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x_t = input(inputs, 0)?;
    let rank = x_t.rank();
    if rank < 2 {
        bail!(Shape, "input must have rank >= 2, got {:?}", x_t.shape());
    }
    let axis = if ctx.opset >= 20 {
        scalar_i64(inputs, 2, -2)?
    } else {
        ctx.int("axis", 1)?
    };
    let axis = norm_axis(axis, rank)?;
    if axis == rank - 1 {
        bail!(Invalid, "axis must not be the trailing complex dimension");
    }
    let n = x_t.shape()[axis];
    let inverse = ctx.int("inverse", 0)? != 0;
    let onesided = ctx.int("onesided", 0)? != 0;
    // Inverse + onesided is an inverse real FFT: the input holds the first n bins of a
    // Hermitian spectrum of length 2(n-1) (or dft_length) and the output is real.
    let irfft = inverse && onesided;
    let default_len = if irfft { 2 * n.saturating_sub(1) } else { n };
    let len = scalar_i64(inputs, 1, default_len as i64)?;
    if len <= 0 {
        bail!(Input, "dft_length must be positive, got {len}");
    }
    let len = len as usize;
    let keep = if irfft || !onesided { len } else { len / 2 + 1 };
    let x = complex_vals(x_t, "input")?;
    let outer: usize = x_t.shape()[..axis].iter().product();
    let inner: usize = x_t.shape()[axis + 1..rank - 1].iter().product();
    let mut out = vec![(0.0, 0.0); outer * keep * inner];
    let mut line = Vec::with_capacity(n.max(len));
    let mut res = Vec::with_capacity(keep);
    for o in 0..outer {
        for i in 0..inner {
            line.clear();
            line.extend((0..n).map(|j| x[(o * n + j) * inner + i]));
            if irfft {
                line.truncate(len / 2 + 1);
                line.resize(len / 2 + 1, (0.0, 0.0));
                for k in len / 2 + 1..len {
                    let (r, im) = line[len - k];
                    line.push((r, -im));
                }
            }
            res.clear();
            dft_1d(&line, len, keep, inverse, &mut res);
            for (k, &v) in res.iter().enumerate() {
                out[(o * keep + k) * inner + i] = v;
            }
        }
    }
    let mut shape = x_t.shape().to_vec();
    shape[axis] = keep;
    let flat = if irfft {
        shape[rank - 1] = 1;
        out.into_iter().map(|(r, _)| r).collect()
    } else {
        shape[rank - 1] = 2;
        out.into_iter().flat_map(|(r, i)| [r, i]).collect()
    };
    Ok(vec![float_out(shape, flat, x_t.dtype())?])
}

fn stft(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let s_t = input(inputs, 0)?;
    if s_t.rank() != 3 {
        bail!(
            Shape,
            "signal must be [batch, length, 1|2], got {:?}",
            s_t.shape()
        );
    }
    let (batch, slen) = (s_t.shape()[0], s_t.shape()[1]);
    let sig = complex_vals(s_t, "signal")?;
    let step = scalar_i64(inputs, 1, 0)?;
    if step <= 0 {
        bail!(Input, "frame_step must be positive, got {step}");
    }
    let window = opt_input(inputs, 2)
        .map(|t| float_vals(t, "window"))
        .transpose()?;
    let flen = match (opt_input(inputs, 3), &window) {
        (Some(_), _) => scalar_i64(inputs, 3, 0)?,
        (None, Some(w)) => w.len() as i64,
        (None, None) => bail!(Invalid, "STFT needs a window or a frame_length"),
    };
    if flen <= 0 || flen as usize > slen {
        bail!(
            Input,
            "frame_length {flen} does not fit a signal of length {slen}"
        );
    }
    let flen = flen as usize;
    if let Some(w) = &window {
        if w.len() != flen {
            bail!(
                Shape,
                "window has {} values, frame_length is {flen}",
                w.len()
            );
        }
    }
    let step = step as usize;
    let frames = (slen - flen) / step + 1;
    let onesided = ctx.int("onesided", 1)? != 0;
    let bins = if onesided { flen / 2 + 1 } else { flen };
    let mut out = Vec::with_capacity(batch * frames * bins * 2);
    let mut frame = Vec::with_capacity(flen);
    let mut res = Vec::with_capacity(bins);
    for b in 0..batch {
        for f in 0..frames {
            frame.clear();
            for j in 0..flen {
                let (r, i) = sig[b * slen + f * step + j];
                let w = window.as_ref().map_or(1.0, |w| w[j]);
                frame.push((r * w, i * w));
            }
            res.clear();
            dft_1d(&frame, flen, bins, false, &mut res);
            out.extend(res.iter().flat_map(|&(r, i)| [r, i]));
        }
    }
    Ok(vec![float_out(
        vec![batch, frames, bins, 2],
        out,
        s_t.dtype(),
    )?])
}

fn mel_weight_matrix(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let mels = scalar_i64(inputs, 0, 0)?;
    let dft_len = scalar_i64(inputs, 1, 0)?;
    let rate = scalar_i64(inputs, 2, 0)?;
    let lo = scalar_f64(inputs, 3, 0.0)?;
    let hi = scalar_f64(inputs, 4, 0.0)?;
    if mels <= 0 || dft_len <= 0 || rate <= 0 || mels > 1 << 20 || dft_len > 1 << 24 {
        bail!(
            Input,
            "num_mel_bins, dft_length and sample_rate must be positive and sane"
        );
    }
    let code = ctx.int("output_datatype", 1)?;
    let Some(dtype) = DType::from_onnx(code as i32) else {
        bail!(Invalid, "unknown output_datatype {code}");
    };
    let (mels, dft_len) = (mels as usize, dft_len as usize);
    let nspec = dft_len / 2 + 1;
    let to_mel = |hz: f64| 2595.0 * (1.0 + hz / 700.0).log10();
    let (lm, hm) = (to_mel(lo), to_mel(hi));
    // The reference divides by the number of edges (mels + 2), not the gaps between them.
    let step = (hm - lm) / (mels + 2) as f64;
    // Edge frequencies of the triangles, as spectrogram bin indices (floored like the spec).
    let edges: Vec<i64> = (0..mels + 2)
        .map(|i| {
            let hz = 700.0 * (10f64.powf((i as f64 * step + lm) / 2595.0) - 1.0);
            (((dft_len + 1) as f64 * hz) / rate as f64).floor() as i64
        })
        .collect();
    let mut out = vec![0.0f64; nspec * mels];
    let mut set = |j: i64, i: usize, v: f64| -> Result<()> {
        if j < 0 || j as usize >= nspec {
            bail!(
                Input,
                "mel band edge {j} falls outside the {nspec} spectrogram bins"
            );
        }
        out[j as usize * mels + i] = v;
        Ok(())
    };
    for i in 0..mels {
        let (l, c, h) = (edges[i], edges[i + 1], edges[i + 2]);
        if c == l {
            set(c, i, 1.0)?;
        } else {
            for j in l..=c {
                set(j, i, (j - l) as f64 / (c - l) as f64)?;
            }
        }
        if h > c {
            for j in c..h {
                set(j, i, (h - j) as f64 / (h - c) as f64)?;
            }
        }
    }
    Ok(vec![Tensor::from_vec(vec![nspec, mels], out)?.cast(dtype)?])
}

/// Folds `x` back into `[lo, hi]` by mirroring at the ends (GridSample's reflection padding).
fn reflect(x: f64, lo: f64, hi: f64) -> f64 {
    let range = hi - lo;
    if range <= 0.0 {
        return lo;
    }
    let (d, from_lo) = if x < lo {
        (lo - x, true)
    } else if x > hi {
        (x - hi, false)
    } else {
        return x;
    };
    let flips = (d / range).floor();
    let r = d - flips * range;
    let even = flips as i64 % 2 == 0;
    match (from_lo, even) {
        (true, true) | (false, false) => lo + r,
        _ => hi - r,
    }
}

fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let w0 = ((A * (t + 1.0) - 5.0 * A) * (t + 1.0) + 8.0 * A) * (t + 1.0) - 4.0 * A;
    let w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0;
    let u = 1.0 - t;
    let w2 = ((A + 2.0) * u - (A + 3.0)) * u * u + 1.0;
    [w0, w1, w2, 1.0 - w0 - w1 - w2]
}

#[derive(Clone, Copy, PartialEq)]
enum Pad {
    Zeros,
    Border,
    Reflection,
}

fn grid_sample(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x_t = input(inputs, 0)?;
    let g_t = input(inputs, 1)?;
    let xs = x_t.shape();
    let sp = xs.len().saturating_sub(2);
    if !(1..=3).contains(&sp) {
        bail!(
            Shape,
            "X must be [N, C, spatial...] with 1-3 spatial dims, got {xs:?}"
        );
    }
    let gs = g_t.shape();
    if gs.len() != sp + 2 || gs[0] != xs[0] || gs[sp + 1] != sp {
        bail!(
            Shape,
            "grid has shape {gs:?}; expected [{}, out..., {sp}]",
            xs[0]
        );
    }
    let mode = ctx.string(
        "mode",
        if ctx.opset >= 20 {
            "linear"
        } else {
            "bilinear"
        },
    )?;
    #[derive(PartialEq)]
    enum Mode {
        Linear,
        Nearest,
        Cubic,
    }
    let mode = match mode.as_str() {
        "linear" | "bilinear" => Mode::Linear,
        "nearest" => Mode::Nearest,
        "cubic" | "bicubic" if sp == 2 => Mode::Cubic,
        m => bail!(Unsupported, "GridSample mode '{m}' with {sp} spatial dims"),
    };
    let pad = match ctx.string("padding_mode", "zeros")?.as_str() {
        "zeros" => Pad::Zeros,
        "border" => Pad::Border,
        "reflection" => Pad::Reflection,
        p => bail!(Invalid, "unknown padding_mode '{p}'"),
    };
    let align = ctx.int("align_corners", 0)? != 0;
    let (n, c) = (xs[0], xs[1]);
    let dims = &xs[2..];
    let out_dims = &gs[1..sp + 1];
    let opix: usize = out_dims.iter().product();
    let ipix: usize = dims.iter().product();
    let istr = strides_of(dims);
    let x = float_vals(x_t, "X")?;
    let grid = float_vals(g_t, "grid")?;
    let mut out = vec![0.0f64; n * c * opix];
    // Per-axis taps: (index if it reads a real pixel, weight).
    let mut axis_taps: Vec<Vec<(Option<usize>, f64)>> = vec![Vec::new(); sp];
    let mut taps: Vec<(usize, f64)> = Vec::new();
    for ni in 0..n {
        for p in 0..opix {
            let g = &grid[(ni * opix + p) * sp..(ni * opix + p + 1) * sp];
            for a in 0..sp {
                let size = dims[a] as f64;
                let nx = g[sp - 1 - a];
                let mut v = if align {
                    (nx + 1.0) / 2.0 * (size - 1.0)
                } else {
                    ((nx + 1.0) * size - 1.0) / 2.0
                };
                let (lo, hi) = if align {
                    (0.0, size - 1.0)
                } else {
                    (-0.5, size - 0.5)
                };
                // Index-level padding for a tap at integer position i.
                let fetch = |i: i64| -> Option<usize> {
                    let last = dims[a] as i64 - 1;
                    match pad {
                        Pad::Zeros => (0..=last).contains(&i).then_some(i as usize),
                        Pad::Border => Some(i.clamp(0, last.max(0)) as usize),
                        Pad::Reflection => Some(
                            (reflect(i as f64, lo, hi).round() as i64).clamp(0, last.max(0))
                                as usize,
                        ),
                    }
                };
                let t = &mut axis_taps[a];
                t.clear();
                if mode != Mode::Cubic {
                    // Linear and nearest move the coordinate itself inside the image first.
                    match pad {
                        Pad::Zeros => {}
                        Pad::Border => v = v.clamp(0.0, size - 1.0),
                        Pad::Reflection => v = reflect(v, lo, hi).clamp(0.0, size - 1.0),
                    }
                }
                if !v.is_finite() {
                    continue;
                }
                match mode {
                    Mode::Nearest => t.push((fetch(v.round_ties_even() as i64), 1.0)),
                    Mode::Linear => {
                        let f = v.floor();
                        t.push((fetch(f as i64), 1.0 - (v - f)));
                        t.push((fetch(f as i64 + 1), v - f));
                    }
                    Mode::Cubic => {
                        let f = v.floor();
                        for (k, w) in cubic_weights(v - f).into_iter().enumerate() {
                            t.push((fetch(f as i64 - 1 + k as i64), w));
                        }
                    }
                }
            }
            taps.clear();
            if axis_taps.iter().all(|t| !t.is_empty()) {
                let lens: Vec<usize> = axis_taps.iter().map(Vec::len).collect();
                let mut k = vec![0usize; sp];
                loop {
                    let mut off = Some(0usize);
                    let mut w = 1.0;
                    for a in 0..sp {
                        let (i, wa) = axis_taps[a][k[a]];
                        off = off.zip(i).map(|(o, i)| o + i * istr[a]);
                        w *= wa;
                    }
                    if let Some(o) = off {
                        taps.push((o, w));
                    }
                    if !next_index(&mut k, &lens) {
                        break;
                    }
                }
            }
            for ci in 0..c {
                let plane = &x[(ni * c + ci) * ipix..(ni * c + ci + 1) * ipix];
                out[(ni * c + ci) * opix + p] = taps.iter().map(|&(o, w)| plane[o] * w).sum();
            }
        }
    }
    let mut shape = vec![n, c];
    shape.extend_from_slice(out_dims);
    Ok(vec![float_out(shape, out, x_t.dtype())?])
}

fn string_normalizer(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let Data::Str(words) = x.data() else {
        bail!(
            Shape,
            "StringNormalizer needs a string tensor, got {}",
            x.dtype()
        );
    };
    let two_dim = match x.shape() {
        [_] => false,
        [1, _] => true,
        s => bail!(Shape, "input must be [C] or [1, C], got {s:?}"),
    };
    let case_sensitive = ctx.int("is_case_sensitive", 0)? != 0;
    let stop: Vec<String> = match ctx.node.attrs.get("stopwords") {
        None => Vec::new(),
        Some(Attr::Strings(v)) => v
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
        Some(_) => bail!(Invalid, "attribute 'stopwords' is not a list of strings"),
    };
    let fold = |s: &str| {
        if case_sensitive {
            s.to_string()
        } else {
            s.to_lowercase()
        }
    };
    let stop: Vec<String> = stop.iter().map(|s| fold(s)).collect();
    let action = ctx.string("case_change_action", "NONE")?;
    let mut kept: Vec<String> = Vec::with_capacity(words.len());
    for w in words {
        if stop.contains(&fold(w)) {
            continue;
        }
        kept.push(match action.as_str() {
            "NONE" => w.clone(),
            "LOWER" => w.to_lowercase(),
            "UPPER" => w.to_uppercase(),
            a => bail!(Invalid, "unknown case_change_action '{a}'"),
        });
    }
    // Everything filtered out: ONNX keeps a single empty string rather than an empty tensor.
    if kept.is_empty() {
        kept.push(String::new());
    }
    let shape = if two_dim {
        vec![1, kept.len()]
    } else {
        vec![kept.len()]
    };
    Ok(vec![Tensor::new(shape, Data::Str(kept))?])
}

#[cfg(test)]
mod tests {
    use super::super::{lookup, OpCtx};
    use smelt_ir::{Attr, Node};
    use smelt_tensor::{Data, Result, Tensor};

    fn run_at(
        op: &str,
        opset: i64,
        attrs: &[(&str, Attr)],
        inputs: &[Option<&Tensor>],
    ) -> Result<Vec<Tensor>> {
        let mut node = Node::new(op, "t", &[], &[]);
        for (k, v) in attrs {
            node = node.with_attr(k, v.clone());
        }
        let ctx = OpCtx::new(&node, opset);
        lookup("", op).expect("registered")(&ctx, inputs)
    }

    fn run(op: &str, attrs: &[(&str, Attr)], inputs: &[&Tensor]) -> Tensor {
        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        run_at(op, 20, attrs, &ins).unwrap().remove(0)
    }

    fn f(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    fn i(shape: &[usize], v: &[i64]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    fn s(v: &str) -> Attr {
        Attr::String(v.as_bytes().to_vec())
    }

    fn close(got: &Tensor, shape: &[usize], want: &[f32]) {
        assert_eq!(got.shape(), shape);
        let g = got.to_f32_vec().unwrap();
        assert_eq!(g.len(), want.len());
        for (k, (a, b)) in g.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() < 1e-5,
                "element {k}: got {a}, want {b} (all: {g:?})"
            );
        }
    }

    #[test]
    fn nll_loss_reductions_weights_and_ignore() {
        let x = f(&[2, 2], &[-1.0, -2.0, -3.0, -4.0]);
        let tgt = i(&[2], &[0, 1]);
        let w = f(&[2], &[1.0, 2.0]);
        let none = run(
            "NegativeLogLikelihoodLoss",
            &[("reduction", s("none"))],
            &[&x, &tgt, &w],
        );
        close(&none, &[2], &[1.0, 8.0]);
        // mean divides by the sum of the picked weights: 9 / 3.
        close(
            &run("NegativeLogLikelihoodLoss", &[], &[&x, &tgt, &w]),
            &[],
            &[3.0],
        );
        let ii = [("ignore_index", Attr::Int(1))];
        close(
            &run("NegativeLogLikelihoodLoss", &ii, &[&x, &tgt, &w]),
            &[],
            &[1.0],
        );
        let bad = i(&[2], &[0, 2]);
        assert!(run_at(
            "NegativeLogLikelihoodLoss",
            20,
            &[],
            &[Some(&x), Some(&bad)]
        )
        .is_err());
    }

    #[test]
    fn softmax_cross_entropy_with_log_prob() {
        let x = f(&[1, 2], &[0.0, 0.0]);
        let out = run_at(
            "SoftmaxCrossEntropyLoss",
            20,
            &[("reduction", s("sum"))],
            &[Some(&x), Some(&i(&[1], &[1]))],
        )
        .unwrap();
        let ln2 = std::f32::consts::LN_2;
        close(&out[0], &[], &[ln2]);
        close(&out[1], &[1, 2], &[-ln2, -ln2]);
    }

    #[test]
    fn nms_suppresses_overlaps() {
        let boxes = f(
            &[1, 3, 4],
            &[0.0, 0.0, 1.0, 1.0, 0.0, 0.1, 1.0, 1.1, 0.0, 2.0, 1.0, 3.0],
        );
        let scores = f(&[1, 1, 3], &[0.9, 0.8, 0.7]);
        let out = run(
            "NonMaxSuppression",
            &[],
            &[&boxes, &scores, &i(&[1], &[3]), &f(&[1], &[0.5])],
        );
        assert_eq!(out.shape(), [2, 3]);
        assert_eq!(out.as_slice::<i64>().unwrap(), [0, 0, 0, 0, 0, 2]);
        // A score threshold of 0.75 drops the third box too.
        let out = run(
            "NonMaxSuppression",
            &[],
            &[
                &boxes,
                &scores,
                &i(&[1], &[3]),
                &f(&[1], &[0.5]),
                &f(&[1], &[0.75]),
            ],
        );
        assert_eq!(out.as_slice::<i64>().unwrap(), [0, 0, 0]);
    }

    #[test]
    fn roi_align_average() {
        let x = f(&[1, 1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let rois = f(&[1, 4], &[0.0, 0.0, 2.0, 2.0]);
        let attrs = [
            ("sampling_ratio", Attr::Int(2)),
            ("coordinate_transformation_mode", s("output_half_pixel")),
        ];
        // Samples at 0.5/1.5 per axis give 2.5, 3, 3.5, 4 (edge samples clamp to the last row/col).
        close(
            &run("RoiAlign", &attrs, &[&x, &rois, &i(&[1], &[0])]),
            &[1, 1, 1, 1],
            &[3.25],
        );
    }

    #[test]
    fn max_unpool_scatters() {
        let x = f(&[1, 1, 1, 2], &[5.0, 6.0]);
        let idx = i(&[1, 1, 1, 2], &[1, 3]);
        let attrs = [
            ("kernel_shape", Attr::Ints(vec![1, 2])),
            ("strides", Attr::Ints(vec![1, 2])),
        ];
        close(
            &run("MaxUnpool", &attrs, &[&x, &idx]),
            &[1, 1, 1, 4],
            &[0.0, 5.0, 0.0, 6.0],
        );
        // A larger output_shape keeps each value at its coordinates.
        let shape = i(&[4], &[1, 1, 2, 5]);
        close(
            &run("MaxUnpool", &attrs, &[&x, &idx, &shape]),
            &[1, 1, 2, 5],
            &[0.0, 5.0, 0.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        );
    }

    #[test]
    fn windows() {
        let four = i(&[], &[4]);
        close(
            &run("HannWindow", &[], &[&four]),
            &[4],
            &[0.0, 0.5, 1.0, 0.5],
        );
        let three = i(&[], &[3]);
        close(
            &run("HannWindow", &[("periodic", Attr::Int(0))], &[&three]),
            &[3],
            &[0.0, 1.0, 0.0],
        );
        let two = i(&[], &[2]);
        close(
            &run("HammingWindow", &[], &[&two]),
            &[2],
            &[2.0 / 23.0, 1.0],
        );
        close(&run("BlackmanWindow", &[], &[&two]), &[2], &[0.0, 1.0]);
    }

    #[test]
    fn determinants() {
        let x = f(
            &[3, 2, 2],
            &[1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 1.0, 0.0, 2.0, 4.0, 1.0, 2.0],
        );
        close(&run("Det", &[], &[&x]), &[3], &[-2.0, -1.0, 0.0]);
        let d = f(&[3, 3], &[2.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 4.0]);
        close(&run("Det", &[], &[&d]), &[], &[24.0]);
    }

    #[test]
    fn center_crop_and_pad() {
        let x = f(&[5], &[1.0, 2.0, 3.0, 4.0, 5.0]);
        close(
            &run("CenterCropPad", &[], &[&x, &i(&[1], &[3])]),
            &[3],
            &[2.0, 3.0, 4.0],
        );
        let y = f(&[1, 2], &[1.0, 2.0]);
        let attrs = [("axes", Attr::Ints(vec![-1]))];
        close(
            &run("CenterCropPad", &attrs, &[&y, &i(&[1], &[4])]),
            &[1, 4],
            &[0.0, 1.0, 2.0, 0.0],
        );
    }

    #[test]
    fn col2im_sums_overlaps() {
        // Two 1x2 blocks over a 1x3 image overlap at the middle pixel.
        let x = f(&[1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let out = run("Col2Im", &[], &[&x, &i(&[2], &[1, 3]), &i(&[2], &[1, 2])]);
        close(&out, &[1, 1, 1, 3], &[1.0, 5.0, 4.0]);
    }

    #[test]
    fn affine_grid_identity() {
        let theta = f(&[1, 2, 3], &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        let size = i(&[4], &[1, 1, 2, 2]);
        let aligned = run(
            "AffineGrid",
            &[("align_corners", Attr::Int(1))],
            &[&theta, &size],
        );
        close(
            &aligned,
            &[1, 2, 2, 2],
            &[-1.0, -1.0, 1.0, -1.0, -1.0, 1.0, 1.0, 1.0],
        );
        let centred = run("AffineGrid", &[], &[&theta, &size]);
        close(
            &centred,
            &[1, 2, 2, 2],
            &[-0.5, -0.5, 0.5, -0.5, -0.5, 0.5, 0.5, 0.5],
        );
    }

    #[test]
    fn grid_sample_modes() {
        let x = f(&[1, 1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let centre = f(&[1, 1, 1, 2], &[0.0, 0.0]);
        close(
            &run("GridSample", &[], &[&x, &centre]),
            &[1, 1, 1, 1],
            &[2.5],
        );
        // Ties round to even: pixel (0, 0).
        close(
            &run("GridSample", &[("mode", s("nearest"))], &[&x, &centre]),
            &[1, 1, 1, 1],
            &[1.0],
        );
        // x = 3 lies outside: zeros gives 0, border clamps to column 1 (top row -> 2).
        let outside = f(&[1, 1, 1, 2], &[3.0, -1.0]);
        let al = ("align_corners", Attr::Int(1));
        close(
            &run("GridSample", std::slice::from_ref(&al), &[&x, &outside]),
            &[1, 1, 1, 1],
            &[0.0],
        );
        close(
            &run(
                "GridSample",
                &[al, ("padding_mode", s("border"))],
                &[&x, &outside],
            ),
            &[1, 1, 1, 1],
            &[2.0],
        );
    }

    #[test]
    fn dft_forward_inverse_onesided() {
        let x = f(&[1, 4, 1], &[1.0, 2.0, 3.0, 4.0]);
        let out = run("DFT", &[], &[&x]);
        let spec = [10.0, 0.0, -2.0, 2.0, -2.0, 0.0, -2.0, -2.0];
        close(&out, &[1, 4, 2], &spec);
        let back = run(
            "DFT",
            &[("inverse", Attr::Int(1))],
            &[&f(&[1, 4, 2], &spec)],
        );
        close(&back, &[1, 4, 2], &[1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0]);
        let half = run("DFT", &[("onesided", Attr::Int(1))], &[&x]);
        close(&half, &[1, 3, 2], &spec[..6]);
        // Inverse real FFT from the three onesided bins restores the real signal.
        let attrs = [("inverse", Attr::Int(1)), ("onesided", Attr::Int(1))];
        close(
            &run("DFT", &attrs, &[&f(&[1, 3, 2], &spec[..6])]),
            &[1, 4, 1],
            &[1.0, 2.0, 3.0, 4.0],
        );
    }

    #[test]
    fn stft_frames() {
        let sig = f(&[1, 4, 1], &[1.0, 2.0, 3.0, 4.0]);
        let out = run_at(
            "STFT",
            17,
            &[],
            &[Some(&sig), Some(&i(&[], &[2])), None, Some(&i(&[], &[2]))],
        )
        .unwrap();
        close(
            &out[0],
            &[1, 2, 2, 2],
            &[3.0, 0.0, -1.0, 0.0, 7.0, 0.0, -1.0, 0.0],
        );
    }

    #[test]
    fn mel_weight_matrix_single_band() {
        // Band edges land on bins 0, 1, 2 of the 5 spectrogram bins.
        let ins = [
            i(&[], &[1]),
            i(&[], &[8]),
            i(&[], &[8]),
            f(&[], &[0.0]),
            f(&[], &[3.5]),
        ];
        let refs: Vec<&Tensor> = ins.iter().collect();
        close(
            &run("MelWeightMatrix", &[], &refs),
            &[5, 1],
            &[0.0, 1.0, 0.0, 0.0, 0.0],
        );
    }

    #[test]
    fn string_normalizer_filters_and_uppercases() {
        let x = Tensor::new(vec![2], Data::Str(vec!["Monday".into(), "tuesday".into()])).unwrap();
        let attrs = [
            ("stopwords", Attr::Strings(vec![b"monday".to_vec()])),
            ("case_change_action", s("UPPER")),
        ];
        let out = run("StringNormalizer", &attrs, &[&x]);
        assert_eq!(out.data(), &Data::Str(vec!["TUESDAY".into()]));
        let sensitive = [
            ("stopwords", Attr::Strings(vec![b"monday".to_vec()])),
            ("is_case_sensitive", Attr::Int(1)),
        ];
        assert_eq!(run("StringNormalizer", &sensitive, &[&x]).shape(), [2]);
    }
}
