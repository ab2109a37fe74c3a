//! Softmax over the last axis of f32 rows (attention scores: MiniLM at batch 32 runs 6.3M of
//! them per layer), with an `exp` that vectorizes.
//!
//! `exp` is Cephes' single-precision scheme: x = n ln 2 + r with |r| <= ln 2 / 2, a degree-6
//! polynomial for e^r, and 2^n put into the exponent bits; within 2 ulp of the exact value on
//! [-87, 88]. Below -87 it returns e^-87 (about 1.6e-38) instead of a subnormal or 0, which
//! softmax cannot tell apart from 0 next to its row maximum's e^0 = 1.

use super::quant::Grid;
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

/// One row: `out = exp(x - max) / sum`.
#[inline(always)]
fn row(x: &[f32], out: &mut [f32]) {
    let m = row_max(x);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = exp(v - m);
    }
    normalize(out);
}

/// [`row`] where the input is already in `out`.
#[inline(always)]
fn in_place(out: &mut [f32]) {
    let m = row_max(out);
    for o in out.iter_mut() {
        *o = exp(*o - m);
    }
    normalize(out);
}

/// The maximum and the sum run in eight lanes: a single running float sum is a serial chain
/// the compiler may not reorder, and it would keep the exponentials from vectorizing too.
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
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
    lanes.iter().fold(m, |a, &v| greater(a, v))
}

/// Divides the exponentials by their sum.
#[inline(always)]
fn normalize(out: &mut [f32]) {
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
    softmax_rows_with(x, len, None, Epilogue::default(), out)
}

/// What attention does around its softmax, done while a row is still in cache: a mask added
/// before, and after it NaN (a fully masked row) replaced by 0 and the result snapped onto the
/// grid of the quantized MatMul that reads it.
#[derive(Clone, Copy, Default)]
pub struct Epilogue {
    pub nan_to_zero: bool,
    pub grid: Option<Grid>,
}

/// An additive term broadcast over rows: row `r` of the input adds `values[starts[r]..][..len]`.
pub struct RowBias<'a> {
    pub values: &'a [f32],
    pub starts: &'a [usize],
}

/// [`softmax_rows`] of `x + bias`, followed by the epilogue.
pub fn softmax_rows_with(
    x: &[f32],
    len: usize,
    bias: Option<RowBias>,
    epi: Epilogue,
    out: &mut [f32],
) {
    if len == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    let fast = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    let rows = |first: usize, x: &[f32], out: &mut [f32]| {
        for (r, (x, o)) in x.chunks(len).zip(out.chunks_mut(len)).enumerate() {
            #[cfg(target_arch = "x86_64")]
            if fast {
                match &bias {
                    Some(b) => {
                        let at = b.starts[first + r];
                        for ((o, &v), &m) in o.iter_mut().zip(x).zip(&b.values[at..at + len]) {
                            *o = v + m;
                        }
                    }
                    None => o.copy_from_slice(x),
                }
                // Safety: the CPU has AVX2 and FMA, checked above.
                unsafe { avx2::in_place(o, epi) };
                continue;
            }
            match &bias {
                Some(b) => {
                    let at = b.starts[first + r];
                    for ((o, &v), &m) in o.iter_mut().zip(x).zip(&b.values[at..at + len]) {
                        *o = v + m;
                    }
                    in_place(o);
                }
                None => row(x, o),
            }
            if epi.nan_to_zero {
                for o in o.iter_mut() {
                    if o.is_nan() {
                        *o = 0.0;
                    }
                }
            }
            if let Some(g) = epi.grid {
                for o in o.iter_mut() {
                    *o = g.snap(*o);
                }
            }
        }
    };
    // Tasks of whole rows, about 32K elements each.
    let per_task = (super::CHUNK / len).max(1) * len;
    let rows_per_task = per_task / len;
    if x.len() <= per_task {
        simd(x, out, &|x: &[f32], o: &mut [f32]| rows(0, x, o));
    } else {
        out.par_chunks_mut(per_task)
            .zip(x.par_chunks(per_task))
            .enumerate()
            .for_each(|(t, (o, x))| {
                simd(x, o, &|x: &[f32], o: &mut [f32]| {
                    rows(t * rows_per_task, x, o)
                })
            });
    }
}

/// The row in AVX2 and FMA: the compiler does not vectorize the portable `exp` on its own.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Epilogue, LN2_HI, LN2_LO, LOG2E};
    use std::arch::x86_64::*;

    /// The portable `exp`, eight lanes at a time, with fused multiply-adds (so it may differ
    /// from it in the last bit).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp8(x: __m256) -> __m256 {
        let c = _mm256_set1_ps;
        // The constant first: max/min return their second operand for NaN, so NaN survives.
        let x = _mm256_min_ps(c(88.0), _mm256_max_ps(c(-87.0), x));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, c(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, c(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, c(LN2_LO), r);
        let mut p = c(1.987_569_2e-4);
        for k in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm256_fmadd_ps(p, r, c(k));
        }
        let e = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, c(1.0)));
        let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(e, _mm256_castsi256_ps(two_n))
    }

    /// Softmax of `o` in place, then the epilogue.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn in_place(o: &mut [f32], epi: Epilogue) {
        let n8 = o.len() / 8 * 8;
        // The vector part through a pointer, the tail as a slice: disjoint borrows.
        let (head, tail) = o.split_at_mut(n8);
        let p = head.as_mut_ptr();
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..n8).step_by(8) {
            m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(i)));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let greater = |a: f32, v: f32| if v > a { v } else { a };
        let m = tail
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |a, &v| greater(a, v));
        let mv = _mm256_set1_ps(m);
        let mut sum = _mm256_setzero_ps();
        for i in (0..n8).step_by(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
            sum = _mm256_add_ps(sum, e);
            _mm256_storeu_ps(p.add(i), e);
        }
        let mut tail_sum = 0.0;
        for v in tail.iter_mut() {
            *v = super::exp(*v - m);
            tail_sum += *v;
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        let inv = 1.0 / (lanes.iter().sum::<f32>() + tail_sum);
        let iv = _mm256_set1_ps(inv);
        for i in (0..n8).step_by(8) {
            let mut v = _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), iv);
            if epi.nan_to_zero {
                v = _mm256_andnot_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), v);
            }
            if let Some(g) = &epi.grid {
                v = g.snap8(v);
            }
            _mm256_storeu_ps(p.add(i), v);
        }
        for v in tail.iter_mut() {
            *v *= inv;
            if epi.nan_to_zero && v.is_nan() {
                *v = 0.0;
            }
            if let Some(g) = &epi.grid {
                *v = g.snap(*v);
            }
        }
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_within_2_ulp() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        use std::arch::x86_64::*;
        for i in (-86_990..=87_990).step_by(8) {
            let x: [f32; 8] = std::array::from_fn(|k| (i + k as i32) as f32 * 1e-3);
            let mut got = [0f32; 8];
            // Safety: the CPU has AVX2 and FMA, checked above.
            unsafe {
                _mm256_storeu_ps(
                    got.as_mut_ptr(),
                    super::avx2::exp8(_mm256_loadu_ps(x.as_ptr())),
                )
            };
            for (&x, &got) in x.iter().zip(&got) {
                let want = (x as f64).exp();
                let ulp = (want as f32).abs() * f32::EPSILON;
                assert!(
                    (got as f64 - want).abs() <= 2.0 * ulp as f64,
                    "exp({x}) = {got}"
                );
            }
        }
    }

    /// Mask, NaN-to-zero and grid, over enough rows (100 x 70 x 8 values) for the parallel
    /// path, where each task must find its rows' mask from its first row.
    #[test]
    fn fused_rows_match_mask_softmax_nan_zero_and_snap() {
        use super::{Epilogue, RowBias};
        use crate::kernels::quant::Grid;
        let (rows, len) = (800usize, 70usize);
        let x: Vec<f32> = (0..rows * len)
            .map(|i| ((i * 31) % 29) as f32 * 0.5 - 7.0)
            .collect();
        // Eight mask rows, each used by a hundred consecutive rows; row 3 fully masked.
        let mask: Vec<f32> = (0..8 * len)
            .map(|i| {
                if i / len == 3 || (i % len) % 5 == 0 {
                    f32::NEG_INFINITY
                } else {
                    (i % 3) as f32
                }
            })
            .collect();
        let starts: Vec<usize> = (0..rows).map(|r| (r / 100) * len).collect();
        let grid = Grid::new(1.0f32 / 255.0, 0u8);
        let mut out = vec![0f32; x.len()];
        let epi = Epilogue {
            nan_to_zero: true,
            grid: Some(grid),
        };
        let bias = RowBias {
            values: &mask,
            starts: &starts,
        };
        super::softmax_rows_with(&x, len, Some(bias), epi, &mut out);
        for r in 0..rows {
            let m = &mask[starts[r]..][..len];
            let v: Vec<f64> = x[r * len..][..len]
                .iter()
                .zip(m)
                .map(|(&a, &b)| (a + b) as f64)
                .collect();
            let mx = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = v.iter().map(|&a| (a - mx).exp()).sum();
            for (j, &a) in v.iter().enumerate() {
                let p = (a - mx).exp() / s;
                let want = if p.is_nan() { 0.0 } else { grid.snap(p as f32) };
                let got = out[r * len + j];
                // A value on a rounding boundary may land one step away.
                assert!(
                    (got - want).abs() <= 1.0 / 255.0 + 1e-7,
                    "row {r} col {j}: {got} vs {want}"
                );
                if r / 100 == 3 {
                    assert_eq!(got.to_bits(), 0, "fully masked row {r}");
                }
            }
        }
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
