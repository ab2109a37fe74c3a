//! Reductions (Reduce*, ArgMax/ArgMin), the softmax family and CumSum.
//!
//! A reduction is planned once per call: adjacent dims of the same kind (kept or reduced) are
//! merged, then each output element is one group of input offsets, `base + offset` for a
//! shared list (or a single stride) of offsets. Float groups accumulate in f64; integer groups
//! in wrapping i128, which truncates to the same result as wrapping in the element type.

use super::elementwise::{num_dispatch, Num, PAR_MIN};
use super::{input, norm_axis, opt_input, OpCtx, Registry};
use rayon::prelude::*;
use smelt_tensor::{
    bail, bf16, dispatch, f16, BroadcastIter, DType, Data, Element, Result, Tensor,
};
use std::ops::{Add, Div, Mul, Sub};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Red {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    LogSum,
    LogSumExp,
    SumSquare,
}

/// The input offsets one output element reduces over, relative to its base offset.
enum Offsets {
    Strided { n: usize, stride: usize },
    List(Vec<usize>),
}

impl Offsets {
    fn len(&self) -> usize {
        match self {
            Offsets::Strided { n, .. } => *n,
            Offsets::List(v) => v.len(),
        }
    }
}

/// Base offsets (one per output element, in output order) and the shared group offsets for
/// reducing `shape` over the dims flagged in `reduced`.
fn plan(shape: &[usize], reduced: &[bool]) -> (Vec<usize>, Offsets) {
    // Merge runs of adjacent dims of the same kind; dims of size 1 move no offset and go.
    let mut dims: Vec<(usize, bool)> = Vec::new();
    for (&d, &red) in shape.iter().zip(reduced) {
        if d == 1 {
            continue;
        }
        match dims.last_mut() {
            Some((size, r)) if *r == red => *size *= d,
            _ => dims.push((d, red)),
        }
    }
    let sizes: Vec<usize> = dims.iter().map(|d| d.0).collect();
    let strides = smelt_tensor::strides_of(&sizes);
    let mut kept = (Vec::new(), Vec::new());
    let mut red = (Vec::new(), Vec::new());
    for ((size, is_red), stride) in dims.into_iter().zip(strides) {
        let dst = if is_red { &mut red } else { &mut kept };
        dst.0.push(size);
        dst.1.push(stride);
    }
    let bases = BroadcastIter::new(&kept.0, kept.1, 0).collect();
    let offs = match red.0.len() {
        0 => Offsets::Strided { n: 1, stride: 0 },
        1 => Offsets::Strided {
            n: red.0[0],
            stride: red.1[0],
        },
        _ => Offsets::List(BroadcastIter::new(&red.0, red.1, 0).collect()),
    };
    (bases, offs)
}

/// The maximum, NaN-propagating; -inf for no values.
fn fmax(vals: impl Iterator<Item = f64>) -> f64 {
    vals.fold(f64::NEG_INFINITY, |a, x| {
        if a.is_nan() {
            a
        } else if x.is_nan() || x > a {
            x
        } else {
            a
        }
    })
}

fn fold_float(kind: Red, vals: impl Iterator<Item = f64> + Clone, n: usize) -> f64 {
    match kind {
        Red::Sum => vals.sum(),
        Red::Mean => vals.sum::<f64>() / n as f64,
        Red::Max => fmax(vals),
        Red::Min => -fmax(vals.map(|x| -x)),
        Red::Prod => vals.product(),
        Red::L1 => vals.map(f64::abs).sum(),
        Red::L2 => vals.map(|x| x * x).sum::<f64>().sqrt(),
        Red::LogSum => vals.sum::<f64>().ln(),
        Red::SumSquare => vals.map(|x| x * x).sum(),
        Red::LogSumExp => {
            let m = fmax(vals.clone());
            if !m.is_finite() {
                return m;
            }
            m + vals.map(|x| (x - m).exp()).sum::<f64>().ln()
        }
    }
}

/// Integer reductions; `range` is the element type's (min, max), the identity of Max/Min.
fn fold_int(
    kind: Red,
    mut vals: impl Iterator<Item = i128>,
    n: usize,
    range: (i128, i128),
) -> i128 {
    match kind {
        Red::Sum => vals.fold(0, i128::wrapping_add),
        Red::Mean => {
            let s = vals.fold(0, i128::wrapping_add);
            if n == 0 {
                0
            } else {
                s / n as i128
            }
        }
        Red::Max => vals.fold(range.0, i128::max),
        Red::Min => vals.fold(range.1, i128::min),
        Red::Prod => vals.fold(1, i128::wrapping_mul),
        Red::L1 => vals.fold(0, |a, x| a.wrapping_add(x.wrapping_abs())),
        Red::SumSquare => vals.fold(0, |a, x| a.wrapping_add(x.wrapping_mul(x))),
        Red::L2 | Red::LogSum | Red::LogSumExp => {
            let v: Vec<f64> = vals.by_ref().map(|x| x as f64).collect();
            fold_float(kind, v.into_iter(), n) as i128
        }
    }
}

fn int_range(dt: DType) -> (i128, i128) {
    match dt {
        DType::I8 => (i8::MIN as i128, i8::MAX as i128),
        DType::U8 => (0, u8::MAX as i128),
        DType::I16 => (i16::MIN as i128, i16::MAX as i128),
        DType::U16 => (0, u16::MAX as i128),
        DType::I32 => (i32::MIN as i128, i32::MAX as i128),
        DType::U32 => (0, u32::MAX as i128),
        DType::I64 => (i64::MIN as i128, i64::MAX as i128),
        DType::U64 => (0, u64::MAX as i128),
        DType::Bool => (0, 1),
        _ => (i128::MIN, i128::MAX),
    }
}

fn reduce_slice<T: Element>(x: &[T], bases: &[usize], offs: &Offsets, kind: Red) -> Vec<T> {
    let n = offs.len();
    let float = T::DTYPE.is_float();
    let range = int_range(T::DTYPE);
    let one = |base: usize| -> T {
        match offs {
            Offsets::Strided { n, stride } => {
                let it = (0..*n).map(|r| x[base + r * stride]);
                if float {
                    T::from_f64(fold_float(kind, it.map(|v| v.to_f64()), *n))
                } else {
                    T::from_i128(fold_int(kind, it.map(|v| v.to_i128()), *n, range))
                }
            }
            Offsets::List(o) => {
                let it = o.iter().map(|&r| x[base + r]);
                if float {
                    T::from_f64(fold_float(kind, it.map(|v| v.to_f64()), o.len()))
                } else {
                    T::from_i128(fold_int(kind, it.map(|v| v.to_i128()), o.len(), range))
                }
            }
        }
    };
    if x.len() >= PAR_MIN && bases.len() > 1 {
        let min_len = (PAR_MIN / n.max(1)).max(1);
        bases
            .par_iter()
            .with_min_len(min_len)
            .map(|&b| one(b))
            .collect()
    } else {
        bases.iter().map(|&b| one(b)).collect()
    }
}

/// Axes of a Reduce op: an input from opset 13 (ReduceSum) or 18 (the rest), an attribute
/// before. Either form is accepted whatever the opset, as long as only one is given.
pub(crate) fn reduce_axes(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Option<Vec<i64>>> {
    let axes = match opt_input(inputs, 1) {
        Some(t) => Some(t.to_i64_vec()?),
        None => ctx.ints("axes")?,
    };
    Ok(axes.filter(|a| !a.is_empty()))
}

fn reduce(ctx: &OpCtx, inputs: &[Option<&Tensor>], kind: Red) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let keepdims = ctx.int("keepdims", 1)? != 0;
    let rank = x.rank();
    let mut reduced = vec![false; rank];
    match reduce_axes(ctx, inputs)? {
        None if ctx.int("noop_with_empty_axes", 0)? != 0 => return Ok(vec![x.clone()]),
        None => reduced.iter_mut().for_each(|r| *r = true),
        Some(axes) => {
            for a in axes {
                if rank == 0 && (a == 0 || a == -1) {
                    continue;
                }
                reduced[norm_axis(a, rank)?] = true;
            }
        }
    }
    let (bases, offs) = plan(x.shape(), &reduced);
    let data = dispatch!(x.data(), T, v => T::wrap(reduce_slice(v, &bases, &offs, kind)));
    let shape: Vec<usize> = x
        .shape()
        .iter()
        .zip(&reduced)
        .filter_map(|(&d, &r)| match (r, keepdims) {
            (false, _) => Some(d),
            (true, true) => Some(1),
            (true, false) => None,
        })
        .collect();
    Ok(vec![Tensor::new(shape, data)?])
}

fn reduce_sum(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(c, i, Red::Sum)
}
fn reduce_mean(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(c, i, Red::Mean)
}
fn reduce_max(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(c, i, Red::Max)
}
fn reduce_min(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(c, i, Red::Min)
}
fn reduce_prod(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(c, i, Red::Prod)
}
fn reduce_l1(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(c, i, Red::L1)
}
fn reduce_l2(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(c, i, Red::L2)
}
fn reduce_log_sum(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(c, i, Red::LogSum)
}
fn reduce_log_sum_exp(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(c, i, Red::LogSumExp)
}
fn reduce_sum_square(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(c, i, Red::SumSquare)
}

/// `shape` seen as `[outer, len, inner]` around `axis`.
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

fn arg_extreme(ctx: &OpCtx, inputs: &[Option<&Tensor>], max: bool) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    if x.rank() == 0 {
        bail!(Shape, "ArgMax/ArgMin need a tensor of rank 1 or more");
    }
    let axis = norm_axis(ctx.int("axis", 0)?, x.rank())?;
    let keepdims = ctx.int("keepdims", 1)? != 0;
    let last = ctx.int("select_last_index", 0)? != 0;
    let (outer, len, inner) = split_at_axis(x.shape(), axis);
    if len == 0 && outer * inner > 0 {
        bail!(Shape, "cannot take ArgMax/ArgMin over an empty axis {axis}");
    }
    fn run<T: Element>(
        x: &[T],
        outer: usize,
        len: usize,
        inner: usize,
        max: bool,
        last: bool,
    ) -> Vec<i64> {
        let mut out = Vec::with_capacity(outer * inner);
        for o in 0..outer {
            let block = &x[o * len * inner..(o + 1) * len * inner];
            for i in 0..inner {
                let (mut best, mut at) = (block[i], 0usize);
                for r in 1..len {
                    let v = block[r * inner + i];
                    let better = match (max, last) {
                        (true, false) => v > best,
                        (true, true) => v >= best,
                        (false, false) => v < best,
                        (false, true) => v <= best,
                    };
                    if better {
                        best = v;
                        at = r;
                    }
                }
                out.push(at as i64);
            }
        }
        out
    }
    let v = dispatch!(x.data(), T, d => run::<T>(d, outer, len, inner, max, last));
    let mut shape = x.shape().to_vec();
    if keepdims {
        shape[axis] = 1;
    } else {
        shape.remove(axis);
    }
    Ok(vec![Tensor::from_vec(shape, v)?])
}

fn arg_max(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    arg_extreme(c, i, true)
}
fn arg_min(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    arg_extreme(c, i, false)
}

// ---------------------------------------------------------------------------------------------
// Softmax family

/// The float types the softmax kernels compute in.
trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
{
    const ZERO: Self;
    const NEG_INF: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
}

/// Softmax (or log-softmax) of one `[len, inner]` block along `len`, stable by subtracting
/// the maximum. With `inner > 1` the columns are processed side by side, row by row.
fn softmax_block<F: Real>(x: &[F], out: &mut [F], inner: usize, log: bool) {
    if inner == 1 {
        let m = x.iter().fold(F::NEG_INF, |a, &v| if v > a { v } else { a });
        let mut s = F::ZERO;
        for (o, &v) in out.iter_mut().zip(x) {
            let e = (v - m).exp();
            *o = e;
            s = s + e;
        }
        if log {
            let ls = s.ln();
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v - m - ls;
            }
        } else {
            for o in out.iter_mut() {
                *o = *o / s;
            }
        }
        return;
    }
    let mut m = vec![F::NEG_INF; inner];
    for row in x.chunks(inner) {
        for (m, &v) in m.iter_mut().zip(row) {
            if v > *m {
                *m = v;
            }
        }
    }
    let mut s = vec![F::ZERO; inner];
    for (orow, row) in out.chunks_mut(inner).zip(x.chunks(inner)) {
        for (((o, &v), &m), s) in orow.iter_mut().zip(row).zip(&m).zip(s.iter_mut()) {
            let e = (v - m).exp();
            *o = e;
            *s = *s + e;
        }
    }
    if log {
        let ls: Vec<F> = s.iter().map(|&v| v.ln()).collect();
        for (orow, row) in out.chunks_mut(inner).zip(x.chunks(inner)) {
            for (((o, &v), &m), &l) in orow.iter_mut().zip(row).zip(&m).zip(&ls) {
                *o = v - m - l;
            }
        }
    } else {
        for orow in out.chunks_mut(inner) {
            for (o, &s) in orow.iter_mut().zip(&s) {
                *o = *o / s;
            }
        }
    }
}

fn softmax_all<F: Real + Default>(x: &[F], len: usize, inner: usize, log: bool) -> Vec<F> {
    let mut out = vec![F::default(); x.len()];
    let block = len * inner;
    if block == 0 {
        return out;
    }
    if x.len() >= PAR_MIN && x.len() > block {
        let per_task = (PAR_MIN / 4 / block).max(1) * block;
        out.par_chunks_mut(per_task)
            .zip(x.par_chunks(per_task))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_mut(block).zip(x.chunks(block)) {
                    softmax_block(x, o, inner, log);
                }
            });
    } else {
        for (o, x) in out.chunks_mut(block).zip(x.chunks(block)) {
            softmax_block(x, o, inner, log);
        }
    }
    out
}

/// `[outer, len, inner]` for the softmax family: before opset 13 the input is coerced to 2D at
/// `axis` (default 1) and each row normalised; from 13 it runs along `axis` (default -1).
pub(crate) fn softmax_layout(ctx: &OpCtx, shape: &[usize]) -> Result<(usize, usize, usize)> {
    let shape: Vec<usize> = if shape.is_empty() {
        vec![1]
    } else {
        shape.to_vec()
    };
    let rank = shape.len();
    if ctx.opset < 13 {
        let axis = ctx.int("axis", 1)?;
        let a = if axis < 0 { axis + rank as i64 } else { axis };
        if a < 0 || a > rank as i64 {
            bail!(Shape, "axis {axis} is out of range for rank {rank}");
        }
        let a = a as usize;
        Ok((shape[..a].iter().product(), shape[a..].iter().product(), 1))
    } else {
        let axis = norm_axis(ctx.int("axis", -1)?, rank)?;
        Ok(split_at_axis(&shape, axis))
    }
}

pub(crate) fn softmax_op(
    ctx: &OpCtx,
    inputs: &[Option<&Tensor>],
    log: bool,
) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let (_, len, inner) = softmax_layout(ctx, x.shape())?;
    let data = match x.data() {
        Data::F32(v) if inner == 1 && !log => {
            let mut out = vec![0f32; v.len()];
            crate::kernels::softmax::softmax_rows(v, len, &mut out);
            Data::F32(out)
        }
        Data::F32(v) => Data::F32(softmax_all(v, len, inner, log)),
        Data::F64(v) => Data::F64(softmax_all(v, len, inner, log)),
        Data::F16(v) => {
            let f: Vec<f32> = v.iter().map(|h| h.to_f32()).collect();
            Data::F16(
                softmax_all(&f, len, inner, log)
                    .into_iter()
                    .map(f16::from_f32)
                    .collect(),
            )
        }
        Data::BF16(v) => {
            let f: Vec<f32> = v.iter().map(|h| h.to_f32()).collect();
            Data::BF16(
                softmax_all(&f, len, inner, log)
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect(),
            )
        }
        _ => bail!(
            Unsupported,
            "softmax needs a float tensor, got {}",
            x.dtype()
        ),
    };
    Ok(vec![Tensor::new(x.shape().to_vec(), data)?])
}

fn softmax(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    softmax_op(c, i, false)
}
fn log_softmax(c: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    softmax_op(c, i, true)
}

/// Hardmax: 1 at the first maximum along the axis (or coerced row), 0 elsewhere.
fn hardmax(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let (outer, len, inner) = softmax_layout(ctx, x.shape())?;
    fn run<T: Element>(x: &[T], outer: usize, len: usize, inner: usize) -> Vec<T> {
        let mut out = vec![T::from_f64(0.0); x.len()];
        for o in 0..outer {
            let base = o * len * inner;
            for i in 0..inner {
                let mut at = 0;
                for r in 1..len {
                    if x[base + r * inner + i] > x[base + at * inner + i] {
                        at = r;
                    }
                }
                if len > 0 {
                    out[base + at * inner + i] = T::from_f64(1.0);
                }
            }
        }
        out
    }
    if !x.dtype().is_float() {
        bail!(
            Unsupported,
            "Hardmax needs a float tensor, got {}",
            x.dtype()
        );
    }
    let data = dispatch!(x.data(), T, v => T::wrap(run::<T>(v, outer, len, inner)));
    Ok(vec![Tensor::new(x.shape().to_vec(), data)?])
}

/// CumSum along the axis given as input 1 (a scalar), optionally exclusive and/or reversed.
fn cumsum(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let axis_t = input(inputs, 1)?;
    let axis = match axis_t.to_i64_vec()?.as_slice() {
        [a] => *a,
        _ => bail!(
            Shape,
            "CumSum axis must be a scalar, got shape {:?}",
            axis_t.shape()
        ),
    };
    if x.rank() == 0 {
        return Ok(vec![x.clone()]);
    }
    let axis = norm_axis(axis, x.rank())?;
    let exclusive = ctx.int("exclusive", 0)? != 0;
    let reverse = ctx.int("reverse", 0)? != 0;
    let (outer, len, inner) = split_at_axis(x.shape(), axis);
    fn run<T: Num>(
        x: &[T],
        outer: usize,
        len: usize,
        inner: usize,
        exclusive: bool,
        reverse: bool,
    ) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        let mut acc = vec![T::zero(); inner];
        for o in 0..outer {
            acc.iter_mut().for_each(|a| *a = T::zero());
            for step in 0..len {
                let r = if reverse { len - 1 - step } else { step };
                let off = (o * len + r) * inner;
                let (xs, os) = (&x[off..off + inner], &mut out[off..off + inner]);
                for ((o, &v), a) in os.iter_mut().zip(xs).zip(acc.iter_mut()) {
                    if exclusive {
                        *o = *a;
                        *a = a.add(v);
                    } else {
                        *a = a.add(v);
                        *o = *a;
                    }
                }
            }
        }
        out
    }
    let data = num_dispatch!(x.data(), T, v => T::wrap(run::<T>(v, outer, len, inner, exclusive, reverse)),
        else => bail!(Unsupported, "CumSum is not defined for {}", x.dtype()));
    Ok(vec![Tensor::new(x.shape().to_vec(), data)?])
}

pub fn register(r: &mut Registry) {
    r.insert("ReduceSum", reduce_sum);
    r.insert("ReduceMean", reduce_mean);
    r.insert("ReduceMax", reduce_max);
    r.insert("ReduceMin", reduce_min);
    r.insert("ReduceProd", reduce_prod);
    r.insert("ReduceL1", reduce_l1);
    r.insert("ReduceL2", reduce_l2);
    r.insert("ReduceLogSum", reduce_log_sum);
    r.insert("ReduceLogSumExp", reduce_log_sum_exp);
    r.insert("ReduceSumSquare", reduce_sum_square);
    r.insert("ArgMax", arg_max);
    r.insert("ArgMin", arg_min);
    r.insert("Softmax", softmax);
    r.insert("LogSoftmax", log_softmax);
    r.insert("Hardmax", hardmax);
    r.insert("CumSum", cumsum);
}

#[cfg(test)]
mod tests {
    use super::super::{lookup, OpCtx};
    use smelt_ir::{Attr, Node};
    use smelt_tensor::{Result, Tensor};

    fn run_op(
        op: &str,
        attrs: &[(&str, Attr)],
        opset: i64,
        inputs: &[Option<&Tensor>],
    ) -> Result<Vec<Tensor>> {
        let mut node = Node::new(op, "t", &[], &[]);
        for (k, v) in attrs {
            node = node.with_attr(k, v.clone());
        }
        let ctx = OpCtx::new(&node, opset);
        let f = lookup("", op).expect("op is registered");
        f(&ctx, inputs)
    }

    fn run1(op: &str, attrs: &[(&str, Attr)], opset: i64, inputs: &[&Tensor]) -> Tensor {
        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        run_op(op, attrs, opset, &ins).unwrap().remove(0)
    }

    fn f32t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    fn i64t(v: &[i64]) -> Tensor {
        Tensor::from_vec(vec![v.len()], v.to_vec()).unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "element {i}: got {g}, want {w}");
        }
    }

    fn cube() -> Tensor {
        f32t(&[2, 2, 2], &[1., 2., 3., 4., 5., 6., 7., 8.])
    }

    #[test]
    fn reduce_mean_negative_axes_without_keepdims() {
        let no_keep = ("keepdims", Attr::Int(0));
        // Attribute axes (opset 13) and input axes (opset 18) agree.
        let a = run1(
            "ReduceMean",
            &[no_keep.clone(), ("axes", Attr::Ints(vec![-1]))],
            13,
            &[&cube()],
        );
        let b = run1(
            "ReduceMean",
            std::slice::from_ref(&no_keep),
            18,
            &[&cube(), &i64t(&[-1])],
        );
        for t in [&a, &b] {
            assert_eq!(t.shape(), &[2, 2]);
            assert_eq!(t.as_slice::<f32>().unwrap(), &[1.5, 3.5, 5.5, 7.5]);
        }
        // Two separated axes: means of {1,2,5,6} and {3,4,7,8}.
        let c = run1("ReduceMean", &[no_keep], 18, &[&cube(), &i64t(&[0, -1])]);
        assert_eq!(c.shape(), &[2]);
        assert_eq!(c.as_slice::<f32>().unwrap(), &[3.5, 5.5]);
        // Keepdims on the leading axis.
        let d = run1(
            "ReduceMean",
            &[("axes", Attr::Ints(vec![0]))],
            13,
            &[&cube()],
        );
        assert_eq!(d.shape(), &[1, 2, 2]);
        assert_eq!(d.as_slice::<f32>().unwrap(), &[3., 4., 5., 6.]);
        // No axes: everything.
        let e = run1("ReduceMean", &[], 18, &[&cube()]);
        assert_eq!(e.shape(), &[1, 1, 1]);
        assert_eq!(e.as_slice::<f32>().unwrap(), &[4.5]);
        assert!(run_op("ReduceMean", &[], 18, &[Some(&cube()), Some(&i64t(&[3]))]).is_err());
    }

    #[test]
    fn every_reduction_kind() {
        let x = f32t(&[2, 2], &[1., -2., 3., 4.]);
        let ax = i64t(&[1]);
        let r = |op: &str| {
            run1(op, &[("keepdims", Attr::Int(0))], 18, &[&x, &ax])
                .as_slice::<f32>()
                .unwrap()
                .to_vec()
        };
        assert_eq!(r("ReduceSum"), vec![-1., 7.]);
        assert_eq!(r("ReduceMax"), vec![1., 4.]);
        assert_eq!(r("ReduceMin"), vec![-2., 3.]);
        assert_eq!(r("ReduceProd"), vec![-2., 12.]);
        assert_eq!(r("ReduceL1"), vec![3., 7.]);
        assert_eq!(r("ReduceSumSquare"), vec![5., 25.]);
        assert_close(&r("ReduceL2"), &[5f32.sqrt(), 5.], 1e-6);
        let ls = r("ReduceLogSum");
        assert!(ls[0].is_nan(), "log of a negative sum");
        assert_close(&ls[1..], &[7f32.ln()], 1e-6);
        assert_close(
            &r("ReduceLogSumExp"),
            &[
                (1f32.exp() + (-2f32).exp()).ln(),
                (3f32.exp() + 4f32.exp()).ln(),
            ],
            1e-5,
        );
        // Stable for large values.
        let big = f32t(&[2], &[1000., 1000.]);
        let lse = run1("ReduceLogSumExp", &[], 18, &[&big]);
        assert_close(lse.as_slice::<f32>().unwrap(), &[1000. + 2f32.ln()], 1e-3);
        // Integers accumulate exactly; Max over ints and bools.
        let i = Tensor::from_vec(vec![2, 3], vec![1i32, 7, -3, 4, 5, 6]).unwrap();
        let s = run1(
            "ReduceSum",
            &[("keepdims", Attr::Int(0))],
            13,
            &[&i, &i64t(&[1])],
        );
        assert_eq!(s.as_slice::<i32>().unwrap(), &[5, 15]);
        let m = run1(
            "ReduceMax",
            &[("keepdims", Attr::Int(0)), ("axes", Attr::Ints(vec![0]))],
            13,
            &[&i],
        );
        assert_eq!(m.as_slice::<i32>().unwrap(), &[4, 7, 6]);
        let b = Tensor::from_vec(vec![2, 2], vec![true, false, false, false]).unwrap();
        let m = run1(
            "ReduceMax",
            &[("keepdims", Attr::Int(0))],
            20,
            &[&b, &i64t(&[1])],
        );
        assert_eq!(m.as_slice::<bool>().unwrap(), &[true, false]);
    }

    #[test]
    fn empty_reductions_follow_onnx() {
        let x = Tensor::zeros(smelt_tensor::DType::F32, vec![2, 0, 4]);
        let ax = i64t(&[1]);
        let sum = run1("ReduceSum", &[], 18, &[&x, &ax]);
        assert_eq!(sum.shape(), &[2, 1, 4]);
        assert!(sum.as_slice::<f32>().unwrap().iter().all(|&v| v == 0.0));
        let max = run1("ReduceMax", &[], 18, &[&x, &ax]);
        assert!(max
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == f32::NEG_INFINITY));
        let min = run1("ReduceMin", &[], 18, &[&x, &ax]);
        assert!(min
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == f32::INFINITY));
        let prod = run1("ReduceProd", &[], 18, &[&x, &ax]);
        assert!(prod.as_slice::<f32>().unwrap().iter().all(|&v| v == 1.0));
        let lse = run1("ReduceLogSumExp", &[], 18, &[&x, &ax]);
        assert!(lse
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == f32::NEG_INFINITY));
        let xi = Tensor::zeros(smelt_tensor::DType::I32, vec![3, 0]);
        let mi = run1(
            "ReduceMax",
            &[("keepdims", Attr::Int(0))],
            18,
            &[&xi, &i64t(&[1])],
        );
        assert_eq!(mi.as_slice::<i32>().unwrap(), &[i32::MIN; 3]);
        // Reducing a non-empty axis of an empty tensor gives an empty result.
        let e = run1("ReduceSum", &[], 18, &[&x, &i64t(&[2])]);
        assert_eq!(e.shape(), &[2, 0, 1]);
    }

    #[test]
    fn noop_with_empty_axes() {
        let noop = [("noop_with_empty_axes", Attr::Int(1))];
        let out = run1("ReduceSum", &noop, 13, &[&cube(), &i64t(&[])]);
        assert_eq!(out, cube());
        let all = run1(
            "ReduceSum",
            &[("keepdims", Attr::Int(0))],
            13,
            &[&cube(), &i64t(&[])],
        );
        assert_eq!(all.shape(), &[] as &[usize]);
        assert_eq!(all.as_slice::<f32>().unwrap(), &[36.]);
    }

    #[test]
    fn large_reduction_uses_threads_correctly() {
        let (rows, cols) = (300, 1000);
        let x: Vec<f32> = (0..rows * cols).map(|i| (i / cols) as f32).collect();
        let t = f32t(&[rows, cols], &x);
        let s = run1(
            "ReduceSum",
            &[("keepdims", Attr::Int(0))],
            13,
            &[&t, &i64t(&[1])],
        );
        let want: Vec<f32> = (0..rows).map(|r| (r * cols) as f32).collect();
        assert_eq!(s.as_slice::<f32>().unwrap(), &want[..]);
        let m = run1(
            "ReduceMean",
            &[("keepdims", Attr::Int(0)), ("axes", Attr::Ints(vec![0]))],
            13,
            &[&t],
        );
        assert!(m.as_slice::<f32>().unwrap().iter().all(|&v| v == 149.5));
    }

    #[test]
    fn argmax_select_last_index() {
        let x = f32t(&[2, 3], &[1., 3., 3., 7., 2., 7.]);
        let first = run1("ArgMax", &[("axis", Attr::Int(1))], 13, &[&x]);
        assert_eq!(first.shape(), &[2, 1]);
        assert_eq!(first.as_slice::<i64>().unwrap(), &[1, 0]);
        let attrs = [
            ("axis", Attr::Int(-1)),
            ("keepdims", Attr::Int(0)),
            ("select_last_index", Attr::Int(1)),
        ];
        let last = run1("ArgMax", &attrs, 13, &[&x]);
        assert_eq!(last.shape(), &[2]);
        assert_eq!(last.as_slice::<i64>().unwrap(), &[2, 2]);
        let amin = run1("ArgMin", &[("keepdims", Attr::Int(0))], 13, &[&x]);
        assert_eq!(amin.as_slice::<i64>().unwrap(), &[0, 1, 0]);
        let amin_last = run1("ArgMin", &attrs, 13, &[&f32t(&[1, 3], &[1., 1., 2.])]);
        assert_eq!(amin_last.as_slice::<i64>().unwrap(), &[1]);
    }

    #[test]
    fn softmax_opset_semantics() {
        let (l3, l7) = (3f32.ln(), 7f32.ln());
        let x = f32t(&[1, 2, 2], &[0., l3, 0., l7]);
        // Opset 13: along the axis; default -1.
        let last = run1("Softmax", &[], 13, &[&x]);
        assert_close(
            last.as_slice::<f32>().unwrap(),
            &[0.25, 0.75, 0.125, 0.875],
            1e-6,
        );
        let mid = run1("Softmax", &[("axis", Attr::Int(1))], 13, &[&x]);
        assert_close(mid.as_slice::<f32>().unwrap(), &[0.5, 0.3, 0.5, 0.7], 1e-6);
        // Before 13: coerce to 2D at axis (default 1), normalise whole rows.
        let old = run1("Softmax", &[], 11, &[&x]);
        assert_close(
            old.as_slice::<f32>().unwrap(),
            &[1. / 12., 3. / 12., 1. / 12., 7. / 12.],
            1e-6,
        );
        let old2 = run1("Softmax", &[("axis", Attr::Int(2))], 11, &[&x]);
        assert_close(
            old2.as_slice::<f32>().unwrap(),
            &[0.25, 0.75, 0.125, 0.875],
            1e-6,
        );
        let log = run1("LogSoftmax", &[], 11, &[&x]);
        let want: Vec<f32> = [1f32 / 12., 3. / 12., 1. / 12., 7. / 12.]
            .iter()
            .map(|v| v.ln())
            .collect();
        assert_close(log.as_slice::<f32>().unwrap(), &want, 1e-5);
        let logmid = run1("LogSoftmax", &[("axis", Attr::Int(1))], 13, &[&x]);
        let want: Vec<f32> = [0.5f32, 0.3, 0.5, 0.7].iter().map(|v| v.ln()).collect();
        assert_close(logmid.as_slice::<f32>().unwrap(), &want, 1e-5);
        // Large values stay finite.
        let big = f32t(&[3], &[1000., 1000., -1000.]);
        assert_close(
            run1("Softmax", &[], 13, &[&big]).as_slice::<f32>().unwrap(),
            &[0.5, 0.5, 0.],
            1e-6,
        );
        let ls = run1("LogSoftmax", &[], 13, &[&big]);
        assert_close(
            ls.as_slice::<f32>().unwrap(),
            &[-(2f32.ln()), -(2f32.ln()), -2000. - 2f32.ln()],
            1e-3,
        );
        // f64 and parallel paths.
        let d = Tensor::from_vec(vec![2], vec![0f64, 3f64.ln()]).unwrap();
        let out = run1("Softmax", &[], 13, &[&d]);
        let v = out.as_slice::<f64>().unwrap();
        assert!((v[0] - 0.25).abs() < 1e-12 && (v[1] - 0.75).abs() < 1e-12);
        let rows = f32t(&[40000, 2], &[0., l3].repeat(40000));
        let out = run1("Softmax", &[], 13, &[&rows]);
        assert!(out
            .as_slice::<f32>()
            .unwrap()
            .chunks(2)
            .all(|c| (c[0] - 0.25).abs() < 1e-6 && (c[1] - 0.75).abs() < 1e-6));
    }

    #[test]
    fn hardmax_both_opsets() {
        let x = f32t(&[1, 2, 2], &[1., 3., 3., 2.]);
        let h13 = run1("Hardmax", &[], 13, &[&x]);
        assert_eq!(h13.as_slice::<f32>().unwrap(), &[0., 1., 1., 0.]);
        let h11 = run1("Hardmax", &[], 11, &[&x]);
        assert_eq!(h11.as_slice::<f32>().unwrap(), &[0., 1., 0., 0.]);
        let h1 = run1("Hardmax", &[("axis", Attr::Int(1))], 13, &[&x]);
        assert_eq!(h1.as_slice::<f32>().unwrap(), &[0., 1., 1., 0.]);
    }

    #[test]
    fn cumsum_variants() {
        let x = f32t(&[5], &[1., 2., 3., 4., 5.]);
        let ax = Tensor::scalar(0i32);
        let c = |attrs: &[(&str, Attr)]| {
            run1("CumSum", attrs, 14, &[&x, &ax])
                .as_slice::<f32>()
                .unwrap()
                .to_vec()
        };
        assert_eq!(c(&[]), vec![1., 3., 6., 10., 15.]);
        assert_eq!(c(&[("exclusive", Attr::Int(1))]), vec![0., 1., 3., 6., 10.]);
        assert_eq!(c(&[("reverse", Attr::Int(1))]), vec![15., 14., 12., 9., 5.]);
        assert_eq!(
            c(&[("reverse", Attr::Int(1)), ("exclusive", Attr::Int(1))]),
            vec![14., 12., 9., 5., 0.]
        );
        let m = Tensor::from_vec(vec![2, 3], vec![1i64, 2, 3, 4, 5, 6]).unwrap();
        let out = run1("CumSum", &[], 14, &[&m, &Tensor::scalar(-1i64)]);
        assert_eq!(out.as_slice::<i64>().unwrap(), &[1, 3, 6, 4, 9, 15]);
        let out = run1("CumSum", &[], 14, &[&m, &Tensor::scalar(0i64)]);
        assert_eq!(out.as_slice::<i64>().unwrap(), &[1, 2, 3, 5, 7, 9]);
    }
}
