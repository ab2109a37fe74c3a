//! Numpy-style multidirectional broadcasting, as ONNX defines it.

use crate::{bail, Result};

/// The broadcast result shape of two shapes, or a shape error naming both.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            bail!(Shape, "cannot broadcast shapes {:?} and {:?}", a, b);
        };
    }
    Ok(out)
}

/// Row-major strides (in elements).
pub fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Strides of `shape` seen through the broadcast to `out` (0 on broadcast dims). `shape` must
/// broadcast to `out`.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let st = strides_of(shape);
    let off = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < off || shape[i - off] == 1 {
                0
            } else {
                st[i - off]
            }
        })
        .collect()
}

/// Iterates the flat source offsets of every output element, in output order, for a source
/// viewed with arbitrary strides (broadcast, transposed, sliced). Odometer-style; the innermost
/// dimension is a plain stride walk.
pub struct BroadcastIter {
    shape: Vec<usize>,
    strides: Vec<usize>,
    idx: Vec<usize>,
    offset: usize,
    remaining: usize,
}

impl BroadcastIter {
    pub fn new(out_shape: &[usize], strides: Vec<usize>, base: usize) -> Self {
        let remaining = out_shape.iter().product();
        BroadcastIter {
            shape: out_shape.to_vec(),
            strides,
            idx: vec![0; out_shape.len()],
            offset: base,
            remaining,
        }
    }

    /// Offsets for reading `src_shape` broadcast to `out_shape`.
    pub fn broadcast(src_shape: &[usize], out_shape: &[usize]) -> Self {
        Self::new(out_shape, broadcast_strides(src_shape, out_shape), 0)
    }
}

impl Iterator for BroadcastIter {
    type Item = usize;
    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let cur = self.offset;
        for d in (0..self.shape.len()).rev() {
            self.idx[d] += 1;
            self.offset += self.strides[d];
            if self.idx[d] < self.shape[d] {
                break;
            }
            self.offset -= self.strides[d] * self.idx[d];
            self.idx[d] = 0;
        }
        Some(cur)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for BroadcastIter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasts_like_numpy() {
        assert_eq!(
            broadcast_shapes(&[2, 1, 3], &[4, 1]).unwrap(),
            vec![2, 4, 3]
        );
        assert!(broadcast_shapes(&[2, 3], &[4, 3]).is_err());
        let offs: Vec<usize> = BroadcastIter::broadcast(&[3, 1], &[3, 2]).collect();
        assert_eq!(offs, vec![0, 0, 1, 1, 2, 2]);
        let offs: Vec<usize> = BroadcastIter::broadcast(&[2], &[2, 2]).collect();
        assert_eq!(offs, vec![0, 1, 0, 1]);
    }
}
