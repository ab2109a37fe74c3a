//! Hot loops behind the ops. Each kernel has a narrow, slice-based interface.

pub mod conv;
pub mod conv_direct;
pub mod conv_pixels;
pub mod erf;
pub mod gemm;
pub mod pool;
pub mod quant;
pub mod softmax;

use rayon::prelude::*;

/// The mask of a 16-lane register's first `n` lanes (all 16 when `n >= 16`): the masked loads
/// and stores at the end of a row.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn first_lanes(n: usize) -> u16 {
    if n >= 16 {
        !0
    } else {
        (1u16 << n) - 1
    }
}

/// Elements per parallel task of an elementwise loop: below this one thread does it all.
pub(crate) const CHUNK: usize = 1 << 15;

/// Runs `body` on `x` and `out` in chunks, in parallel when large, compiled for AVX2 when the
/// CPU has it (the loops are the same; the wider registers are the gain).
pub(crate) fn elementwise<A: Sync, B: Send>(
    x: &[A],
    out: &mut [B],
    body: impl Fn(&[A], &mut [B]) + Sync,
) {
    let one = |x: &[A], out: &mut [B]| simd(x, out, &body);
    if x.len() <= CHUNK {
        one(x, out);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| one(x, o));
    }
}

/// Runs `body` once on the whole of `x` and `out`, compiled for AVX2 when the CPU has it.
pub(crate) fn simd<A, B>(x: &[A], out: &mut [B], body: &impl Fn(&[A], &mut [B])) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // Safety: the CPU has AVX2, checked just above.
        unsafe { avx2(x, out, body) };
        return;
    }
    body(x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2<A, B>(x: &[A], out: &mut [B], body: &impl Fn(&[A], &mut [B])) {
    body(x, out)
}

/// A buffer kept per thread for scratch space a kernel fills completely on every call
/// (im2col): a fresh `vec![0; n]` per call zeroes memory only to overwrite it, and on a small
/// model that zeroing cost a tenth of the run.
pub(crate) trait Scratch: Copy + Default + 'static {
    /// Runs `f` on `len` elements of this thread's buffer, of unspecified contents.
    fn with<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

/// Largest scratch buffer kept per thread and type, in bytes; larger ones are made per call
/// (for those the work dwarfs the zeroing anyway).
const SCRATCH_KEEP: usize = 16 << 20;

macro_rules! scratch {
    ($t:ty) => {
        impl Scratch for $t {
            fn with<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                thread_local!(static BUF: std::cell::RefCell<Vec<$t>> =
                    const { std::cell::RefCell::new(Vec::new()) });
                if len * std::mem::size_of::<$t>() > SCRATCH_KEEP {
                    // Not kept: a large model's buffers would stay allocated on every thread.
                    return f(&mut vec![<$t>::default(); len]);
                }
                BUF.with(|b| match b.try_borrow_mut() {
                    Ok(mut v) => {
                        if v.len() < len {
                            v.resize(len, <$t>::default());
                        }
                        f(&mut v[..len])
                    }
                    // A nested call on this thread (a stolen task inside `f`): its own buffer.
                    Err(_) => f(&mut vec![<$t>::default(); len]),
                })
            }
        }
    };
}

scratch!(f32);
scratch!(i8);
scratch!(u8);
