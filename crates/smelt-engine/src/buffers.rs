//! Float buffers kept across runs of a session, for ops whose kernels write every element of
//! their output.
//!
//! A fresh `vec![0.0; n]` costs a memset when the allocator hands back memory it already had
//! (it usually does, run after run): MNIST-8's two convolution outputs at batch 32, 1.2 MB,
//! were about 5% of its run. A buffer taken from here is recycled memory, already initialized,
//! so nothing is cleared.
//!
//! The pool keeps a freed buffer only for a length some op asked for and did not find, and no
//! more of one length than were ever missing at once, so what it holds between runs stays
//! below what one run needed at its peak.

use std::collections::HashMap;
use std::sync::Mutex;

/// Buffers shorter than this are cheaper to clear than to look up.
const MIN_LEN: usize = 1 << 12;

/// At most this many buffers are held.
const MAX_HELD: usize = 64;

#[derive(Default)]
pub struct Buffers {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    free: Vec<Vec<f32>>,
    /// Per length: how many buffers of it ops have asked for and not found (in total).
    wanted: HashMap<usize, usize>,
}

impl Buffers {
    /// `n` floats of unspecified value: the caller overwrites all of them.
    pub fn take(&self, n: usize) -> Vec<f32> {
        if n >= MIN_LEN {
            let mut p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = p.free.iter().rposition(|v| v.len() == n) {
                return p.free.swap_remove(i);
            }
            *p.wanted.entry(n).or_default() += 1;
        }
        vec![0.0; n]
    }

    /// Hands back a buffer nothing reads any more; kept if an op may want its length.
    pub fn give(&self, v: Vec<f32>) {
        if v.len() < MIN_LEN {
            return;
        }
        let mut p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let wanted = p.wanted.get(&v.len()).copied().unwrap_or(0);
        let held = p.free.iter().filter(|b| b.len() == v.len()).count();
        if held < wanted && p.free.len() < MAX_HELD {
            p.free.push(v);
        }
    }

    /// Floats held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        let p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        p.free.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_lengths_that_were_missing_and_never_more_than_were_missing() {
        let b = Buffers::default();
        // Nobody asked for this length: dropped.
        b.give(vec![1.0; 5000]);
        assert_eq!(b.held(), 0);
        // Two missing at once, then both freed: both kept; a third is not.
        let (x, y) = (b.take(5000), b.take(5000));
        assert!(x.iter().chain(&y).all(|&v| v == 0.0));
        b.give(x);
        b.give(y);
        b.give(vec![2.0; 5000]);
        assert_eq!(b.held(), 10_000);
        // Taken back as they were: recycled, not cleared, and no new want recorded.
        let mut x = b.take(5000);
        x[0] = 7.0;
        b.give(x);
        assert_eq!(b.take(5000)[0], 7.0);
        // Small buffers are never pooled.
        let s = b.take(10);
        b.give(s);
        assert_eq!(b.held(), 5000);
    }
}
