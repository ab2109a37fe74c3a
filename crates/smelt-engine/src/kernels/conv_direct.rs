//! Direct 2-D convolutions on AVX-512, for narrow layers.
//!
//! Through im2col and a GEMM library, a narrow convolution spends most of its time
//! rearranging data: the patch matrix is written out, then packed again into the library's
//! layout, and with 8 or 16 output channels each packed value is used only that many times
//! (MNIST-8: the multiply was a twentieth of the int8 run, a third of the float one). Here the
//! image is copied once into a padded channels-last buffer, where the `kw x C` values one
//! kernel row reads for one output pixel are contiguous, and each is broadcast against a
//! register holding its weights for 16 output channels, which serves 8 pixels at a time.
//! Nothing is packed per call but the (small) weights.
//!
//! - int8 ([`Packed`]): `vpdpbusd` (AVX-512 VNNI) multiplies u8 activations by i8 weights
//!   four at a time and adds them into i32 lanes without saturation.
//! - f32 ([`PackedF32`]): one fused multiply-add per input value. Its sums run in another
//!   order than the GEMM's, so results differ from the im2col path by float rounding.

use super::Scratch;

/// Pixels computed together: each weight register is loaded once for this many.
const PIXELS: usize = 8;
/// Output channels per register (16 i32 or f32 lanes).
pub const LANES: usize = 16;

/// Whether this CPU has the int8 kernel's instructions, checked once.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has the f32 kernel's instructions, checked once.
pub fn available_f32() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One 2-D convolution's shape (a single group, unit dilation).
#[derive(Clone, Copy, Debug)]
pub struct Shape2d {
    pub in_ch: usize,
    pub out_ch: usize,
    pub input: [usize; 2],
    pub kernel: [usize; 2],
    pub output: [usize; 2],
    pub strides: [usize; 2],
    pub pads: [usize; 2],
}

impl Shape2d {
    /// Rows and columns of the padded channels-last image: exactly what the windows cover.
    fn padded(&self) -> [usize; 2] {
        [0, 1].map(|d| (self.output[d].max(1) - 1) * self.strides[d] + self.kernel[d])
    }

    /// Writes image `x` (`[in_ch, h, w]`) into `img` as `[hp, wp, cp]`, each value through
    /// `map`, the padding (and channels past `in_ch`) filled with `fill`.
    fn channels_last<S: Copy, T: Copy>(
        &self,
        x: &[S],
        fill: T,
        cp: usize,
        img: &mut [T],
        map: impl Fn(S) -> T,
    ) {
        let [hp, wp] = self.padded();
        img.fill(fill);
        let [h, w] = self.input;
        let rows = h.min(hp.saturating_sub(self.pads[0]));
        let cols = w.min(wp.saturating_sub(self.pads[1]));
        for c in 0..self.in_ch {
            for y in 0..rows {
                let src = &x[(c * h + y) * w..][..cols];
                let dst = &mut img[((y + self.pads[0]) * wp + self.pads[1]) * cp + c..];
                for (k, &v) in src.iter().enumerate() {
                    dst[k * cp] = map(v);
                }
            }
        }
    }

    /// Per output pixel, the offset of its window's first value in the padded image.
    fn pixel_offsets(&self, wp: usize, cp: usize) -> Vec<usize> {
        let ow = self.output[1];
        (0..self.output[0] * ow)
            .map(|p| ((p / ow) * self.strides[0] * wp + (p % ow) * self.strides[1]) * cp)
            .collect()
    }
}

/// Weights rearranged for the kernel: per block of 16 output channels, per kernel row, per
/// group of four bytes of that row's `kw x cp` patch, 16 channels x 4 bytes (one register).
pub struct Packed {
    s: Shape2d,
    /// Channels padded so that a patch row is a whole number of 4-byte groups.
    cp: usize,
    /// 4-byte groups per kernel row.
    groups: usize,
    w: Vec<i8>,
    /// Per output channel, the sum of its weights (the zero-point correction).
    wsum: Vec<i32>,
}

impl Packed {
    /// `w` holds i8 weights `[out_ch, in_ch, kh, kw]`.
    pub fn new(s: Shape2d, w: &[i8]) -> Packed {
        let [kh, kw] = s.kernel;
        let cp = if (kw * s.in_ch).is_multiple_of(4) {
            s.in_ch
        } else {
            s.in_ch.next_multiple_of(4)
        };
        let groups = kw * cp / 4;
        let blocks = s.out_ch.div_ceil(LANES);
        let mut out = vec![0i8; blocks * kh * groups * LANES * 4];
        let mut wsum = vec![0i32; s.out_ch];
        for oc in 0..s.out_ch {
            for c in 0..s.in_ch {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let v = w[((oc * s.in_ch + c) * kh + ky) * kw + kx];
                        wsum[oc] += v as i32;
                        // Byte `kx * cp + c` of the patch row, in group `/ 4`, lane `% 4`.
                        let byte = kx * cp + c;
                        let at = ((((oc / LANES) * kh + ky) * groups + byte / 4) * LANES
                            + oc % LANES)
                            * 4
                            + byte % 4;
                        out[at] = v;
                    }
                }
            }
        }
        Packed {
            s,
            cp,
            groups,
            w: out,
            wsum,
        }
    }

    /// One image: `x` is `[in_ch, h, w]` i8 with zero point `zx`; `acc` receives the exact
    /// sums `sum (x - zx) * w` as `[out_ch, oh * ow]`.
    pub fn run(&self, x: &[i8], zx: i8, acc: &mut [i32]) {
        let [hp, wp] = self.s.padded();
        // The instruction wants unsigned activations: shift both values and zero point by 128.
        let zx = (zx as u8) ^ 0x80;
        u8::with(hp * wp * self.cp, |img| {
            self.s
                .channels_last(x, zx, self.cp, img, |v| (v as u8) ^ 0x80);
            #[cfg(target_arch = "x86_64")]
            // Safety: callers check `available()` first.
            unsafe {
                self.pixels(img, wp, zx, acc)
            }
        });
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn pixels(&self, img: &[u8], wp: usize, zx: u8, acc: &mut [i32]) {
        let s = &self.s;
        let osz = s.output[0] * s.output[1];
        let base = s.pixel_offsets(wp, self.cp);
        for ob in 0..s.out_ch.div_ceil(LANES) {
            let mut p = 0;
            while p + PIXELS <= osz {
                self.block::<PIXELS>(img, wp, zx, ob, &base[p..p + PIXELS], p, acc);
                p += PIXELS;
            }
            while p < osz {
                self.block::<1>(img, wp, zx, ob, &base[p..p + 1], p, acc);
                p += 1;
            }
        }
    }

    /// `P` pixels (starting at output index `p0`) for output channel block `ob`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const P: usize>(
        &self,
        img: &[u8],
        wp: usize,
        zx: u8,
        ob: usize,
        base: &[usize],
        p0: usize,
        acc: &mut [i32],
    ) {
        use std::arch::x86_64::*;
        let s = &self.s;
        let [kh, _] = s.kernel;
        let row_bytes = wp * self.cp;
        let mut sum = [_mm512_setzero_si512(); P];
        let wblock = &self.w[ob * kh * self.groups * LANES * 4..][..kh * self.groups * LANES * 4];
        for ky in 0..kh {
            let wrow = &wblock[ky * self.groups * LANES * 4..];
            for g in 0..self.groups {
                let wv = _mm512_loadu_si512(wrow.as_ptr().add(g * LANES * 4).cast());
                for (i, acc) in sum.iter_mut().enumerate() {
                    let at = base[i] + ky * row_bytes + 4 * g;
                    debug_assert!(at + 4 <= img.len());
                    let four = img.as_ptr().add(at).cast::<i32>().read_unaligned();
                    *acc = _mm512_dpbusd_epi32(*acc, _mm512_set1_epi32(four), wv);
                }
            }
        }
        let osz = s.output[0] * s.output[1];
        let mut lanes = [0i32; LANES];
        for (i, v) in sum.iter().enumerate() {
            _mm512_storeu_si512(lanes.as_mut_ptr().cast(), *v);
            for (l, &raw) in lanes.iter().enumerate() {
                let oc = ob * LANES + l;
                if oc < s.out_ch {
                    acc[oc * osz + p0 + i] = raw - zx as i32 * self.wsum[oc];
                }
            }
        }
    }
}

/// The f32 kernel's epilogue: a bias per output channel, then Relu or not.
type Epilogue<'a> = (Option<&'a [f32]>, bool);

/// f32 weights rearranged for the kernel: per block of 16 output channels, per kernel row,
/// per value `kx * in_ch + c` of that row's patch, the 16 channels' weights (one register).
pub struct PackedF32 {
    s: Shape2d,
    w: Vec<f32>,
}

impl PackedF32 {
    /// `w` holds the weights `[out_ch, in_ch, kh, kw]`.
    pub fn new(s: Shape2d, w: &[f32]) -> PackedF32 {
        let [kh, kw] = s.kernel;
        let row = kw * s.in_ch;
        let blocks = s.out_ch.div_ceil(LANES);
        let mut out = vec![0f32; blocks * kh * row * LANES];
        for oc in 0..s.out_ch {
            for c in 0..s.in_ch {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let at = (((oc / LANES) * kh + ky) * row + kx * s.in_ch + c) * LANES
                            + oc % LANES;
                        out[at] = w[((oc * s.in_ch + c) * kh + ky) * kw + kx];
                    }
                }
            }
        }
        PackedF32 { s, w: out }
    }

    /// One image: `x` is `[in_ch, h, w]`; `out` receives `[out_ch, oh * ow]`, plus `bias`,
    /// then max(0, v) when `relu` (as the Relu op: NaN and -0 stay), while still in registers.
    pub fn run(&self, x: &[f32], bias: Option<&[f32]>, relu: bool, out: &mut [f32]) {
        let [hp, wp] = self.s.padded();
        let cp = self.s.in_ch;
        f32::with(hp * wp * cp, |img| {
            self.s.channels_last(x, 0.0, cp, img, |v| v);
            #[cfg(target_arch = "x86_64")]
            // Safety: callers check `available_f32()` first.
            unsafe {
                self.pixels(img, wp, (bias, relu), out)
            }
        });
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn pixels(&self, img: &[f32], wp: usize, epi: Epilogue, out: &mut [f32]) {
        let s = &self.s;
        let osz = s.output[0] * s.output[1];
        let base = s.pixel_offsets(wp, s.in_ch);
        for ob in 0..s.out_ch.div_ceil(LANES) {
            let mut p = 0;
            while p + PIXELS <= osz {
                self.block::<PIXELS>(img, wp, ob, &base[p..p + PIXELS], p, epi, out);
                p += PIXELS;
            }
            while p < osz {
                self.block::<1>(img, wp, ob, &base[p..p + 1], p, epi, out);
                p += 1;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const P: usize>(
        &self,
        img: &[f32],
        wp: usize,
        ob: usize,
        base: &[usize],
        p0: usize,
        (bias, relu): Epilogue,
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let s = &self.s;
        let [kh, kw] = s.kernel;
        let row = kw * s.in_ch;
        let row_stride = wp * s.in_ch;
        let mut sum = [_mm512_setzero_ps(); P];
        let wblock = &self.w[ob * kh * row * LANES..][..kh * row * LANES];
        for ky in 0..kh {
            let wrow = &wblock[ky * row * LANES..][..row * LANES];
            for j in 0..row {
                let wv = _mm512_loadu_ps(wrow.as_ptr().add(j * LANES));
                for (i, acc) in sum.iter_mut().enumerate() {
                    let at = base[i] + ky * row_stride + j;
                    debug_assert!(at < img.len());
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(*img.get_unchecked(at)), wv, *acc);
                }
            }
        }
        let osz = s.output[0] * s.output[1];
        let mut lanes = [0f32; LANES];
        for (i, v) in sum.iter().enumerate() {
            _mm512_storeu_ps(lanes.as_mut_ptr(), *v);
            for (l, &y) in lanes.iter().enumerate() {
                let oc = ob * LANES + l;
                if oc < s.out_ch {
                    let v = y + bias.map_or(0.0, |b| b[oc]);
                    out[oc * osz + p0 + i] = if relu && v < 0.0 { 0.0 } else { v };
                }
            }
        }
    }
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;

    /// The convolution by its definition, padding taking the zero point.
    fn naive(s: &Shape2d, x: &[i8], zx: i8, w: &[i8]) -> Vec<i32> {
        let [h, wd] = s.input;
        let [kh, kw] = s.kernel;
        let [oh, ow] = s.output;
        let mut out = vec![0i32; s.out_ch * oh * ow];
        for oc in 0..s.out_ch {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut a = 0i32;
                    for c in 0..s.in_ch {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let y = (oy * s.strides[0] + ky) as isize - s.pads[0] as isize;
                                let xx = (ox * s.strides[1] + kx) as isize - s.pads[1] as isize;
                                let v = if y >= 0
                                    && xx >= 0
                                    && (y as usize) < h
                                    && (xx as usize) < wd
                                {
                                    x[(c * h + y as usize) * wd + xx as usize]
                                } else {
                                    zx
                                };
                                let wv = w[((oc * s.in_ch + c) * kh + ky) * kw + kx];
                                a += (v as i32 - zx as i32) * wv as i32;
                            }
                        }
                    }
                    out[(oc * oh + oy) * ow + ox] = a;
                }
            }
        }
        out
    }

    /// (in, out, input, kernel, stride, pads): MNIST-8's two convolutions, a strided one,
    /// channel counts that need padding to 4-byte groups, partial channel blocks, a pointwise one.
    fn shapes() -> Vec<Shape2d> {
        [
            (8, 16, [14, 14], [5, 5], [1, 1], [2, 2]),
            (1, 8, [28, 28], [5, 5], [1, 1], [2, 2]),
            (3, 20, [9, 11], [3, 3], [2, 2], [1, 1]),
            (5, 33, [7, 6], [3, 2], [1, 2], [0, 1]),
            (16, 16, [4, 4], [1, 1], [1, 1], [0, 0]),
        ]
        .into_iter()
        .map(
            |(ci, co, inp, k, st, pd): (usize, usize, [usize; 2], _, [usize; 2], [usize; 2])| {
                Shape2d {
                    in_ch: ci,
                    out_ch: co,
                    input: inp,
                    kernel: k,
                    output: [0, 1].map(|d| (inp[d] + 2 * pd[d] - k[d]) / st[d] + 1),
                    strides: st,
                    pads: pd,
                }
            },
        )
        .collect()
    }

    #[test]
    fn matches_definition() {
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: the direct int8 convolution is not used");
            return;
        }
        for s in shapes() {
            let (ci, co, inp, k, out) = (s.in_ch, s.out_ch, s.input, s.kernel, s.output);
            let mut seed = 7u32;
            let mut next = || {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (seed >> 24) as u8
            };
            let x: Vec<i8> = (0..ci * inp[0] * inp[1]).map(|_| next() as i8).collect();
            let w: Vec<i8> = (0..co * ci * k[0] * k[1]).map(|_| next() as i8).collect();
            let zx = -97;
            let mut acc = vec![0i32; co * out[0] * out[1]];
            Packed::new(s, &w).run(&x, zx, &mut acc);
            assert_eq!(acc, naive(&s, &x, zx, &w), "{s:?}");
        }
    }

    #[test]
    fn f32_matches_definition() {
        if !available_f32() {
            eprintln!("no AVX-512 on this CPU: the direct f32 convolution is not used");
            return;
        }
        for s in shapes() {
            let (ci, co, inp, k, out) = (s.in_ch, s.out_ch, s.input, s.kernel, s.output);
            // Small integers: every sum is exact in f32, whatever the order.
            let x: Vec<f32> = (0..ci * inp[0] * inp[1])
                .map(|i| ((i * 7) % 11) as f32 - 5.0)
                .collect();
            let w: Vec<f32> = (0..co * ci * k[0] * k[1])
                .map(|i| ((i * 5) % 9) as f32 - 4.0)
                .collect();
            let bias: Vec<f32> = (0..co).map(|i| i as f32 * 0.5).collect();
            let xi: Vec<i8> = x.iter().map(|&v| v as i8).collect();
            let wi: Vec<i8> = w.iter().map(|&v| v as i8).collect();
            let want: Vec<f32> = naive(&s, &xi, 0, &wi)
                .iter()
                .enumerate()
                .map(|(i, &a)| a as f32 + bias[i / (out[0] * out[1])])
                .collect();
            let mut got = vec![f32::NAN; co * out[0] * out[1]];
            PackedF32::new(s, &w).run(&x, Some(&bias), false, &mut got);
            assert_eq!(got, want, "{s:?}");
            PackedF32::new(s, &w).run(&x, Some(&bias), true, &mut got);
            let relu: Vec<f32> = want.iter().map(|&v| v.max(0.0)).collect();
            assert_eq!(got, relu, "{s:?} with relu");
        }
    }
}
