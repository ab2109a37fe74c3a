//! The error function on f32 tensors (GELU's core, a fifth of MiniLM's float time when it went
//! through the scalar f64 series with `exp` and branches).
//!
//! A rational approximation x * P(x^2) / Q(x^2) on [-4, 4] (degrees 13 / 8, the coefficients
//! Eigen and TensorFlow use for float erf), evaluated in f64 so the result stays within 1e-7 of
//! the exact value (1.6 ulp of f32 at worst), outside of which erf rounds to +-1 in f32. No
//! branches, no `exp`: it vectorizes and runs in parallel chunks.

use super::elementwise;

const P: [f64; 7] = [
    -2.726_142_258_013_06e-10,
    2.770_681_424_959_02e-08,
    -2.101_024_020_825_08e-06,
    -5.692_506_394_623_46e-05,
    -7.349_906_303_268_55e-04,
    -2.954_599_808_540_25e-03,
    -1.609_603_332_624_15e-02,
];
const Q: [f64; 5] = [
    -1.456_607_184_649_96e-05,
    -2.133_740_552_789_05e-04,
    -1.682_826_974_382_03e-03,
    -7.373_329_167_204_68e-03,
    -1.426_473_905_141_89e-02,
];

#[inline(always)]
fn erf64(x: f64) -> f64 {
    // NaN passes through clamp and the arithmetic unchanged.
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = P.iter().fold(0.0, |acc, &c| acc * x2 + c);
    let q = Q.iter().fold(0.0, |acc, &c| acc * x2 + c);
    // The approximation reaches 1 + 5e-8 at |x| = 4; the clamp keeps the result in [-1, 1]
    // whatever the rounding.
    (x * p / q).clamp(-1.0, 1.0)
}

#[inline(always)]
fn erf1(v: f32) -> f32 {
    erf64(v as f64) as f32
}

/// `out[i] = erf(x[i])`.
pub fn erf(x: &[f32], out: &mut [f32]) {
    elementwise(x, out, |x, out| {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = erf1(v);
        }
    });
}

/// `out[i] = gelu(x[i]) = 0.5 x (1 + erf(x / sqrt 2))`, in f64 like [`erf`], or in f32 with
/// AVX2 and FMA (within 1e-6 of the exact value either way; f64 takes four lanes and a slow
/// division, which made GELU a tenth of MiniLM's int8 time).
pub fn gelu(x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        let body = |x: &[f32], out: &mut [f32]| {
            // Safety: the CPU has AVX2 and FMA, checked above.
            unsafe { avx2::gelu(x, out) }
        };
        if x.len() <= super::CHUNK {
            body(x, out);
        } else {
            use rayon::prelude::*;
            out.par_chunks_mut(super::CHUNK)
                .zip(x.par_chunks(super::CHUNK))
                .for_each(|(o, x)| body(x, o));
        }
        return;
    }
    elementwise(x, out, |x, out| {
        for (o, &v) in out.iter_mut().zip(x) {
            let v = v as f64;
            *o = (0.5 * v * (1.0 + erf64(v * std::f64::consts::FRAC_1_SQRT_2))) as f32;
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{P, Q};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu(x: &[f32], out: &mut [f32]) {
        let c = _mm256_set1_ps;
        let n8 = x.len().min(out.len()) / 8 * 8;
        for i in (0..n8).step_by(8) {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            let t = _mm256_mul_ps(v, c(std::f32::consts::FRAC_1_SQRT_2));
            // The constant first: max/min return their second operand for NaN.
            let t = _mm256_min_ps(c(4.0), _mm256_max_ps(c(-4.0), t));
            let t2 = _mm256_mul_ps(t, t);
            let mut p = c(P[0] as f32);
            for &k in &P[1..] {
                p = _mm256_fmadd_ps(p, t2, c(k as f32));
            }
            let mut q = c(Q[0] as f32);
            for &k in &Q[1..] {
                q = _mm256_fmadd_ps(q, t2, c(k as f32));
            }
            let e = _mm256_div_ps(_mm256_mul_ps(t, p), q);
            let e = _mm256_min_ps(c(1.0), _mm256_max_ps(c(-1.0), e));
            let half_v = _mm256_mul_ps(v, c(0.5));
            let y = _mm256_fmadd_ps(half_v, e, half_v);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
        }
        for (o, &v) in out[n8..].iter_mut().zip(&x[n8..]) {
            let v = v as f64;
            *o = (0.5 * v * (1.0 + super::erf64(v * std::f64::consts::FRAC_1_SQRT_2))) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn within_1e7_of_the_exact_erf() {
        let xs: Vec<f32> = (-50_000..=50_000).map(|i| i as f32 * 1e-4).collect();
        let mut out = vec![0f32; xs.len()];
        super::erf(&xs, &mut out);
        for (&x, &y) in xs.iter().zip(&out) {
            let want = crate::ops::elementwise::erf(x as f64);
            assert!(
                (y as f64 - want).abs() < 1e-7,
                "erf({x}) = {y}, want {want}"
            );
        }
        let mut edge = [0f32; 4];
        super::erf(&[f32::NAN, f32::INFINITY, -1e30, 0.0], &mut edge);
        assert!(edge[0].is_nan());
        assert_eq!(&edge[1..], &[1.0, -1.0, 0.0]);
    }

    #[test]
    fn gelu_within_1e6_of_the_exact_one() {
        // 20,001 values: the vector path's tail is covered too.
        let xs: Vec<f32> = (-10_000..=10_000).map(|i| i as f32 * 1e-3).collect();
        let mut out = vec![0f32; xs.len()];
        super::gelu(&xs, &mut out);
        for (&x, &y) in xs.iter().zip(&out) {
            let v = x as f64;
            let want = 0.5 * v * (1.0 + crate::ops::elementwise::erf(v / std::f64::consts::SQRT_2));
            assert!(
                (y as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "gelu({x}) = {y}, want {want}"
            );
        }
        let mut edge = [0f32; 8];
        super::gelu(
            &[f32::NAN, f32::INFINITY, -1e30, 0.0, 1e30, -0.0, 50.0, -50.0],
            &mut edge,
        );
        assert!(edge[0].is_nan());
        // Zero's sign is not asserted: the vector path's fused multiply-add gives +0 for very
        // negative inputs, the f64 path -0; both compare equal to 0.
        assert_eq!(&edge[1..], &[f32::INFINITY, 0.0, 0.0, 1e30, 0.0, 50.0, 0.0]);
    }
}
