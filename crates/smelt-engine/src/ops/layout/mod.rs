//! Layout, shape and indexing ops: everything that moves elements without computing new values.
//! Ops are dtype-generic (strings included where ONNX allows them); the shared helpers here turn
//! a strided view, a list of contiguous runs, or per-axis index lists into a new tensor.

mod copy;
mod index;
mod shape;
pub use shape::view_shape;
#[cfg(test)]
mod tests;

use super::Registry;
use smelt_tensor::{
    bail, checked_numel, dispatch, max_elements, BroadcastIter, Data, Element, Error, Result,
    Tensor,
};

pub fn register(r: &mut Registry) {
    shape::register(r);
    copy::register(r);
    index::register(r);
}

/// Checks an output shape whose size comes from tensor data (not from the graph's own tensors)
/// so a hostile model cannot request a huge allocation.
fn bounded(shape: &[usize]) -> Result<usize> {
    checked_numel(shape, max_elements())
}

/// A non-negative i64 read from data as a dimension.
fn to_dim(v: i64, what: &str) -> Result<usize> {
    if v < 0 {
        bail!(Invalid, "{what} must be non-negative, got {v}");
    }
    usize::try_from(v).map_err(|_| Error::Limit(format!("{what} {v} is too large")))
}

/// The single value of a scalar or one-element integer tensor.
fn scalar_i64(t: &Tensor, what: &str) -> Result<i64> {
    let v = t.to_i64_vec()?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => bail!(
            Invalid,
            "{what} must hold exactly one value, got shape {:?}",
            t.shape()
        ),
    }
}

fn i64_tensor(shape: Vec<usize>, v: Vec<i64>) -> Result<Tensor> {
    Tensor::from_vec(shape, v)
}

/// Copies `(source, start, len)` runs, in order, into one new `Data` of the first source's dtype.
/// Every source must share that dtype. Callers derive runs from shapes, so ranges are in bounds.
fn concat_runs<'a>(
    first: &Data,
    total: usize,
    runs: impl Iterator<Item = (&'a Data, usize, usize)>,
) -> Result<Data> {
    let want = first.dtype();
    let mismatch = |d: &Data| Error::Shape(format!("expected {want} data, got {}", d.dtype()));
    Ok(dispatch!(first, T, _v => {
        let mut out: Vec<T> = Vec::with_capacity(total);
        for (d, s, l) in runs {
            let src = T::slice(d).ok_or_else(|| mismatch(d))?;
            out.extend_from_slice(&src[s..s + l]);
        }
        T::wrap(out)
    }, str => {
        let mut out: Vec<String> = Vec::with_capacity(total);
        for (d, s, l) in runs {
            let Data::Str(src) = d else { return Err(mismatch(d)) };
            out.extend_from_slice(&src[s..s + l]);
        }
        Data::Str(out)
    }))
}

/// Copies `(start, len)` runs of one source.
fn copy_runs(src: &Data, total: usize, runs: impl Iterator<Item = (usize, usize)>) -> Data {
    dispatch!(src, T, v => {
        let mut out: Vec<T> = Vec::with_capacity(total);
        for (s, l) in runs {
            out.extend_from_slice(&v[s..s + l]);
        }
        T::wrap(out)
    }, str => src.gather(runs.flat_map(|(s, l)| s..s + l)))
}

/// Materialises a strided view of `src` (shape, element strides, base offset), as Transpose,
/// Slice, Expand and Tile need. Dimensions are coalesced first, then the innermost pattern picks
/// a fast path: contiguous rows, repeated elements, or a blocked 2-D transpose.
fn strided_copy(src: &Data, shape: &[usize], strides: &[usize], base: usize) -> Data {
    let total: usize = shape.iter().product();
    if total == 0 {
        return src.gather(std::iter::empty());
    }
    let mut dims: Vec<(usize, usize)> = Vec::with_capacity(shape.len());
    for (&n, &s) in shape.iter().zip(strides) {
        if n == 1 {
            continue;
        }
        if let Some(last) = dims.last_mut() {
            if last.1 == s * n {
                last.0 *= n;
                last.1 = s;
                continue;
            }
        }
        dims.push((n, s));
    }
    let Some(&(n, s)) = dims.last() else {
        return copy_runs(src, 1, std::iter::once((base, 1)));
    };
    let k = dims.len();
    let outer_shape: Vec<usize> = dims[..k - 1].iter().map(|d| d.0).collect();
    let outer_strides: Vec<usize> = dims[..k - 1].iter().map(|d| d.1).collect();
    if s == 1 {
        let it = BroadcastIter::new(&outer_shape, outer_strides, base);
        return copy_runs(src, total, it.map(|o| (o, n)));
    }
    if s == 0 {
        let it = BroadcastIter::new(&outer_shape, outer_strides, base);
        return dispatch!(src, T, v => {
            let mut out: Vec<T> = Vec::with_capacity(total);
            for o in it {
                out.extend(std::iter::repeat_n(v[o], n));
            }
            T::wrap(out)
        }, str => src.gather(it.flat_map(|o| std::iter::repeat_n(o, n))));
    }
    if k >= 2 && dims[k - 2].1 == 1 && !matches!(src, Data::Str(_)) {
        let r = dims[k - 2].0;
        let it = BroadcastIter::new(&outer_shape[..k - 2], outer_strides[..k - 2].to_vec(), base);
        return dispatch!(src, T, v => {
            let mut out: Vec<T> = Vec::with_capacity(total);
            for o in it {
                transpose_block(v, o, r, n, s, &mut out);
            }
            T::wrap(out)
        }, str => src.gather(std::iter::empty()));
    }
    let shape: Vec<usize> = dims.iter().map(|d| d.0).collect();
    let strides: Vec<usize> = dims.iter().map(|d| d.1).collect();
    src.gather(BroadcastIter::new(&shape, strides, base))
}

/// Appends the `r x c` matrix `out[i][j] = src[o + i + j * ld]`, in cache-sized tiles.
fn transpose_block<T: Element>(
    src: &[T],
    o: usize,
    r: usize,
    c: usize,
    ld: usize,
    out: &mut Vec<T>,
) {
    const B: usize = 16;
    let start = out.len();
    out.resize(start + r * c, T::default());
    let dst = &mut out[start..];
    for jb in (0..c).step_by(B) {
        let je = (jb + B).min(c);
        for ib in (0..r).step_by(B) {
            let ie = (ib + B).min(r);
            // Within a tile, each source column segment is contiguous; each output row too.
            let mut tile = [[T::default(); B]; B];
            for j in jb..je {
                let col = &src[o + j * ld + ib..o + j * ld + ie];
                for (t, &x) in tile.iter_mut().zip(col) {
                    t[j - jb] = x;
                }
            }
            for (i, t) in (ib..ie).zip(&tile) {
                dst[i * c + jb..i * c + je].copy_from_slice(&t[..je - jb]);
            }
        }
    }
}

/// Row-major iteration over the cartesian product of per-axis offset lists: yields the sum of
/// one entry per axis, or None when any chosen entry is None (a padded position).
struct AxisLists {
    lists: Vec<Vec<Option<usize>>>,
    idx: Vec<usize>,
    remaining: usize,
}

impl AxisLists {
    fn new(lists: Vec<Vec<Option<usize>>>) -> Self {
        let remaining = lists.iter().map(Vec::len).product();
        let idx = vec![0; lists.len()];
        AxisLists {
            lists,
            idx,
            remaining,
        }
    }
}

impl Iterator for AxisLists {
    type Item = Option<usize>;
    fn next(&mut self) -> Option<Option<usize>> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let mut acc = Some(0usize);
        for (l, &i) in self.lists.iter().zip(&self.idx) {
            acc = match (acc, l[i]) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            };
        }
        for d in (0..self.lists.len()).rev() {
            self.idx[d] += 1;
            if self.idx[d] < self.lists[d].len() {
                break;
            }
            self.idx[d] = 0;
        }
        Some(acc)
    }
}

/// A piece of an output row built from per-axis offset lists.
#[derive(Clone, Copy, Debug)]
enum Seg {
    Fill(usize),
    /// `len` source elements ascending from `start`.
    Fwd(usize, usize),
    /// `len` source elements descending from `start`.
    Rev(usize, usize),
}

/// Splits the innermost offset list into runs so rows copy by slices, not element by element.
fn segments(list: &[Option<usize>]) -> Vec<Seg> {
    let mut segs: Vec<Seg> = Vec::new();
    for &e in list {
        let merged = match (segs.last_mut(), e) {
            (Some(Seg::Fill(n)), None) => {
                *n += 1;
                true
            }
            (Some(Seg::Fwd(s, l)), Some(o)) if o == *s + *l => {
                *l += 1;
                true
            }
            (Some(Seg::Rev(s, l)), Some(o)) if *l > 1 && o + *l == *s => {
                *l += 1;
                true
            }
            // A single element followed by its predecessor starts a descending run.
            (Some(Seg::Fwd(s, 1)), Some(o)) if o + 1 == *s => {
                *segs.last_mut().expect("matched above") = Seg::Rev(o + 1, 2);
                true
            }
            _ => false,
        };
        if !merged {
            segs.push(match e {
                None => Seg::Fill(1),
                Some(o) => Seg::Fwd(o, 1),
            });
        }
    }
    segs
}

fn build_rows<T: Clone>(
    v: &[T],
    fill: &T,
    outer: AxisLists,
    segs: &[Seg],
    row: usize,
    total: usize,
) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(total);
    for base in outer {
        let Some(b) = base else {
            out.extend(std::iter::repeat_n(fill, row).cloned());
            continue;
        };
        for &seg in segs {
            match seg {
                Seg::Fill(n) => out.extend(std::iter::repeat_n(fill, n).cloned()),
                Seg::Fwd(s, l) => out.extend_from_slice(&v[b + s..b + s + l]),
                Seg::Rev(s, l) => out.extend(v[b + s + 1 - l..=b + s].iter().rev().cloned()),
            }
        }
    }
    out
}

/// Builds the row-major product of per-axis offset lists (entries are offset contributions;
/// None marks a position filled with `fill`'s single element, or zero/empty without one).
/// Serves Pad (all modes) and Slice with negative steps.
fn gather_lists(
    src: &Data,
    fill: Option<&Data>,
    mut lists: Vec<Vec<Option<usize>>>,
) -> Result<Data> {
    if let Some(f) = fill {
        if f.dtype() != src.dtype() || f.len() != 1 {
            bail!(
                Shape,
                "the fill value must be one {} element, got {} of {}",
                src.dtype(),
                f.len(),
                f.dtype()
            );
        }
    }
    let inner = lists.pop().unwrap_or_else(|| vec![Some(0)]);
    let total = lists.iter().map(Vec::len).product::<usize>() * inner.len();
    let segs = segments(&inner);
    let outer = AxisLists::new(lists);
    Ok(dispatch!(src, T, v => {
        let f = fill.and_then(T::slice).map_or_else(T::default, |s| s[0]);
        T::wrap(build_rows(v, &f, outer, &segs, inner.len(), total))
    }, str => {
        let Data::Str(v) = src else { unreachable!("the string arm only sees strings") };
        let f = match fill {
            Some(Data::Str(s)) => s[0].clone(),
            _ => String::new(),
        };
        Data::Str(build_rows(v, &f, outer, &segs, inner.len(), total))
    }))
}

/// Transposes a tensor by `perm` (already validated as a permutation of its axes).
fn permute(t: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let st = smelt_tensor::strides_of(t.shape());
    let shape: Vec<usize> = perm.iter().map(|&p| t.shape()[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    let data = strided_copy(t.data(), &shape, &strides, 0);
    Tensor::new(shape, data)
}
