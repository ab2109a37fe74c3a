//! Direct f32 convolution on AVX-512 with output pixels in the lanes, for layers with few
//! output channels (fewer than a register's 16).
//!
//! [`conv_direct::PackedF32`](super::conv_direct) puts 16 output channels in a register; with
//! 8 or 4 channels half or three quarters of every multiply is waste, and im2col + GEMM spends
//! its time rearranging data instead (MNIST-8's first layer: 1 input, 8 output channels, about
//! 0.2 ms at batch 32 either way for 5 M multiply-adds). Here a register holds 16 neighbouring
//! pixels of one output row; every input value of a window offset is one plain load from a
//! zero-padded copy of the image, multiplied by each output channel's weight (a broadcast
//! folded into the multiply-add). Stores are whole rows, masked at the row's end.
//!
//! Unit strides and dilations only: the loads must be contiguous.

use super::conv_direct::Shape2d;
use super::Scratch;

/// Pixels per register.
const LANES: usize = 16;

/// Whether this CPU has the kernel's instructions, checked once.
pub fn available() -> bool {
    super::conv_direct::available_f32()
}

/// Weights laid out for the kernel: per block of `ob` output channels, per input channel and
/// window offset, the block's `ob` weights side by side (zeros past the last channel).
pub struct RowsF32 {
    s: Shape2d,
    /// Output channels per block (a power of two, at most 16 / `nx`).
    ob: usize,
    /// Registers per output row chunk (1 or 2: 16 or 32 pixels).
    nx: usize,
    w: Vec<f32>,
}

impl RowsF32 {
    /// `w` holds the weights `[out_ch, in_ch, kh, kw]`. `None` for shapes the kernel does not
    /// take (strides other than 1).
    pub fn new(s: Shape2d, w: &[f32]) -> Option<RowsF32> {
        if s.strides != [1, 1] || s.out_ch == 0 || s.output.contains(&0) {
            return None;
        }
        let nx = if s.output[1] > LANES { 2 } else { 1 };
        let ob = s.out_ch.next_power_of_two().min(16 / nx);
        let [kh, kw] = s.kernel;
        let taps = s.in_ch * kh * kw;
        let blocks = s.out_ch.div_ceil(ob);
        let mut out = vec![0f32; blocks * taps * ob];
        for oc in 0..s.out_ch {
            for t in 0..taps {
                out[((oc / ob) * taps + t) * ob + oc % ob] = w[oc * taps + t];
            }
        }
        Some(RowsF32 { s, ob, nx, w: out })
    }

    /// Row length of the padded copy: each row chunk's loads stay inside its row.
    fn padded_width(&self) -> usize {
        self.s.output[1].next_multiple_of(LANES * self.nx) + self.s.kernel[1] - 1
    }

    /// One image: `x` is `[in_ch, h, w]`; `out` receives `[out_ch, oh * ow]`, plus `bias`,
    /// then max(0, v) when `relu` (as the Relu op: NaN and -0 stay).
    pub fn run(&self, x: &[f32], bias: Option<&[f32]>, relu: bool, out: &mut [f32]) {
        let s = &self.s;
        let hp = s.output[0] + s.kernel[0] - 1;
        let wp = self.padded_width();
        f32::with(s.in_ch * hp * wp, |img| {
            img.fill(0.0);
            let [h, w] = s.input;
            let rows = h.min(hp.saturating_sub(s.pads[0]));
            let cols = w.min(wp.saturating_sub(s.pads[1]));
            for c in 0..s.in_ch {
                for y in 0..rows {
                    let dst = &mut img[(c * hp + y + s.pads[0]) * wp + s.pads[1]..][..cols];
                    dst.copy_from_slice(&x[(c * h + y) * w..][..cols]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // Safety: callers check `available()` first; every load stays inside `img`
            // (rows of `wp` values, chunks ending at most at `wp - kw + 1`).
            unsafe {
                self.dispatch(img, hp, wp, bias, relu, out)
            }
        });
    }

    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dispatch(
        &self,
        img: &[f32],
        hp: usize,
        wp: usize,
        bias: Option<&[f32]>,
        relu: bool,
        out: &mut [f32],
    ) {
        macro_rules! go {
            ($($ob:literal, $nx:literal);*) => {
                match (self.ob, self.nx) {
                    $(($ob, $nx) => self.rows::<$ob, $nx>(img, hp, wp, bias, relu, out),)*
                    _ => unreachable!("block sizes are powers of two up to 16 / nx"),
                }
            };
        }
        go!(1, 1; 2, 1; 4, 1; 8, 1; 16, 1; 1, 2; 2, 2; 4, 2; 8, 2)
    }

    /// All output rows, in chunks of `NX` registers, for each block of `OB` output channels.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows<const OB: usize, const NX: usize>(
        &self,
        img: &[f32],
        hp: usize,
        wp: usize,
        bias: Option<&[f32]>,
        relu: bool,
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let s = &self.s;
        let [kh, kw] = s.kernel;
        let [oh, ow] = s.output;
        let osz = oh * ow;
        let taps = s.in_ch * kh * kw;
        debug_assert!(out.len() == s.out_ch * osz && img.len() >= s.in_ch * hp * wp);
        let zero = _mm512_setzero_ps();
        for ob in 0..s.out_ch.div_ceil(OB) {
            let wb = self.w.as_ptr().add(ob * taps * OB);
            let mut b = [zero; OB];
            for (o, bv) in b.iter_mut().enumerate() {
                let oc = ob * OB + o;
                if let Some(bias) = bias.filter(|_| oc < s.out_ch) {
                    *bv = _mm512_set1_ps(bias[oc]);
                }
            }
            for y in 0..oh {
                let mut x0 = 0;
                while x0 < ow {
                    let mut acc = [[zero; NX]; OB];
                    for c in 0..s.in_ch {
                        for ky in 0..kh {
                            let src = img.as_ptr().add((c * hp + y + ky) * wp + x0);
                            let wt = wb.add((c * kh + ky) * kw * OB);
                            for kx in 0..kw {
                                let mut v = [zero; NX];
                                for (j, v) in v.iter_mut().enumerate() {
                                    *v = _mm512_loadu_ps(src.add(kx + j * LANES));
                                }
                                for (o, acc) in acc.iter_mut().enumerate() {
                                    let wv = _mm512_set1_ps(*wt.add(kx * OB + o));
                                    for (a, &v) in acc.iter_mut().zip(&v) {
                                        *a = _mm512_fmadd_ps(v, wv, *a);
                                    }
                                }
                            }
                        }
                    }
                    for (o, acc) in acc.iter().enumerate() {
                        let oc = ob * OB + o;
                        if oc >= s.out_ch {
                            break;
                        }
                        let dst = out.as_mut_ptr().add(oc * osz + y * ow);
                        for (j, &a) in acc.iter().enumerate() {
                            let x = x0 + j * LANES;
                            if x >= ow {
                                break;
                            }
                            let mut v = _mm512_add_ps(a, b[o]);
                            if relu {
                                // Lanes below zero become 0; NaN and -0 compare false and stay.
                                let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, zero);
                                v = _mm512_mask_mov_ps(v, neg, zero);
                            }
                            let n = (ow - x).min(LANES);
                            let mask: __mmask16 = if n == LANES { !0 } else { (1 << n) - 1 };
                            _mm512_mask_storeu_ps(dst.add(x), mask, v);
                        }
                    }
                    x0 += NX * LANES;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The convolution by its definition, in f64.
    fn naive(s: &Shape2d, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
        let [h, wd] = s.input;
        let [kh, kw] = s.kernel;
        let [oh, ow] = s.output;
        let mut out = vec![0f32; s.out_ch * oh * ow];
        for oc in 0..s.out_ch {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut a = bias[oc] as f64;
                    for c in 0..s.in_ch {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let y = (oy + ky) as isize - s.pads[0] as isize;
                                let xx = (ox + kx) as isize - s.pads[1] as isize;
                                if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < wd {
                                    let v = x[(c * h + y as usize) * wd + xx as usize];
                                    let wv = w[((oc * s.in_ch + c) * kh + ky) * kw + kx];
                                    a += v as f64 * wv as f64;
                                }
                            }
                        }
                    }
                    out[(oc * oh + oy) * ow + ox] = a as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_definition() {
        if !available() {
            eprintln!("no AVX-512 on this CPU: the row-wise f32 convolution is not used");
            return;
        }
        // (in, out, input, kernel, pads): MNIST-8's two layers and their halves, rows longer
        // than 32 pixels, a block that is not a power of two, a pointwise one, odd pads.
        for (ci, co, inp, k, pd) in [
            (1, 8, [28, 28], [5, 5], [2, 2]),
            (1, 4, [28, 28], [5, 5], [2, 2]),
            (4, 8, [14, 14], [5, 5], [2, 2]),
            (8, 16, [14, 14], [5, 5], [2, 2]),
            (3, 5, [9, 45], [3, 3], [1, 1]),
            (2, 12, [6, 20], [3, 2], [0, 1]),
            (7, 3, [5, 5], [1, 1], [0, 0]),
        ] {
            let s = Shape2d {
                in_ch: ci,
                out_ch: co,
                input: inp,
                kernel: k,
                output: [0, 1].map(|d| inp[d] + 2 * pd[d] + 1 - k[d]),
                strides: [1, 1],
                pads: pd,
            };
            // Small integers: every sum is exact in f32, whatever the order.
            let x: Vec<f32> = (0..ci * inp[0] * inp[1])
                .map(|i| ((i * 7) % 11) as f32 - 5.0)
                .collect();
            let w: Vec<f32> = (0..co * ci * k[0] * k[1])
                .map(|i| ((i * 5) % 9) as f32 - 4.0)
                .collect();
            let bias: Vec<f32> = (0..co).map(|i| i as f32 * 0.5 - 1.0).collect();
            let want = naive(&s, &x, &w, &bias);
            let kernel = RowsF32::new(s, &w).unwrap();
            let mut got = vec![f32::NAN; want.len()];
            kernel.run(&x, Some(&bias), false, &mut got);
            assert_eq!(got, want, "{s:?}");
            kernel.run(&x, Some(&bias), true, &mut got);
            let relu: Vec<f32> = want.iter().map(|&v| v.max(0.0)).collect();
            assert_eq!(got, relu, "{s:?} with relu");
        }
    }
}
