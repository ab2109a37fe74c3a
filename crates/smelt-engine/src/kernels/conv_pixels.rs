//! Direct f32 convolution on AVX-512 with output pixels in the lanes, for layers with few
//! output channels (up to a register's 16).
//!
//! [`conv_direct::PackedF32`](super::conv_direct) puts 16 output channels in a register; with
//! 8 or 4 channels half or three quarters of every multiply is waste, and im2col + GEMM spends
//! its time rearranging data instead (MNIST-8's first layer: 1 input, 8 output channels, about
//! 0.2 ms at batch 32 either way for 5 M multiply-adds). Here a register holds 16 consecutive
//! pixels of the output plane, and every window offset multiplies them by each output
//! channel's weight (a broadcast folded into the multiply-add). The 16 pixels' inputs at one
//! offset are read from a zero-padded copy of the image with one masked load per output row
//! they cover, so rows shorter than 16 (MNIST-8's 14) leave no lane idle; stores are plain.
//!
//! Unit strides and dilations only: within a row the loads must be contiguous.

use super::conv_direct::Shape2d;
use super::Scratch;

/// Pixels per register.
const LANES: usize = 16;

/// Whether this CPU has the kernel's instructions, checked once.
pub fn available() -> bool {
    super::conv_direct::available_f32()
}

/// The lanes of one register of pixels that lie on one output row: `mask` selects them, and
/// lane `l` reads the padded image at `base + l` (plus the window offset).
#[derive(Clone, Copy, Debug)]
struct Segment {
    base: isize,
    mask: u16,
}

/// The zero-padded copy of one image: `[in_ch, hp, wp]`.
struct Padded<'a> {
    img: &'a [f32],
    hp: usize,
    wp: usize,
}

/// A bias per output channel, then Relu or not.
type Epilogue<'a> = (Option<&'a [f32]>, bool);

/// Weights laid out for the kernel (per block of `ob` output channels, per input channel and
/// window offset, the block's `ob` weights side by side, zeros past the last channel), and
/// each register's row segments.
pub struct PixelsF32 {
    s: Shape2d,
    /// Output channels per block: a power of two up to 16.
    ob: usize,
    w: Vec<f32>,
    /// Per register of pixels, its segments: `segments[starts[i]..starts[i + 1]]`.
    segments: Vec<Segment>,
    starts: Vec<usize>,
}

impl PixelsF32 {
    /// `w` holds the weights `[out_ch, in_ch, kh, kw]`. `None` for shapes the kernel does not
    /// take (strides other than 1).
    pub fn new(s: Shape2d, w: &[f32]) -> Option<PixelsF32> {
        if s.strides != [1, 1] || s.out_ch == 0 || s.output.contains(&0) {
            return None;
        }
        let ob = s.out_ch.next_power_of_two().min(LANES);
        let [kh, kw] = s.kernel;
        let taps = s.in_ch * kh * kw;
        let blocks = s.out_ch.div_ceil(ob);
        let mut packed = vec![0f32; blocks * taps * ob];
        for (oc, w) in w.chunks_exact(taps).take(s.out_ch).enumerate() {
            let dst = &mut packed[(oc / ob) * taps * ob + oc % ob..];
            for (t, &v) in w.iter().enumerate() {
                dst[t * ob] = v;
            }
        }
        let [oh, ow] = s.output;
        let wp = ow + kw - 1;
        let (mut segments, mut starts) = (Vec::new(), vec![0]);
        for p0 in (0..oh * ow).step_by(LANES) {
            let end = (p0 + LANES).min(oh * ow);
            let mut p = p0;
            while p < end {
                let (y, x) = (p / ow, p % ow);
                let run = (ow - x).min(end - p);
                let l0 = p - p0;
                segments.push(Segment {
                    base: (y * wp + x) as isize - l0 as isize,
                    mask: (((1u32 << run) - 1) << l0) as u16,
                });
                p += run;
            }
            starts.push(segments.len());
        }
        Some(PixelsF32 {
            s,
            ob,
            w: packed,
            segments,
            starts,
        })
    }

    /// One image: `x` is `[in_ch, h, w]`; `out` receives `[out_ch, oh * ow]`, plus `bias`,
    /// then max(0, v) when `relu` (as the Relu op: NaN and -0 stay).
    pub fn run(&self, x: &[f32], bias: Option<&[f32]>, relu: bool, out: &mut [f32]) {
        let s = &self.s;
        let hp = s.output[0] + s.kernel[0] - 1;
        let wp = s.output[1] + s.kernel[1] - 1;
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
            // Safety: callers check `available()` first; every lane a segment's mask keeps
            // reads inside `img` (the masked-off lanes are not read).
            unsafe {
                self.dispatch(Padded { img, hp, wp }, (bias, relu), out)
            }
        });
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn dispatch(&self, img: Padded, epi: Epilogue, out: &mut [f32]) {
        let osz = self.s.output[0] * self.s.output[1];
        let block = |ob: usize, o: &mut [f32]| match self.ob {
            1 => self.block::<1>(ob, &img, epi, o),
            2 => self.block::<2>(ob, &img, epi, o),
            4 => self.block::<4>(ob, &img, epi, o),
            8 => self.block::<8>(ob, &img, epi, o),
            16 => self.block::<16>(ob, &img, epi, o),
            _ => unreachable!("block sizes are powers of two up to 16"),
        };
        // (Two threads on one image's blocks were slower at MNIST-8's size: waking the
        // second costs more than half the work.)
        for (ob, o) in out.chunks_mut(self.ob * osz).enumerate() {
            block(ob, o);
        }
    }

    /// Every register of pixels of output channel block `ob` (`OB` channels, `out` holding
    /// those that exist).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const OB: usize>(
        &self,
        ob: usize,
        &Padded { img, hp, wp }: &Padded,
        (bias, relu): Epilogue,
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let s = &self.s;
        let [kh, kw] = s.kernel;
        let osz = s.output[0] * s.output[1];
        let taps = s.in_ch * kh * kw;
        let channels = out.len() / osz;
        debug_assert!(channels <= OB && img.len() >= s.in_ch * hp * wp);
        let zero = _mm512_setzero_ps();
        let origin = img.as_ptr();
        let wb = self.w.as_ptr().add(ob * taps * OB);
        let mut b = [zero; OB];
        if let Some(bias) = bias {
            for (o, bv) in b.iter_mut().take(channels).enumerate() {
                *bv = _mm512_set1_ps(bias[ob * OB + o]);
            }
        }
        for (i, p0) in (0..osz).step_by(LANES).enumerate() {
            let segs = &self.segments[self.starts[i]..self.starts[i + 1]];
            let mut acc = b;
            for c in 0..s.in_ch {
                for ky in 0..kh {
                    let row = ((c * hp + ky) * wp) as isize;
                    let wt = wb.add((c * kh + ky) * kw * OB);
                    for kx in 0..kw {
                        // Lanes outside a segment's mask may point outside `img`; they are
                        // not read. The first load needs no merge (no wait on a register).
                        let at = |sg: &Segment| origin.wrapping_offset(sg.base + row + kx as isize);
                        let mut v = _mm512_maskz_loadu_ps(segs[0].mask, at(&segs[0]));
                        for sg in &segs[1..] {
                            v = _mm512_mask_loadu_ps(v, sg.mask, at(sg));
                        }
                        for (o, a) in acc.iter_mut().enumerate() {
                            let wv = _mm512_set1_ps(*wt.add(kx * OB + o));
                            *a = _mm512_fmadd_ps(v, wv, *a);
                        }
                    }
                }
            }
            let mask = super::first_lanes(osz - p0);
            for (o, &a) in acc.iter().take(channels).enumerate() {
                let mut v = a;
                if relu {
                    // Lanes below zero become 0; NaN and -0 compare false and stay.
                    let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, zero);
                    v = _mm512_mask_mov_ps(v, neg, zero);
                }
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(o * osz + p0), mask, v);
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
            eprintln!("no AVX-512 on this CPU: the pixel-wise f32 convolution is not used");
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
            let kernel = PixelsF32::new(s, &w).unwrap();
            let mut got = vec![f32::NAN; want.len()];
            kernel.run(&x, Some(&bias), false, &mut got);
            assert_eq!(got, want, "{s:?}");
            kernel.run(&x, Some(&bias), true, &mut got);
            let relu: Vec<f32> = want.iter().map(|&v| v.max(0.0)).collect();
            assert_eq!(got, relu, "{s:?} with relu");
        }
    }
}
