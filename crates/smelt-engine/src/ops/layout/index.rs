//! Data-indexed ops: Gather, GatherElements, GatherND, ScatterElements, ScatterND, Scatter,
//! OneHot, NonZero, Compress, TopK, Unique. Every index is range-checked before use.

use super::{bounded, copy_runs, i64_tensor, permute, scalar_i64, to_dim};
use crate::ops::{input, norm_axis, opt_input, OpCtx, Registry};
use smelt_tensor::{bail, dispatch, strides_of, DType, Data, Element, Result, Tensor};
use std::cmp::Ordering;

pub(super) fn register(r: &mut Registry) {
    r.insert("Gather", gather);
    r.insert("GatherElements", gather_elements);
    r.insert("GatherND", gather_nd);
    r.insert("ScatterElements", scatter_elements);
    r.insert("Scatter", scatter_elements);
    r.insert("ScatterND", scatter_nd);
    r.insert("OneHot", one_hot);
    r.insert("NonZero", non_zero);
    r.insert("Compress", compress);
    r.insert("TopK", top_k);
    r.insert("Unique", unique);
}

/// Resolves a possibly negative index against `dim`, rejecting anything outside [-dim, dim).
fn fix_index(i: i64, dim: usize) -> Result<usize> {
    let d = dim as i64;
    let j = if i < 0 { i + d } else { i };
    if j < 0 || j >= d {
        bail!(
            Invalid,
            "index {i} is out of range for a dimension of size {dim}"
        );
    }
    Ok(j as usize)
}

fn gather(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let idx_t = input(ins, 1)?;
    let axis = norm_axis(ctx.int("axis", 0)?, t.rank())?;
    if t.rank() == 0 {
        bail!(Shape, "Gather needs rank >= 1");
    }
    let dim = t.shape()[axis];
    let idx = idx_t
        .to_i64_vec()?
        .into_iter()
        .map(|i| fix_index(i, dim))
        .collect::<Result<Vec<_>>>()?;
    let outer: usize = t.shape()[..axis].iter().product();
    let inner: usize = t.shape()[axis + 1..].iter().product();
    let mut shape = t.shape()[..axis].to_vec();
    shape.extend_from_slice(idx_t.shape());
    shape.extend_from_slice(&t.shape()[axis + 1..]);
    let total = bounded(&shape)?;
    let data = if inner == 1 {
        t.data()
            .gather((0..outer).flat_map(|o| idx.iter().map(move |&i| o * dim + i)))
    } else {
        copy_runs(
            t.data(),
            total,
            (0..outer).flat_map(|o| idx.iter().map(move |&i| ((o * dim + i) * inner, inner))),
        )
    };
    Ok(vec![Tensor::new(shape, data)?])
}

/// Iterates the multi-index of every element of `shape` in row-major order, calling `f` with
/// the flat position and the coordinates.
fn for_each_coord(shape: &[usize], mut f: impl FnMut(usize, &[usize]) -> Result<()>) -> Result<()> {
    let n: usize = shape.iter().product();
    let mut c = vec![0usize; shape.len()];
    for pos in 0..n {
        f(pos, &c)?;
        for d in (0..shape.len()).rev() {
            c[d] += 1;
            if c[d] < shape[d] {
                break;
            }
            c[d] = 0;
        }
    }
    Ok(())
}

/// For GatherElements/ScatterElements: the data offset of each index element, with the index
/// replacing the coordinate on `axis`.
fn element_offsets(data_shape: &[usize], idx_t: &Tensor, axis: usize) -> Result<Vec<usize>> {
    if idx_t.rank() != data_shape.len() {
        bail!(
            Shape,
            "indices rank {} differs from data rank {}",
            idx_t.rank(),
            data_shape.len()
        );
    }
    if idx_t
        .shape()
        .iter()
        .zip(data_shape)
        .enumerate()
        .any(|(d, (&i, &s))| d != axis && i > s)
    {
        bail!(
            Shape,
            "indices shape {:?} exceeds data shape {data_shape:?}",
            idx_t.shape()
        );
    }
    let idx = idx_t.to_i64_vec()?;
    let st = strides_of(data_shape);
    let mut offs = Vec::with_capacity(idx.len());
    for_each_coord(idx_t.shape(), |pos, c| {
        let mut o = 0;
        for d in 0..c.len() {
            let v = if d == axis {
                fix_index(idx[pos], data_shape[d])?
            } else {
                c[d]
            };
            o += v * st[d];
        }
        offs.push(o);
        Ok(())
    })?;
    Ok(offs)
}

fn gather_elements(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let idx_t = input(ins, 1)?;
    let axis = norm_axis(ctx.int("axis", 0)?, t.rank())?;
    let offs = element_offsets(t.shape(), idx_t, axis)?;
    Ok(vec![Tensor::new(
        idx_t.shape().to_vec(),
        t.data().gather(offs.into_iter()),
    )?])
}

/// GatherND/ScatterND addressing: for each index tuple (in order), the start offset of the data
/// block it selects, plus that block's length.
fn nd_blocks(
    data_shape: &[usize],
    idx_t: &Tensor,
    batch_dims: usize,
) -> Result<(Vec<usize>, usize)> {
    let ir = idx_t.rank();
    let Some(&k) = idx_t.shape().last() else {
        bail!(Shape, "indices must have rank >= 1")
    };
    if batch_dims >= ir || batch_dims + k > data_shape.len() {
        bail!(Shape, "indices shape {:?} with batch_dims {batch_dims} does not fit data shape {data_shape:?}", idx_t.shape());
    }
    if data_shape[..batch_dims] != idx_t.shape()[..batch_dims] {
        bail!(
            Shape,
            "batch dims of data {data_shape:?} and indices {:?} differ",
            idx_t.shape()
        );
    }
    let idx = idx_t.to_i64_vec()?;
    let st = strides_of(data_shape);
    let block: usize = data_shape[batch_dims + k..].iter().product();
    let batch_size: usize = data_shape[batch_dims..].iter().product();
    let per_batch: usize = idx_t.shape()[batch_dims..ir - 1].iter().product();
    let mut starts = Vec::with_capacity(idx.len() / k.max(1));
    let tuples = idx_t.shape()[..ir - 1].iter().product::<usize>();
    for t in 0..tuples {
        let b = t / per_batch.max(1);
        let mut o = b * batch_size;
        for j in 0..k {
            o += fix_index(idx[t * k + j], data_shape[batch_dims + j])? * st[batch_dims + j];
        }
        starts.push(o);
    }
    Ok((starts, block))
}

fn gather_nd(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let idx_t = input(ins, 1)?;
    let b = to_dim(ctx.int("batch_dims", 0)?, "batch_dims")?;
    let (starts, block) = nd_blocks(t.shape(), idx_t, b)?;
    let k = idx_t.shape()[idx_t.rank() - 1];
    let mut shape = idx_t.shape()[..idx_t.rank() - 1].to_vec();
    shape.extend_from_slice(&t.shape()[b + k..]);
    let total = bounded(&shape)?;
    let data = copy_runs(t.data(), total, starts.into_iter().map(|s| (s, block)));
    Ok(vec![Tensor::new(shape, data)?])
}

#[derive(Clone, Copy)]
enum Reduce {
    None,
    Add,
    Mul,
    Max,
    Min,
}

fn reduction(ctx: &OpCtx) -> Result<Reduce> {
    Ok(match ctx.string("reduction", "none")?.as_str() {
        "none" => Reduce::None,
        "add" => Reduce::Add,
        "mul" => Reduce::Mul,
        "max" => Reduce::Max,
        "min" => Reduce::Min,
        r => bail!(Unsupported, "scatter reduction '{r}'"),
    })
}

fn combine<T: Element>(r: Reduce, a: T, b: T) -> T {
    let float = T::DTYPE.is_float();
    match r {
        Reduce::None => b,
        Reduce::Add if float => T::from_f64(a.to_f64() + b.to_f64()),
        Reduce::Add => T::from_i128(a.to_i128().wrapping_add(b.to_i128())),
        Reduce::Mul if float => T::from_f64(a.to_f64() * b.to_f64()),
        Reduce::Mul => T::from_i128(a.to_i128().wrapping_mul(b.to_i128())),
        Reduce::Max => {
            if b > a {
                b
            } else {
                a
            }
        }
        Reduce::Min => {
            if b < a {
                b
            } else {
                a
            }
        }
    }
}

/// Writes `upd` elements into `out` at `(dst, src)` offset pairs, combining by `r`.
fn scatter_into(
    out: &mut Data,
    upd: &Data,
    pairs: impl Iterator<Item = (usize, usize)>,
    r: Reduce,
) -> Result<()> {
    if out.dtype() != upd.dtype() {
        bail!(
            Shape,
            "updates are {}, data is {}",
            upd.dtype(),
            out.dtype()
        );
    }
    dispatch!(out, T, v => {
        let u = T::slice(upd).unwrap_or_default();
        for (d, s) in pairs {
            v[d] = combine(r, v[d], u[s]);
        }
    }, str => {
        let (Data::Str(v), Data::Str(u)) = (out, upd) else { unreachable!("dtypes checked above") };
        if !matches!(r, Reduce::None) {
            bail!(Unsupported, "scatter reductions on strings");
        }
        for (d, s) in pairs {
            v[d] = u[s].clone();
        }
    });
    Ok(())
}

fn scatter_elements(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let idx_t = input(ins, 1)?;
    let upd = input(ins, 2)?;
    if upd.shape() != idx_t.shape() {
        bail!(
            Shape,
            "updates shape {:?} differs from indices shape {:?}",
            upd.shape(),
            idx_t.shape()
        );
    }
    let axis = norm_axis(ctx.int("axis", 0)?, t.rank())?;
    let offs = element_offsets(t.shape(), idx_t, axis)?;
    let mut out = t.clone();
    scatter_into(
        out.data_mut(),
        upd.data(),
        offs.into_iter().enumerate().map(|(s, d)| (d, s)),
        reduction(ctx)?,
    )?;
    Ok(vec![out])
}

fn scatter_nd(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let idx_t = input(ins, 1)?;
    let upd = input(ins, 2)?;
    let (starts, block) = nd_blocks(t.shape(), idx_t, 0)?;
    let k = idx_t.shape()[idx_t.rank() - 1];
    let mut want = idx_t.shape()[..idx_t.rank() - 1].to_vec();
    want.extend_from_slice(&t.shape()[k..]);
    if upd.shape() != want.as_slice() {
        bail!(
            Shape,
            "ScatterND updates shape {:?} should be {want:?}",
            upd.shape()
        );
    }
    let mut out = t.clone();
    let pairs = starts
        .into_iter()
        .enumerate()
        .flat_map(|(j, s)| (0..block).map(move |i| (s + i, j * block + i)));
    scatter_into(out.data_mut(), upd.data(), pairs, reduction(ctx)?)?;
    Ok(vec![out])
}

fn one_hot(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let idx_t = input(ins, 0)?;
    let depth = input(ins, 1)?.to_f64_vec()?;
    let values = input(ins, 2)?;
    let [depth] = depth[..] else {
        bail!(Shape, "OneHot depth must be a single value")
    };
    if values.numel() != 2 {
        bail!(
            Shape,
            "OneHot values must hold [off, on], got shape {:?}",
            values.shape()
        );
    }
    if depth.is_nan() || depth < 1.0 {
        bail!(Invalid, "OneHot depth must be positive, got {depth}");
    }
    let depth = depth as usize;
    let r = idx_t.rank() + 1;
    let axis = norm_axis(ctx.int("axis", -1)?, r)?;
    let mut shape = idx_t.shape().to_vec();
    shape.insert(axis, depth);
    bounded(&shape)?;
    let idx = idx_t.to_f64_vec()?;
    let outer: usize = idx_t.shape()[..axis].iter().product();
    let inner: usize = idx_t.shape()[axis..].iter().product();
    // Offset 0 is "off", 1 is "on"; out-of-range indices leave the whole row off.
    let mut sel = vec![0usize; outer * depth * inner];
    for o in 0..outer {
        for i in 0..inner {
            let mut v = idx[o * inner + i].trunc();
            if v < 0.0 {
                v += depth as f64;
            }
            if v >= 0.0 && v < depth as f64 {
                sel[(o * depth + v as usize) * inner + i] = 1;
            }
        }
    }
    Ok(vec![Tensor::new(
        shape,
        values.data().gather(sel.into_iter()),
    )?])
}

fn non_zero(_: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let nz: Vec<usize> = dispatch!(t.data(), T, v => {
        let zero = T::default();
        v.iter().enumerate().filter(|(_, x)| **x != zero).map(|(i, _)| i).collect()
    });
    let r = t.rank();
    let st = strides_of(t.shape());
    let n = nz.len();
    let mut out = vec![0i64; r * n];
    for (j, &flat) in nz.iter().enumerate() {
        for d in 0..r {
            out[d * n + j] = ((flat / st[d]) % t.shape()[d]) as i64;
        }
    }
    // A scalar counts as a one-element vector, as onnxruntime does.
    if r == 0 {
        return Ok(vec![i64_tensor(vec![1, n], vec![0; n])?]);
    }
    Ok(vec![i64_tensor(vec![r, n], out)?])
}

fn compress(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let cond = input(ins, 1)?.cast(DType::Bool)?;
    let cond = cond.as_slice::<bool>()?;
    let (view_shape, axis) = match ctx.node.attr_int("axis")? {
        Some(a) => (t.shape().to_vec(), norm_axis(a, t.rank())?),
        None => (vec![t.numel()], 0),
    };
    let dim = view_shape[axis];
    if cond.iter().skip(dim).any(|&c| c) {
        bail!(
            Shape,
            "Compress condition selects index beyond dimension {dim}"
        );
    }
    let keep: Vec<usize> = cond
        .iter()
        .take(dim)
        .enumerate()
        .filter(|(_, &c)| c)
        .map(|(i, _)| i)
        .collect();
    let outer: usize = view_shape[..axis].iter().product();
    let inner: usize = view_shape[axis + 1..].iter().product();
    let mut shape = view_shape.clone();
    shape[axis] = keep.len();
    let total = shape.iter().product();
    let runs = (0..outer).flat_map(|o| keep.iter().map(move |&k| ((o * dim + k) * inner, inner)));
    Ok(vec![Tensor::new(shape, copy_runs(t.data(), total, runs))?])
}

/// A total order on elements for sorting: NaN sorts above everything and equals itself.
fn total_cmp<T: PartialOrd>(a: &T, b: &T) -> Ordering {
    a.partial_cmp(b).unwrap_or_else(|| {
        #[allow(clippy::eq_op)]
        let (an, bn) = (a != a, b != b);
        an.cmp(&bn)
    })
}

fn top_k(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let k = match opt_input(ins, 1) {
        Some(k) => scalar_i64(k, "TopK K")?,
        None => ctx.int("k", -1)?,
    };
    let r = t.rank();
    let axis = norm_axis(ctx.int("axis", -1)?, r)?;
    let largest = ctx.int("largest", 1)? != 0;
    let dim = t.shape()[axis];
    let k = to_dim(k, "TopK K")?;
    if k > dim {
        bail!(Shape, "TopK K = {k} exceeds dimension {dim}");
    }
    let outer: usize = t.shape()[..axis].iter().product();
    let inner: usize = t.shape()[axis + 1..].iter().product();
    let mut shape = t.shape().to_vec();
    shape[axis] = k;
    let mut picks = vec![0usize; outer * k * inner];
    dispatch!(t.data(), T, v => {
        let mut order: Vec<usize> = Vec::with_capacity(dim);
        for o in 0..outer {
            for i in 0..inner {
                let at = |j: usize| v[(o * dim + j) * inner + i];
                order.clear();
                order.extend(0..dim);
                // Ties go to the lower index, so the comparison is a total order.
                let cmp = |a: &usize, b: &usize| {
                    let c = total_cmp(&at(*a), &at(*b));
                    (if largest { c.reverse() } else { c }).then(a.cmp(b))
                };
                if k < dim && k > 0 {
                    order.select_nth_unstable_by(k - 1, cmp);
                }
                order.truncate(k);
                order.sort_unstable_by(cmp);
                for (j, &src) in order.iter().enumerate() {
                    picks[(o * k + j) * inner + i] = src;
                }
            }
        }
    });
    let offs = picks.iter().enumerate().map(|(p, &src)| {
        let o = p / (k * inner);
        let i = p % inner;
        (o * dim + src) * inner + i
    });
    let values = Tensor::new(shape.clone(), t.data().gather(offs))?;
    let indices = i64_tensor(shape, picks.into_iter().map(|x| x as i64).collect())?;
    Ok(vec![values, indices])
}

/// Groups equal rows (each `len` elements of `v`); returns, per output position, the first
/// source row and, per group, its member count, plus each source row's output position.
fn group_rows<E>(
    v: &[E],
    rows: usize,
    len: usize,
    sorted: bool,
    cmp: impl Fn(&E, &E) -> Ordering,
) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let row_cmp = |a: usize, b: usize| {
        let (ra, rb) = (&v[a * len..(a + 1) * len], &v[b * len..(b + 1) * len]);
        ra.iter()
            .zip(rb)
            .map(|(x, y)| cmp(x, y))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    };
    let mut order: Vec<usize> = (0..rows).collect();
    order.sort_by(|&a, &b| row_cmp(a, b)); // stable: each group starts at its first occurrence
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for &r in &order {
        match groups.last_mut() {
            Some((first, members)) if row_cmp(*first, r).is_eq() => members.push(r),
            _ => groups.push((r, vec![r])),
        }
    }
    if !sorted {
        groups.sort_by_key(|g| g.0);
    }
    let mut inverse = vec![0usize; rows];
    for (gi, (_, members)) in groups.iter().enumerate() {
        for &m in members {
            inverse[m] = gi;
        }
    }
    let firsts = groups.iter().map(|g| g.0).collect();
    let counts = groups.iter().map(|g| g.1.len()).collect();
    (firsts, inverse, counts)
}

fn unique(ctx: &OpCtx, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let sorted = ctx.int("sorted", 1)? != 0;
    // Move the axis to the front so each unique candidate is one contiguous row.
    let (rows_t, axis) = match ctx.node.attr_int("axis")? {
        Some(a) => {
            let a = norm_axis(a, t.rank())?;
            let mut perm: Vec<usize> = (0..t.rank()).collect();
            perm.remove(a);
            perm.insert(0, a);
            (permute(t, &perm)?, Some(a))
        }
        None => (t.clone().reshape(vec![t.numel()])?, None),
    };
    let rows = rows_t.shape()[0];
    let len = rows_t.numel().checked_div(rows).unwrap_or(0);
    let (firsts, inverse, counts) = dispatch!(rows_t.data(), T, v => group_rows(v, rows, len, sorted, total_cmp::<T>),
    str => match rows_t.data() {
        Data::Str(s) => group_rows(s, rows, len, sorted, |a: &String, b: &String| a.cmp(b)),
        _ => unreachable!("the string arm only sees strings"),
    });
    let n = firsts.len();
    let picked = copy_runs(
        rows_t.data(),
        n * len,
        firsts.iter().map(|&r| (r * len, len)),
    );
    let mut shape = rows_t.shape().to_vec();
    shape[0] = n;
    let mut y = Tensor::new(shape, picked)?;
    if let Some(a) = axis {
        // Undo the move: axis 0 goes back to position a.
        let mut perm: Vec<usize> = (1..t.rank()).collect();
        perm.insert(a, 0);
        y = permute(&y, &perm)?;
    }
    let as_i64 =
        |v: Vec<usize>| i64_tensor(vec![v.len()], v.into_iter().map(|x| x as i64).collect());
    Ok(vec![y, as_i64(firsts)?, as_i64(inverse)?, as_i64(counts)?])
}
