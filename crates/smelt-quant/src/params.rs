//! Scales and zero points: from a clipping range to (scale, zero point), and the affine maps
//! q = clamp(round(x / s) + z) and x' = (q - z) * s, exactly as ONNX QuantizeLinear /
//! DequantizeLinear compute them (f32 division, round half to even, saturation).

use crate::scheme::QType;
use serde::Serialize;

/// Scale and zero point for one group of elements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine {
    pub scale: f32,
    pub zero_point: i32,
}

impl Affine {
    /// Maps [lo, hi] (widened to contain 0 so that zero is exact, which padding and ReLU
    /// need) onto the type's codes. A degenerate range gets scale 1 so nothing divides by 0.
    pub fn from_range(lo: f32, hi: f32, qtype: QType, symmetric: bool) -> Affine {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        if symmetric {
            let (qmin, qmax) = qtype.symmetric_range();
            let amax = lo.abs().max(hi.abs());
            let half = (qmax - qmin) as f32 / 2.0;
            let scale = if amax > 0.0 { amax / half } else { 1.0 };
            let zero_point = (qmin + qmax + 1).div_euclid(2);
            Affine { scale, zero_point }
        } else {
            let (qmin, qmax) = qtype.range();
            let span = hi - lo;
            if span <= 0.0 || !span.is_finite() {
                return Affine {
                    scale: 1.0,
                    zero_point: qmin.max(0).min(qmax),
                };
            }
            let scale = span / (qmax - qmin) as f32;
            let zp = (qmin as f32 - lo / scale).round_ties_even() as i32;
            Affine {
                scale,
                zero_point: zp.clamp(qmin, qmax),
            }
        }
    }

    #[inline]
    pub fn quantize(&self, x: f32, (qmin, qmax): (i32, i32)) -> i32 {
        let q = round_ties_even(x / self.scale) + self.zero_point as f32;
        q.clamp(qmin as f32, qmax as f32) as i32
    }

    #[inline]
    pub fn dequantize(&self, q: i32) -> f32 {
        (q - self.zero_point) as f32 * self.scale
    }

    #[inline]
    pub fn fake(&self, x: f32, range: (i32, i32)) -> f32 {
        self.dequantize(self.quantize(x, range))
    }
}

/// How far a quantized tensor is from the original.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ErrorStats {
    pub mse: f64,
    /// Signal-to-quantization-noise ratio in dB (infinite when exact).
    pub sqnr_db: f64,
}

impl ErrorStats {
    pub fn between(orig: &[f32], approx: &[f32]) -> ErrorStats {
        let (mut sig, mut noise) = (0.0f64, 0.0f64);
        for (&a, &b) in orig.iter().zip(approx) {
            sig += (a as f64) * (a as f64);
            let d = a as f64 - b as f64;
            noise += d * d;
        }
        let n = orig.len().max(1) as f64;
        let sqnr_db = if noise == 0.0 {
            f64::INFINITY
        } else if sig == 0.0 {
            f64::NEG_INFINITY
        } else {
            10.0 * (sig / noise).log10()
        };
        ErrorStats {
            mse: noise / n,
            sqnr_db,
        }
    }
}

/// `t.round_ties_even()` without the libm call it compiles to on baseline x86-64 (a fifth of
/// quantizing MiniLM's weights): adding and subtracting 1.5 * 2^23 rounds half to even
/// exactly for |t| < 2^22 (but gives +0 for -0.5..=0); larger values and NaN take the library
/// path.
#[inline]
pub fn round_ties_even(t: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    if t.abs() < 4_194_304.0 {
        (t + MAGIC) - MAGIC
    } else {
        t.round_ties_even()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn fast_rounding_equals_the_library() {
        let mut vals = vec![
            4_194_303.5f32,
            -4_194_303.5,
            4_194_304.0,
            8_388_607.5,
            -1e9,
            3e-8,
        ];
        // Quarter steps: ties (x.5) and plain roundings, both signs.
        vals.extend((0..400_000).map(|i| (i as f32 - 200_000.0) * 0.25));
        vals.extend((0..1000).map(|i| 4_194_000.0 + i as f32 * 0.5));
        for v in vals {
            let (a, b) = (round_ties_even(v), v.round_ties_even());
            assert!(a == b, "{v}: {a} vs {b}");
        }
        assert!(round_ties_even(f32::NAN).is_nan());
    }
    use super::*;

    #[test]
    fn asymmetric_uint8_matches_hand_computation() {
        let a = Affine::from_range(-1.0, 3.0, QType::U8, false);
        assert!((a.scale - 4.0 / 255.0).abs() < 1e-9);
        assert_eq!(a.zero_point, 64); // round(0 - (-1) / (4/255)) = round(63.75)
        assert_eq!(a.quantize(0.0, QType::U8.range()), 64);
        assert_eq!(a.quantize(10.0, QType::U8.range()), 255);
        assert_eq!(a.quantize(-10.0, QType::U8.range()), 0);
        assert_eq!(a.dequantize(64), 0.0);
    }

    #[test]
    fn symmetric_int8_and_int4() {
        let a = Affine::from_range(-0.5, 2.54, QType::I8, true);
        assert!((a.scale - 2.54 / 127.0).abs() < 1e-9);
        assert_eq!(a.zero_point, 0);
        let r = QType::I8.symmetric_range();
        assert_eq!(a.quantize(2.54, r), 127);
        assert_eq!(a.quantize(-2.54, r), -127);
        let b = Affine::from_range(-7.0, 1.0, QType::I4, true);
        assert_eq!(b.scale, 1.0);
        assert_eq!(b.quantize(-7.4, QType::I4.symmetric_range()), -7);
        // Ties round to even, as ONNX QuantizeLinear does.
        assert_eq!(b.quantize(2.5, QType::I4.symmetric_range()), 2);
        let u = Affine::from_range(-1.0, 1.0, QType::U8, true);
        assert_eq!(u.zero_point, 128);
    }

    #[test]
    fn degenerate_ranges_never_divide_by_zero() {
        let a = Affine::from_range(0.0, 0.0, QType::U8, false);
        assert_eq!(a.scale, 1.0);
        assert_eq!(a.quantize(0.0, QType::U8.range()), 0);
        let b = Affine::from_range(0.0, 0.0, QType::I8, true);
        assert_eq!(b.scale, 1.0);
    }

    #[test]
    fn sqnr() {
        let e = ErrorStats::between(&[1.0, -1.0], &[1.1, -1.0]);
        assert!((e.mse - 0.005).abs() < 1e-6);
        assert!((e.sqnr_db - 10.0 * (2.0f64 / 0.01).log10()).abs() < 1e-3);
    }
}
