//! Softmax over the last axis of f32 rows (attention scores: MiniLM at batch 32 runs 6.3M of
//! them per layer), with an `exp` that vectorizes.
//!
//! `exp` is Cephes' single-precision scheme: x = n ln 2 + r with |r| <= ln 2 / 2, a degree-6
//! polynomial for e^r, and 2^n put into the exponent bits; within 2 ulp of the exact value on
//! [-87, 88]. Below -87 it returns e^-87 (about 1.6e-38) instead of a subnormal or 0, which
//! softmax cannot tell apart from 0 next to its row maximum's e^0 = 1.

use super::simd;
use rayon::prelude::*;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two so that `n * LN2_HI` is exact for the n that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting 1.5 * 2^23 rounds to the nearest integer without a library call.
const MAGIC: f32 = 12_582_912.0;

#[inline(always)]
fn exp(x: f32) -> f32 {
    // NaN stays NaN through clamp and the arithmetic.
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4f32;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n: n is in [-126, 127], a normal float's exponent.
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    e * two_n
}

/// One row: `out = exp(x - max) / sum`. The maximum and the sum run in eight lanes: a single
/// running float sum is a serial chain the compiler may not reorder, and it would keep the
/// exponentials from vectorizing too.
#[inline(always)]
fn row(x: &[f32], out: &mut [f32]) {
    let greater = |a: f32, v: f32| if v > a { v } else { a };
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| greater(a, v));
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = greater(*l, v);
        }
    }
    let m = lanes.iter().fold(m, |a, &v| greater(a, v));
    for (o, &v) in out.iter_mut().zip(x) {
        *o = exp(v - m);
    }
    let mut sums = [0f32; 8];
    let chunks = out.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (s, &v) in sums.iter_mut().zip(c) {
            *s += v;
        }
    }
    let inv = 1.0 / (sums.iter().sum::<f32>() + tail);
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// Softmax of each `len`-element row of `x` into `out`, in parallel for large inputs.
pub fn softmax_rows(x: &[f32], len: usize, out: &mut [f32]) {
    if len == 0 {
        return;
    }
    let rows = |x: &[f32], out: &mut [f32]| {
        for (x, o) in x.chunks(len).zip(out.chunks_mut(len)) {
            row(x, o);
        }
    };
    // Tasks of whole rows, about 32K elements each.
    let per_task = (super::CHUNK / len).max(1) * len;
    if x.len() <= per_task {
        simd(x, out, &rows);
    } else {
        out.par_chunks_mut(per_task)
            .zip(x.par_chunks(per_task))
            .for_each(|(o, x)| simd(x, o, &rows));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_within_2_ulp() {
        for i in -86_990..=87_990 {
            let x = i as f32 * 1e-3;
            let want = (x as f64).exp();
            let got = super::exp(x) as f64;
            let ulp = (want as f32).abs() * f32::EPSILON;
            assert!(
                (got - want).abs() <= 2.0 * ulp as f64,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert!(super::exp(f32::NAN).is_nan());
        assert!(super::exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn rows_sum_to_one_and_match_the_plain_softmax() {
        let x: Vec<f32> = (0..3 * 70)
            .map(|i| ((i * 37) % 23) as f32 * 0.7 - 8.0)
            .collect();
        let mut out = vec![0f32; x.len()];
        super::softmax_rows(&x, 70, &mut out);
        for (xr, or) in x.chunks(70).zip(out.chunks(70)) {
            let m = xr.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let s: f64 = xr.iter().map(|&v| (v as f64 - m).exp()).sum();
            for (&v, &o) in xr.iter().zip(or) {
                let want = (v as f64 - m).exp() / s;
                assert!(
                    (o as f64 - want).abs() <= 1e-6 * want + 1e-12,
                    "{o} vs {want}"
                );
            }
        }
    }
}
