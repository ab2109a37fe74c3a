//! Ops that rearrange elements by shape alone: Transpose, Concat, Split, Slice, Expand, Tile, Pad,
//! DepthToSpace, SpaceToDepth, Trilu, ReverseSequence.

use super::{
    bounded, concat_runs, copy_runs, gather_lists, permute, scalar_i64, strided_copy, to_dim,
};
use crate::ops::{input, norm_axis, opt_input, OpCtx, Registry};
use smelt_tensor::{
    bail, broadcast_shapes, broadcast_strides, dispatch, strides_of, Data, Element, Result, Tensor,
};

pub(super) fn register(r: &mut Registry) {
    r.insert("Transpose", transpose);
    r.insert("Concat", concat);
    r.insert("Split", split);
    r.insert("Slice", slice);
    r.insert("Expand", expand);
    r.insert("Tile", tile);
    r.insert("Pad", pad);
    r.insert("DepthToSpace", depth_to_space);
    r.insert("SpaceToDepth", space_to_depth);
    r.insert("Trilu", trilu);
    r.insert("ReverseSequence", reverse_sequence);
}

fn transpose(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let r = t.rank();
    let perm: Vec<usize> = match ctx.ints("perm")? {
        Some(p) => {
            if p.len() != r {
                bail!(Shape, "Transpose perm {p:?} does not match rank {r}");
            }
            let mut seen = vec![false; r];
            let mut out = Vec::with_capacity(r);
            for &a in &p {
                let a = norm_axis(a, r)?;
                if std::mem::replace(&mut seen[a], true) {
                    bail!(Invalid, "Transpose perm {p:?} is not a permutation");
                }
                out.push(a);
            }
            out
        }
        None => (0..r).rev().collect(),
    };
    Ok(vec![permute(t, &perm)?])
}

fn concat(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let ts: Vec<&Tensor> = ins.iter().flatten().copied().collect();
    let Some(first) = ts.first() else {
        bail!(Invalid, "Concat needs at least one input");
    };
    let r = first.rank();
    if r == 0 {
        bail!(Shape, "Concat inputs must have rank at least 1");
    }
    // Opsets before 4 default the axis to 1; later ones require it.
    let axis = match ctx.node.attr_int("axis")? {
        Some(a) => a,
        None if ctx.opset < 4 => 1,
        None => bail!(Invalid, "Concat needs an axis attribute"),
    };
    let axis = norm_axis(axis, r)?;
    let mut out_shape = first.shape().to_vec();
    out_shape[axis] = 0;
    for t in &ts {
        let ok = t.rank() == r
            && t.dtype() == first.dtype()
            && (0..r).all(|d| d == axis || t.shape()[d] == first.shape()[d]);
        if !ok {
            bail!(
                Shape,
                "cannot concat {} {:?} with {} {:?} on axis {axis}",
                first.dtype(),
                first.shape(),
                t.dtype(),
                t.shape()
            );
        }
        out_shape[axis] += t.shape()[axis];
    }
    let outer: usize = first.shape()[..axis].iter().product();
    let blocks: Vec<usize> = ts
        .iter()
        .map(|t| t.shape()[axis..].iter().product())
        .collect();
    let total = bounded(&out_shape)?;
    let runs = (0..outer).flat_map(|o| {
        ts.iter()
            .zip(&blocks)
            .map(move |(t, &b)| (t.data(), o * b, b))
    });
    let data = concat_runs(first.data(), total, runs)?;
    Ok(vec![Tensor::new(out_shape, data)?])
}

/// Copies `[start, start + len)` of `axis`.
fn narrow(t: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    let dim = t.shape()[axis];
    let inner: usize = t.shape()[axis + 1..].iter().product();
    let outer: usize = t.shape()[..axis].iter().product();
    let mut shape = t.shape().to_vec();
    shape[axis] = len;
    let total = outer * len * inner;
    let runs = (0..outer).map(|o| ((o * dim + start) * inner, len * inner));
    Tensor::new(shape, copy_runs(t.data(), total, runs))
}

fn split(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let axis = norm_axis(ctx.int("axis", 0)?, t.rank())?;
    let dim = t.shape()[axis];
    let n_out = ctx.node.outputs.len();
    let sizes: Vec<usize> = match opt_input(ins, 1)
        .map(|s| s.to_i64_vec())
        .transpose()?
        .or(ctx.ints("split")?)
    {
        Some(s) => s
            .iter()
            .map(|&v| to_dim(v, "Split size"))
            .collect::<Result<_>>()?,
        None => {
            let n = match ctx.node.attr_int("num_outputs")? {
                Some(n) => to_dim(n, "num_outputs")?,
                None => n_out,
            };
            if n == 0 {
                bail!(Invalid, "Split needs at least one output");
            }
            if ctx.node.attrs.contains_key("num_outputs") {
                let chunk = dim.div_ceil(n);
                (0..n)
                    .map(|i| chunk.min(dim.saturating_sub(i * chunk)))
                    .collect()
            } else {
                if dim % n != 0 {
                    bail!(Shape, "cannot split dim {dim} into {n} equal parts");
                }
                vec![dim / n; n]
            }
        }
    };
    if sizes.iter().sum::<usize>() != dim || sizes.len() != n_out {
        bail!(
            Shape,
            "Split sizes {sizes:?} do not cover dim {dim} with {n_out} outputs"
        );
    }
    let mut start = 0;
    let mut out = Vec::with_capacity(sizes.len());
    for s in sizes {
        out.push(narrow(t, axis, start, s)?);
        start += s;
    }
    Ok(out)
}

fn slice(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let r = t.rank();
    let (starts, ends, axes, steps) = if ctx.opset < 10 && opt_input(ins, 1).is_none() {
        let get = |k: &str| ctx.ints(k);
        let Some(starts) = get("starts")? else {
            bail!(Invalid, "Slice needs starts")
        };
        let Some(ends) = get("ends")? else {
            bail!(Invalid, "Slice needs ends")
        };
        (starts, ends, get("axes")?, None)
    } else {
        let opt = |i| opt_input(ins, i).map(|t| t.to_i64_vec()).transpose();
        (
            input(ins, 1)?.to_i64_vec()?,
            input(ins, 2)?.to_i64_vec()?,
            opt(3)?,
            opt(4)?,
        )
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        bail!(
            Invalid,
            "Slice starts, ends, axes and steps must have the same length"
        );
    }
    // Per axis: first index, step, count.
    let mut plan: Vec<(i128, i128, usize)> = t.shape().iter().map(|&d| (0, 1, d)).collect();
    let mut seen = vec![false; r];
    for i in 0..starts.len() {
        let a = norm_axis(axes[i], r)?;
        if std::mem::replace(&mut seen[a], true) {
            bail!(Invalid, "Slice axis {a} is repeated");
        }
        let dim = t.shape()[a] as i128;
        let step = steps[i] as i128;
        if step == 0 {
            bail!(Invalid, "Slice step must not be zero");
        }
        let fix = |v: i64| if v < 0 { v as i128 + dim } else { v as i128 };
        let (s, e) = if step > 0 {
            (fix(starts[i]).clamp(0, dim), fix(ends[i]).clamp(0, dim))
        } else {
            (
                fix(starts[i]).clamp(0, dim - 1),
                fix(ends[i]).clamp(-1, dim - 1),
            )
        };
        let span = e - s;
        let n = if (step > 0 && span > 0) || (step < 0 && span < 0) {
            (span + step - step.signum()) / step
        } else {
            0
        };
        plan[a] = (s, step, n as usize);
    }
    let shape: Vec<usize> = plan.iter().map(|p| p.2).collect();
    let st = strides_of(t.shape());
    let data = if plan.iter().all(|p| p.1 > 0) {
        let base: usize = plan.iter().zip(&st).map(|(p, &s)| p.0 as usize * s).sum();
        let strides: Vec<usize> = plan
            .iter()
            .zip(&st)
            .map(|(p, &s)| p.1 as usize * s)
            .collect();
        strided_copy(t.data(), &shape, &strides, base)
    } else {
        let lists = plan
            .iter()
            .zip(&st)
            .map(|(&(s, step, n), &stride)| {
                (0..n as i128)
                    .map(|k| Some((s + k * step) as usize * stride))
                    .collect()
            })
            .collect();
        gather_lists(t.data(), None, lists)?
    };
    Ok(vec![Tensor::new(shape, data)?])
}

fn expand(_: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let want = input(ins, 1)?.to_i64_vec()?;
    let want: Vec<usize> = want
        .iter()
        .map(|&d| to_dim(d, "Expand dimension"))
        .collect::<Result<_>>()?;
    let shape = broadcast_shapes(t.shape(), &want)?;
    bounded(&shape)?;
    let strides = broadcast_strides(t.shape(), &shape);
    let data = strided_copy(t.data(), &shape, &strides, 0);
    Ok(vec![Tensor::new(shape, data)?])
}

fn tile(_: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let reps = input(ins, 1)?.to_i64_vec()?;
    if reps.len() != t.rank() {
        bail!(
            Shape,
            "Tile repeats {reps:?} do not match rank {}",
            t.rank()
        );
    }
    let st = strides_of(t.shape());
    // Tiling is a strided view of shape (r0, d0, r1, d1, ...) with zero strides on the repeats.
    let mut view_shape = Vec::with_capacity(2 * t.rank());
    let mut view_strides = Vec::with_capacity(2 * t.rank());
    let mut shape = Vec::with_capacity(t.rank());
    for ((&d, &s), &rep) in t.shape().iter().zip(&st).zip(&reps) {
        let rep = to_dim(rep, "Tile repeat")?;
        view_shape.extend([rep, d]);
        view_strides.extend([0, s]);
        shape.push(
            d.checked_mul(rep)
                .ok_or_else(|| smelt_tensor::Error::Limit("Tile output is too large".into()))?,
        );
    }
    bounded(&shape)?;
    let data = strided_copy(t.data(), &view_shape, &view_strides, 0);
    Ok(vec![Tensor::new(shape, data)?])
}

fn pad(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let r = t.rank();
    let mode = ctx.string("mode", "constant")?;
    let (pads, fill, axes) = if ctx.opset < 11 {
        let Some(p) = ctx.ints("pads")?.or(ctx.ints("paddings")?) else {
            bail!(Invalid, "Pad needs pads")
        };
        let v = Tensor::scalar(ctx.float("value", 0.0)?).cast(t.dtype())?;
        (p, v.into_data(), None)
    } else {
        let p = input(ins, 1)?.to_i64_vec()?;
        let fill = match opt_input(ins, 2) {
            Some(c) if c.numel() == 1 => c.cast(t.dtype())?.into_data(),
            Some(c) => bail!(
                Shape,
                "Pad constant_value must be a scalar, got shape {:?}",
                c.shape()
            ),
            None => Data::zeros(t.dtype(), 1),
        };
        let axes = opt_input(ins, 3).map(|a| a.to_i64_vec()).transpose()?;
        (p, fill, axes)
    };
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&a| norm_axis(a, r)).collect::<Result<_>>()?,
        None => (0..r).collect(),
    };
    if pads.len() != 2 * axes.len() {
        bail!(
            Shape,
            "Pad needs {} pads for {} axes, got {}",
            2 * axes.len(),
            axes.len(),
            pads.len()
        );
    }
    let mut before = vec![0i64; r];
    let mut after = vec![0i64; r];
    for (i, &a) in axes.iter().enumerate() {
        before[a] = pads[i];
        after[a] = pads[i + axes.len()];
    }
    let st = strides_of(t.shape());
    let mut shape = Vec::with_capacity(r);
    let mut lists = Vec::with_capacity(r);
    for d in 0..r {
        let dim = t.shape()[d] as i64;
        // Negative pads crop first; the remaining source range is [lo, hi).
        let lo = (-before[d]).max(0);
        let hi = dim - (-after[d]).max(0);
        let kept = hi - lo;
        let (pb, pe) = (before[d].max(0), after[d].max(0));
        let n = kept
            .checked_add(pb)
            .and_then(|v| v.checked_add(pe))
            .unwrap_or(-1);
        if kept < 0 || n < 0 {
            bail!(
                Shape,
                "Pad {pads:?} crops more than dim {d} of shape {:?}",
                t.shape()
            );
        }
        let n = to_dim(n, "padded dimension")?;
        shape.push(n);
        bounded(&shape)?;
        if mode != "constant" && kept == 0 && n > 0 {
            bail!(Shape, "Pad mode '{mode}' cannot pad an empty dimension");
        }
        let list: Vec<Option<usize>> = (0..n as i64)
            .map(|o| {
                let rel = o - pb;
                let rel = match mode.as_str() {
                    _ if (0..kept).contains(&rel) => Some(rel),
                    "constant" => None,
                    "edge" => Some(rel.clamp(0, kept - 1)),
                    "wrap" => Some(rel.rem_euclid(kept)),
                    _ if kept == 1 => Some(0),
                    _ => {
                        let period = 2 * (kept - 1);
                        let m = rel.rem_euclid(period);
                        Some(if m < kept { m } else { period - m })
                    }
                };
                rel.map(|v| (lo + v) as usize * st[d])
            })
            .collect();
        lists.push(list);
    }
    if !matches!(mode.as_str(), "constant" | "reflect" | "edge" | "wrap") {
        bail!(Unsupported, "Pad mode '{mode}'");
    }
    let data = gather_lists(t.data(), Some(&fill), lists)?;
    Ok(vec![Tensor::new(shape, data)?])
}

fn blocksize(ctx: &OpCtx, t: &Tensor) -> Result<(usize, [usize; 4])> {
    let b = ctx.node.attr_int("blocksize")?;
    let Some(b) = b.filter(|&b| b > 0) else {
        bail!(Invalid, "blocksize must be a positive int")
    };
    let [n, c, h, w] = *t.shape() else {
        bail!(
            Shape,
            "expected a 4-D NCHW input, got shape {:?}",
            t.shape()
        );
    };
    Ok((to_dim(b, "blocksize")?, [n, c, h, w]))
}

fn depth_to_space(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let (b, [n, c, h, w]) = blocksize(ctx, t)?;
    if c % (b * b) != 0 {
        bail!(
            Shape,
            "channels {c} are not divisible by blocksize^2 = {}",
            b * b
        );
    }
    let c2 = c / (b * b);
    let (view, perm) = match ctx.string("mode", "DCR")?.as_str() {
        "DCR" => (vec![n, b, b, c2, h, w], [0, 3, 4, 1, 5, 2]),
        "CRD" => (vec![n, c2, b, b, h, w], [0, 1, 4, 2, 5, 3]),
        m => bail!(Unsupported, "DepthToSpace mode '{m}'"),
    };
    let out = permute(&t.clone().reshape(view)?, &perm)?;
    Ok(vec![out.reshape(vec![n, c2, h * b, w * b])?])
}

fn space_to_depth(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let (b, [n, c, h, w]) = blocksize(ctx, t)?;
    if h % b != 0 || w % b != 0 {
        bail!(
            Shape,
            "spatial dims {h}x{w} are not divisible by blocksize {b}"
        );
    }
    let view = t.clone().reshape(vec![n, c, h / b, b, w / b, b])?;
    let out = permute(&view, &[0, 3, 5, 1, 2, 4])?;
    Ok(vec![out.reshape(vec![n, c * b * b, h / b, w / b])?])
}

fn trilu(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let r = t.rank();
    if r < 2 {
        bail!(Shape, "Trilu needs rank >= 2, got shape {:?}", t.shape());
    }
    let k = match opt_input(ins, 1) {
        Some(k) => scalar_i64(k, "Trilu k")?,
        None => 0,
    };
    let upper = ctx.int("upper", 1)? != 0;
    let (rows, cols) = (t.shape()[r - 2], t.shape()[r - 1]);
    let mut out = t.clone();
    fn zero<T: Element>(v: &mut [T], rows: usize, cols: usize, k: i64, upper: bool) {
        if rows * cols == 0 {
            return;
        }
        for m in v.chunks_mut(rows * cols) {
            for i in 0..rows {
                for j in 0..cols {
                    let diff = j as i64 - i as i64;
                    if (upper && diff < k) || (!upper && diff > k) {
                        m[i * cols + j] = T::default();
                    }
                }
            }
        }
    }
    dispatch!(out.data_mut(), T, v => zero::<T>(v, rows, cols, k, upper));
    Ok(vec![out])
}

fn reverse_sequence(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let lens = input(ins, 1)?.to_i64_vec()?;
    if t.rank() < 2 {
        bail!(
            Shape,
            "ReverseSequence needs rank >= 2, got shape {:?}",
            t.shape()
        );
    }
    let ta = norm_axis(ctx.int("time_axis", 0)?, 2)?;
    let ba = norm_axis(ctx.int("batch_axis", 1)?, 2)?;
    if ta == ba {
        bail!(Invalid, "time_axis and batch_axis must differ");
    }
    let (steps, batch) = (t.shape()[ta], t.shape()[ba]);
    if lens.len() != batch {
        bail!(
            Shape,
            "sequence_lens has {} entries for batch {batch}",
            lens.len()
        );
    }
    let st = strides_of(t.shape());
    let inner: usize = t.shape()[2..].iter().product();
    let mut offs: Vec<usize> = (0..t.numel()).collect();
    for (b, &l) in lens.iter().enumerate() {
        let l = to_dim(l, "sequence length")?;
        if l > steps {
            bail!(Shape, "sequence length {l} exceeds {steps} steps");
        }
        for s in 0..l {
            let src = s * st[ta] + b * st[ba];
            let dst = (l - 1 - s) * st[ta] + b * st[ba];
            for i in 0..inner {
                offs[dst + i] = src + i;
            }
        }
    }
    let data = t.data().gather(offs.into_iter());
    Ok(vec![Tensor::new(t.shape().to_vec(), data)?])
}
