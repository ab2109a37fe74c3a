//! Convolution (NCHW) and transposed convolution over 1 to 3 spatial dimensions.
//!
//! Lower ranks are handled as 3-D with leading unit dimensions, so one set of loops serves all.
//! Regular convolution is im2col + GEMM per (image, group); convolutions with one input channel
//! per group (depthwise) use a direct loop, which beats a GEMM with K = kernel size.

use super::conv_direct;
use super::conv_pixels;
use super::gemm::{gemm, Bias};
use super::quant;
use super::Scratch;
use rayon::prelude::*;
use smelt_tensor::{bail, Result};

/// Geometry of one convolution, spatial parts always 3-D (pad lower ranks with 1 / 0).
#[derive(Clone, Debug, PartialEq)]
pub struct ConvGeom {
    pub batch: usize,
    pub in_ch: usize,
    pub out_ch: usize,
    pub groups: usize,
    pub input: [usize; 3],
    pub kernel: [usize; 3],
    pub output: [usize; 3],
    pub strides: [usize; 3],
    pub dilations: [usize; 3],
    /// Padding before each spatial dimension (padding after is implied by `output`).
    pub pads: [usize; 3],
}

impl ConvGeom {
    fn check(&self) -> Result<()> {
        if self.groups == 0
            || !self.in_ch.is_multiple_of(self.groups)
            || !self.out_ch.is_multiple_of(self.groups)
        {
            bail!(
                Shape,
                "channels ({} in, {} out) are not divisible by group {}",
                self.in_ch,
                self.out_ch,
                self.groups
            );
        }
        if self.strides.contains(&0) || self.dilations.contains(&0) {
            bail!(Invalid, "strides and dilations must be positive");
        }
        Ok(())
    }
}

/// Multiply-adds below which waking the thread pool costs more than it saves.
const PAR_MIN_WORK: usize = 1 << 16;

fn prod(v: &[usize; 3]) -> usize {
    v[0] * v[1] * v[2]
}

/// The output positions `o` in `0..out` for which `o * stride + off` lies in `0..len`.
#[inline]
fn valid_range(out: usize, stride: usize, off: isize, len: usize) -> (usize, usize) {
    let s = stride as isize;
    let lo = if off < 0 { ((-off) + s - 1) / s } else { 0 };
    let hi = if (len as isize) > off {
        ((len as isize - off) + s - 1) / s
    } else {
        0
    };
    let lo = (lo as usize).min(out);
    let hi = (hi as usize).min(out).max(lo);
    (lo, hi)
}

/// Unrolls patches of `x` (`[c, d, h, w]`) into `col` (`[c * kprod, out positions]`); positions
/// in the padding read `pad` (zero, or a quantized input's zero point).
fn im2col<T: Copy>(g: &ConvGeom, c: usize, x: &[T], pad: T, col: &mut [T]) {
    if g.input[0] == 1
        && g.kernel[0] == 1
        && g.output[0] == 1
        && g.strides == [1, 1, 1]
        && g.dilations == [1, 1, 1]
    {
        return im2col_2d(g, c, x, pad, col);
    }
    im2col_general(g, c, x, pad, col)
}

/// [`im2col`] for any strides, dilations and ranks.
fn im2col_general<T: Copy>(g: &ConvGeom, c: usize, x: &[T], pad: T, col: &mut [T]) {
    let [id, ih, iw] = g.input;
    let [kd, kh, kw] = g.kernel;
    let [od, oh, ow] = g.output;
    let osz = od * oh * ow;
    let mut row = 0;
    for ch in 0..c {
        let plane = &x[ch * id * ih * iw..(ch + 1) * id * ih * iw];
        for a in 0..kd {
            for b in 0..kh {
                for e in 0..kw {
                    let dst = &mut col[row * osz..(row + 1) * osz];
                    row += 1;
                    let offd = (a * g.dilations[0]) as isize - g.pads[0] as isize;
                    let offh = (b * g.dilations[1]) as isize - g.pads[1] as isize;
                    let offw = (e * g.dilations[2]) as isize - g.pads[2] as isize;
                    let (w0, w1) = valid_range(ow, g.strides[2], offw, iw);
                    for z in 0..od {
                        let iz = (z * g.strides[0]) as isize + offd;
                        for y in 0..oh {
                            let out = &mut dst[(z * oh + y) * ow..(z * oh + y + 1) * ow];
                            let iy = (y * g.strides[1]) as isize + offh;
                            if iz < 0 || iz >= id as isize || iy < 0 || iy >= ih as isize {
                                out.fill(pad);
                                continue;
                            }
                            let src = &plane[(iz as usize * ih + iy as usize) * iw..][..iw];
                            out[..w0].fill(pad);
                            out[w1..].fill(pad);
                            let sw = g.strides[2];
                            if sw == 1 {
                                let s0 = (w0 as isize + offw) as usize;
                                out[w0..w1].copy_from_slice(&src[s0..s0 + (w1 - w0)]);
                            } else {
                                for (xo, o) in out[w0..w1].iter_mut().enumerate() {
                                    *o = src[(((w0 + xo) * sw) as isize + offw) as usize];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// [`im2col`] of a 2-D convolution with unit strides and dilations (most of them): each input
/// plane is first copied into a padded one, so that every row of `col` is one plain copy. The
/// general loop clips and pads every row of every kernel offset, and on small planes (MNIST's
/// 14 x 14) those short fills and copies cost more than the data.
fn im2col_2d<T: Copy>(g: &ConvGeom, c: usize, x: &[T], pad: T, col: &mut [T]) {
    let [_, ih, iw] = g.input;
    let [_, kh, kw] = g.kernel;
    let [_, oh, ow] = g.output;
    if oh == 0 || ow == 0 {
        return;
    }
    let (ph, pw) = (g.pads[1], g.pads[2]);
    // The padded plane: output row y with kernel row a reads padded row y + a. (A plane is
    // small next to `col`, which takes the caller's scratch buffer.)
    let (h, w) = (oh + kh - 1, ow + kw - 1);
    let mut plane = vec![pad; h * w];
    let osz = oh * ow;
    let mut row = 0;
    for ch in 0..c {
        if ch > 0 {
            plane.fill(pad);
        }
        let src = &x[ch * ih * iw..(ch + 1) * ih * iw];
        for y in 0..ih.min(h.saturating_sub(ph)) {
            let n = iw.min(w.saturating_sub(pw));
            plane[(y + ph) * w + pw..][..n].copy_from_slice(&src[y * iw..][..n]);
        }
        for a in 0..kh {
            for b in 0..kw {
                let dst = &mut col[row * osz..(row + 1) * osz];
                row += 1;
                for (y, out) in dst.chunks_exact_mut(ow).enumerate() {
                    out.copy_from_slice(&plane[(y + a) * w + b..][..ow]);
                }
            }
        }
    }
}

/// Direct convolution of one input plane into one output plane (depthwise case).
fn depthwise_plane(g: &ConvGeom, x: &[f32], w: &[f32], bias: f32, out: &mut [f32]) {
    let [id, ih, iw] = g.input;
    let [kd, kh, kw] = g.kernel;
    let [od, oh, ow] = g.output;
    out.fill(bias);
    for a in 0..kd {
        for b in 0..kh {
            for e in 0..kw {
                let wv = w[(a * kh + b) * kw + e];
                let offd = (a * g.dilations[0]) as isize - g.pads[0] as isize;
                let offh = (b * g.dilations[1]) as isize - g.pads[1] as isize;
                let offw = (e * g.dilations[2]) as isize - g.pads[2] as isize;
                let (w0, w1) = valid_range(ow, g.strides[2], offw, iw);
                let (z0, z1) = valid_range(od, g.strides[0], offd, id);
                let (y0, y1) = valid_range(oh, g.strides[1], offh, ih);
                for z in z0..z1 {
                    let iz = ((z * g.strides[0]) as isize + offd) as usize;
                    for y in y0..y1 {
                        let iy = ((y * g.strides[1]) as isize + offh) as usize;
                        let src = &x[(iz * ih + iy) * iw..][..iw];
                        let dst = &mut out[(z * oh + y) * ow..][..ow];
                        let sw = g.strides[2];
                        if sw == 1 {
                            let s0 = (w0 as isize + offw) as usize;
                            for (o, &v) in dst[w0..w1].iter_mut().zip(&src[s0..s0 + (w1 - w0)]) {
                                *o += wv * v;
                            }
                        } else {
                            for xo in w0..w1 {
                                dst[xo] += wv * src[(xo as isize * sw as isize + offw) as usize];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Convolution: `x` is `[batch, in_ch, *input]`, `w` is `[out_ch, in_ch / groups, *kernel]`,
/// `out` is `[batch, out_ch, *output]`.
pub fn conv(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    conv_act(None, g, x, w, bias, false, out)
}

/// Relu over a block just written (still in cache), as the Relu op computes it: negatives
/// become 0, NaN and -0 stay.
fn relu_in_place(o: &mut [f32]) {
    super::simd(&[0u8][..], o, &|_: &[u8], o: &mut [f32]| {
        for v in o.iter_mut() {
            *v = if *v < 0.0 { 0.0 } else { *v };
        }
    });
}

/// Which kernel a float convolution takes, with its weights packed for it. Made once per
/// weight tensor and geometry and kept by the op across runs (the batch may change between
/// them): packing on every call cost about 5% of MNIST-8 at batch 1.
pub struct ConvPlan {
    /// The geometry served, batch 0.
    geom: ConvGeom,
    kernel: Kernel,
}

enum Kernel {
    /// Output pixels in the lanes (up to 16 output channels, unit strides).
    Pixels(conv_pixels::PixelsF32),
    /// Output channels in the lanes (whole registers of them, up to 32).
    Channels(conv_direct::PackedF32),
    /// Integer weights for the VNNI kernel, output channels in the lanes.
    Int8(conv_direct::Packed),
    /// Depthwise stencils, or im2col + GEMM, straight from the weights.
    General,
}

impl ConvPlan {
    /// `w` holds the weights `[out_ch, in_ch / groups, *kernel]`.
    pub fn new(g: &ConvGeom, w: &[f32]) -> Result<ConvPlan> {
        g.check()?;
        let kernel = if pointwise(g) {
            Kernel::General
        } else if let Some(k) = pixels_f32(g, w) {
            Kernel::Pixels(k)
        } else if let Some(k) = direct_f32(g, w) {
            Kernel::Channels(k)
        } else {
            Kernel::General
        };
        Ok(ConvPlan {
            geom: unbatched(g),
            kernel,
        })
    }

    /// The plan of an integer convolution: `w` holds u8 weights, `zw` their zero points.
    pub fn int8(g: &ConvGeom, w: &[u8], zw: &[u8]) -> Result<ConvPlan> {
        g.check()?;
        let kernel = match direct_int8(g, w, zw) {
            Some(k) => Kernel::Int8(k),
            None => Kernel::General,
        };
        Ok(ConvPlan {
            geom: unbatched(g),
            kernel,
        })
    }

    /// Whether this plan serves `g` (the same geometry, any batch) in a float convolution, or
    /// in an integer one when `int8`.
    fn serves(&self, g: &ConvGeom, int8: bool) -> bool {
        let kind_fits = match self.kernel {
            Kernel::Pixels(_) | Kernel::Channels(_) => !int8,
            Kernel::Int8(_) => int8,
            Kernel::General => true,
        };
        kind_fits && self.geom == unbatched(g)
    }
}

fn unbatched(g: &ConvGeom) -> ConvGeom {
    ConvGeom {
        batch: 0,
        ..g.clone()
    }
}

/// A 1x1 convolution that keeps the spatial shape: a plain GEMM per image.
fn pointwise(g: &ConvGeom) -> bool {
    prod(&g.kernel) == 1 && g.strides == [1, 1, 1] && g.pads == [0, 0, 0] && g.input == g.output
}

/// [`conv`], then max(0, v) on each output when `relu` (a fused Conv + Relu), through `plan`
/// (made for `w`) when it serves `g`, else through a fresh one.
pub fn conv_act(
    plan: Option<&ConvPlan>,
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    out: &mut [f32],
) -> Result<()> {
    let act = |o: &mut [f32]| {
        if relu {
            relu_in_place(o)
        }
    };
    g.check()?;
    let cg = g.in_ch / g.groups;
    let mg = g.out_ch / g.groups;
    let isz = prod(&g.input);
    let ksz = prod(&g.kernel);
    let osz = prod(&g.output);
    if x.len() != g.batch * g.in_ch * isz
        || w.len() != g.out_ch * cg * ksz
        || out.len() != g.batch * g.out_ch * osz
        || bias.is_some_and(|b| b.len() != g.out_ch)
    {
        bail!(Shape, "convolution buffers do not match geometry {g:?}");
    }
    if out.is_empty() {
        return Ok(());
    }
    let fresh;
    let plan = match plan {
        Some(p) if p.serves(g, false) => p,
        _ => {
            fresh = ConvPlan::new(g, w)?;
            &fresh
        }
    };
    let image = |b: usize| &x[b * g.in_ch * isz..][..g.in_ch * isz];
    match &plan.kernel {
        Kernel::Pixels(k) => {
            per_image(g, out, osz, |b, o| k.run(image(b), bias, relu, o));
            return Ok(());
        }
        Kernel::Channels(k) => {
            per_image(g, out, osz, |b, o| k.run(image(b), bias, relu, o));
            return Ok(());
        }
        Kernel::Int8(_) | Kernel::General => {}
    }
    if cg == 1 && g.groups > 1 {
        // One input channel per group: every output plane is a direct stencil of one input plane.
        let plane = |(p, o): (usize, &mut [f32])| {
            let (b, oc) = (p / g.out_ch, p % g.out_ch);
            let ic = oc / mg;
            let xp = &x[(b * g.in_ch + ic) * isz..][..isz];
            depthwise_plane(g, xp, &w[oc * ksz..][..ksz], bias.map_or(0.0, |v| v[oc]), o);
            act(o);
        };
        if out.len() * ksz >= PAR_MIN_WORK {
            out.par_chunks_mut(osz).enumerate().for_each(plane);
        } else {
            out.chunks_mut(osz).enumerate().for_each(plane);
        }
        return Ok(());
    }
    let pointwise = pointwise(g);
    let task = |t: usize, o: &mut [f32]| -> Result<()> {
        let (b, gr) = (t / g.groups, t % g.groups);
        let xg = &x[(b * g.in_ch + gr * cg) * isz..][..cg * isz];
        let wg = &w[gr * mg * cg * ksz..][..mg * cg * ksz];
        let bias = bias.map(|v| Bias::PerRow(&v[gr * mg..(gr + 1) * mg]));
        if pointwise {
            gemm(mg, cg, osz, wg, false, xg, false, o, 1.0, 0.0, bias)?;
        } else {
            f32::with(cg * ksz * osz, |col| {
                im2col(g, cg, xg, 0.0, col);
                gemm(mg, cg * ksz, osz, wg, false, col, false, o, 1.0, 0.0, bias)
            })?;
        }
        act(o);
        Ok(())
    };
    let tasks = g.batch * g.groups;
    if tasks == 1 {
        task(0, out)
    } else if out.len() * cg * ksz < PAR_MIN_WORK {
        out.chunks_mut(mg * osz)
            .enumerate()
            .try_for_each(|(t, o)| task(t, o))
    } else {
        out.par_chunks_mut(mg * osz)
            .enumerate()
            .try_for_each(|(t, o)| task(t, o))
    }
}

/// Integer convolution with a float result: `out = acc * scale[oc] + bias[oc]` (snapped to
/// `grid` when given), where `acc` is
/// the exact i32 sum of `(w - zw[oc]) * (x - zx)`. `x` holds i8 activations (`[batch, in_ch,
/// *input]`), `w` u8 weights (`[out_ch, in_ch / groups, *kernel]`): the weights are the
/// product's left side, so the output comes out channel-major with no transpose.
///
/// Runs through `plan` (made by [`ConvPlan::int8`] for `w` and `zw`) when it serves `g`, else
/// through a fresh one.
#[allow(clippy::too_many_arguments)]
pub fn qconv(
    plan: Option<&ConvPlan>,
    g: &ConvGeom,
    x: &[i8],
    zx: i8,
    w: &[u8],
    zw: &[u8],
    scale: &[f32],
    bias: Option<&[f32]>,
    grid: Option<quant::Grid>,
    out: &mut [f32],
) -> Result<()> {
    g.check()?;
    let cg = g.in_ch / g.groups;
    let mg = g.out_ch / g.groups;
    let isz = prod(&g.input);
    let ksz = prod(&g.kernel);
    let osz = prod(&g.output);
    if x.len() != g.batch * g.in_ch * isz
        || w.len() != g.out_ch * cg * ksz
        || out.len() != g.batch * g.out_ch * osz
        || zw.len() != g.out_ch
        || scale.len() != g.out_ch
        || bias.is_some_and(|b| b.len() != g.out_ch)
    {
        bail!(Shape, "convolution buffers do not match geometry {g:?}");
    }
    if out.is_empty() {
        return Ok(());
    }
    let fresh;
    let plan = match plan {
        Some(p) if p.serves(g, true) => p,
        _ => {
            fresh = ConvPlan::int8(g, w, zw)?;
            &fresh
        }
    };
    if let Kernel::Int8(direct) = &plan.kernel {
        let exact = quant::ZeroPoints::exact(g.out_ch, osz);
        per_image(g, out, osz, |b, o| {
            direct.run(
                &x[b * g.in_ch * isz..][..g.in_ch * isz],
                zx,
                bytemuck::cast_slice_mut::<f32, i32>(o),
            );
            quant::scale_sums(o, osz, &exact, scale, bias, true, grid);
        });
        return Ok(());
    }
    let pointwise = pointwise(g);
    let zcols = vec![zx; osz];
    let task = |t: usize, o: &mut [f32]| -> Result<()> {
        let (b, gr) = (t / g.groups, t % g.groups);
        let xg = &x[(b * g.in_ch + gr * cg) * isz..][..cg * isz];
        let wg = &w[gr * mg * cg * ksz..][..mg * cg * ksz];
        let k = cg * ksz;
        let (zw, acc) = (
            &zw[gr * mg..][..mg],
            bytemuck::cast_slice_mut::<f32, i32>(o),
        );
        let zp = if pointwise {
            quant::qgemm(mg, k, osz, wg, zw, xg, &zcols, acc)?
        } else {
            i8::with(k * osz, |col| {
                im2col(g, cg, xg, zx, col);
                quant::qgemm(mg, k, osz, wg, zw, col, &zcols, acc)
            })?
        };
        let bias = bias.map(|b| &b[gr * mg..][..mg]);
        quant::scale_sums(o, osz, &zp, &scale[gr * mg..][..mg], bias, true, grid);
        Ok(())
    };
    let tasks = g.batch * g.groups;
    if tasks == 1 || out.len() * cg * ksz < PAR_MIN_WORK {
        out.chunks_mut(mg * osz)
            .enumerate()
            .try_for_each(|(t, o)| task(t, o))
    } else {
        out.par_chunks_mut(mg * osz)
            .enumerate()
            .try_for_each(|(t, o)| task(t, o))
    }
}

/// Runs `f(image, its output)` over the batch, in parallel when there is enough work.
fn per_image(g: &ConvGeom, out: &mut [f32], osz: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let work = out.len() * (g.in_ch / g.groups) * prod(&g.kernel);
    let chunk = g.out_ch * osz;
    if g.batch > 1 && work >= PAR_MIN_WORK {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(b, o)| f(b, o));
    } else {
        out.chunks_mut(chunk).enumerate().for_each(|(b, o)| f(b, o));
    }
}

/// The shape the direct kernels take: 2-D, one group, no dilation.
fn shape_2d(g: &ConvGeom) -> Option<conv_direct::Shape2d> {
    let two_d = g.input[0] == 1 && g.kernel[0] == 1 && g.strides[0] == 1 && g.pads[0] == 0;
    (two_d && g.groups == 1 && g.dilations == [1, 1, 1]).then(|| conv_direct::Shape2d {
        in_ch: g.in_ch,
        out_ch: g.out_ch,
        input: [g.input[1], g.input[2]],
        kernel: [g.kernel[1], g.kernel[2]],
        output: [g.output[1], g.output[2]],
        strides: [g.strides[1], g.strides[2]],
        pads: [g.pads[1], g.pads[2]],
    })
}

/// Output channels up to which the direct f32 kernel beats im2col + GEMM: with few output
/// channels each packed patch value is used only that many times.
const DIRECT_F32_MAX_OUT: usize = 32;

/// The direct f32 kernel for a narrow 2-D convolution, on a CPU that has AVX-512. Only for
/// whole registers of output channels: MNIST-8's first layer (8 channels, half a register)
/// took 0.27 ms at batch 32 this way and 0.18 ms through the GEMM (0.22 with two patch values
/// per register to fill it), its second (16) 0.26 and 0.67 ms. (Both now take the pixel-wise
/// kernel.)
fn direct_f32(g: &ConvGeom, w: &[f32]) -> Option<conv_direct::PackedF32> {
    if !conv_direct::available_f32()
        || g.out_ch > DIRECT_F32_MAX_OUT
        || !g.out_ch.is_multiple_of(conv_direct::LANES)
    {
        return None;
    }
    shape_2d(g).map(|s| conv_direct::PackedF32::new(s, w))
}

/// Output channels up to which the pixel-wise f32 kernel beats the channel-wise one: MNIST-8 at
/// batch 32, first layer (8 channels) 0.19 ms through the GEMM, about 0.06 pixel-wise; second
/// (16 channels) 0.26 channel-wise, 0.21 with a row per register (2 of 16 lanes idle on its
/// 14-pixel rows), less pixel-wise.
const PIXELS_F32_MAX_OUT: usize = 16;

/// The pixel-wise f32 kernel, for narrow 2-D convolutions with unit strides.
fn pixels_f32(g: &ConvGeom, w: &[f32]) -> Option<conv_pixels::PixelsF32> {
    if !conv_pixels::available() || g.out_ch > PIXELS_F32_MAX_OUT {
        return None;
    }
    shape_2d(g).and_then(|s| conv_pixels::PixelsF32::new(s, w))
}

/// The direct VNNI kernel for a 2-D convolution of symmetric weights (stored shifted to u8,
/// zero point 128), on a CPU that has it.
fn direct_int8(g: &ConvGeom, w: &[u8], zw: &[u8]) -> Option<conv_direct::Packed> {
    if !conv_direct::available() || zw.iter().any(|&z| z != 128) {
        return None;
    }
    let s = shape_2d(g)?;
    let w: Vec<i8> = w.iter().map(|&v| (v ^ 0x80) as i8).collect();
    Some(conv_direct::Packed::new(s, &w))
}

/// Transposed convolution: `x` is `[batch, in_ch, *input]`, `w` is
/// `[in_ch, out_ch / groups, *kernel]`, `out` is `[batch, out_ch, *output]`; `g.pads` are the
/// begin pads of the (forward) convolution this one inverts.
pub fn conv_transpose(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    g.check()?;
    let cg = g.in_ch / g.groups;
    let mg = g.out_ch / g.groups;
    let isz = prod(&g.input);
    let ksz = prod(&g.kernel);
    let osz = prod(&g.output);
    if x.len() != g.batch * g.in_ch * isz
        || w.len() != g.in_ch * mg * ksz
        || out.len() != g.batch * g.out_ch * osz
        || bias.is_some_and(|b| b.len() != g.out_ch)
    {
        bail!(
            Shape,
            "transposed convolution buffers do not match geometry {g:?}"
        );
    }
    if out.is_empty() {
        return Ok(());
    }
    let [id, ih, iw] = g.input;
    let [kd, kh, kw] = g.kernel;
    let [od, oh, ow] = g.output;
    let task = |(t, o): (usize, &mut [f32])| -> Result<()> {
        let (b, gr) = (t / g.groups, t % g.groups);
        let xg = &x[(b * g.in_ch + gr * cg) * isz..][..cg * isz];
        let wg = &w[gr * cg * mg * ksz..][..cg * mg * ksz];
        // col[(oc, kernel pos), input pos] = sum over ic of w[ic, oc, k] * x[ic, pos]
        let mut col = vec![0.0f32; mg * ksz * isz];
        gemm(
            mg * ksz,
            cg,
            isz,
            wg,
            true,
            xg,
            false,
            &mut col,
            1.0,
            0.0,
            None,
        )?;
        for oc in 0..mg {
            let plane = &mut o[oc * osz..(oc + 1) * osz];
            plane.fill(bias.map_or(0.0, |v| v[gr * mg + oc]));
            for a in 0..kd {
                for bb in 0..kh {
                    for e in 0..kw {
                        let r = ((oc * kd + a) * kh + bb) * kw + e;
                        let src = &col[r * isz..(r + 1) * isz];
                        for z in 0..id {
                            let oz = (z * g.strides[0] + a * g.dilations[0]) as isize
                                - g.pads[0] as isize;
                            if oz < 0 || oz >= od as isize {
                                continue;
                            }
                            for y in 0..ih {
                                let oy = (y * g.strides[1] + bb * g.dilations[1]) as isize
                                    - g.pads[1] as isize;
                                if oy < 0 || oy >= oh as isize {
                                    continue;
                                }
                                let dst = &mut plane[(oz as usize * oh + oy as usize) * ow..][..ow];
                                let srow = &src[(z * ih + y) * iw..][..iw];
                                for (xi, &v) in srow.iter().enumerate() {
                                    let ox = (xi * g.strides[2] + e * g.dilations[2]) as isize
                                        - g.pads[2] as isize;
                                    if ox >= 0 && ox < ow as isize {
                                        dst[ox as usize] += v;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    };
    if x.len() * mg * ksz < PAR_MIN_WORK {
        out.chunks_mut(mg * osz).enumerate().try_for_each(task)
    } else {
        out.par_chunks_mut(mg * osz).enumerate().try_for_each(task)
    }
}

/// Gradient of a convolution's weight: `dw[oc, ic, k] = sum over batch and output positions of
/// dy[b, oc, p] * x[b, ic, p + k]` (im2col of `x` times `dy`). `dw` is overwritten.
pub fn conv_weight_grad(g: &ConvGeom, x: &[f32], dy: &[f32], dw: &mut [f32]) -> Result<()> {
    g.check()?;
    let cg = g.in_ch / g.groups;
    let mg = g.out_ch / g.groups;
    let (isz, ksz, osz) = (prod(&g.input), prod(&g.kernel), prod(&g.output));
    if x.len() != g.batch * g.in_ch * isz
        || dy.len() != g.batch * g.out_ch * osz
        || dw.len() != g.out_ch * cg * ksz
    {
        bail!(
            Shape,
            "convolution gradient buffers do not match geometry {g:?}"
        );
    }
    dw.fill(0.0);
    let mut col = vec![0.0f32; cg * ksz * osz];
    for b in 0..g.batch {
        for gr in 0..g.groups {
            let xg = &x[(b * g.in_ch + gr * cg) * isz..][..cg * isz];
            let dyg = &dy[(b * g.out_ch + gr * mg) * osz..][..mg * osz];
            im2col(g, cg, xg, 0.0, &mut col);
            let dwg = &mut dw[gr * mg * cg * ksz..][..mg * cg * ksz];
            // [mg, osz] x [osz, cg * ksz], accumulated over the batch.
            gemm(
                mg,
                osz,
                cg * ksz,
                dyg,
                false,
                &col,
                true,
                dwg,
                1.0,
                1.0,
                None,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward 2-D convolution, the reference for the fast paths.
    fn naive_conv2d(g: &ConvGeom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let [_, ih, iw] = g.input;
        let [_, kh, kw] = g.kernel;
        let [_, oh, ow] = g.output;
        let cg = g.in_ch / g.groups;
        let mg = g.out_ch / g.groups;
        let mut out = vec![0.0; g.batch * g.out_ch * oh * ow];
        for b in 0..g.batch {
            for oc in 0..g.out_ch {
                let gr = oc / mg;
                for y in 0..oh {
                    for xo in 0..ow {
                        let mut s = bias.map_or(0.0, |v| v[oc]);
                        for c in 0..cg {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (y * g.strides[1] + ky * g.dilations[1]) as isize
                                        - g.pads[1] as isize;
                                    let ix = (xo * g.strides[2] + kx * g.dilations[2]) as isize
                                        - g.pads[2] as isize;
                                    if iy < 0 || ix < 0 || iy >= ih as isize || ix >= iw as isize {
                                        continue;
                                    }
                                    let xv = x[((b * g.in_ch + gr * cg + c) * ih + iy as usize)
                                        * iw
                                        + ix as usize];
                                    let wv = w[((oc * cg + c) * kh + ky) * kw + kx];
                                    s += xv * wv;
                                }
                            }
                        }
                        out[((b * g.out_ch + oc) * oh + y) * ow + xo] = s;
                    }
                }
            }
        }
        out
    }

    fn vals(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 37 % 17) as f32 - 8.0) / 4.0)
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn geom(
        batch: usize,
        ci: usize,
        co: usize,
        groups: usize,
        hw: usize,
        k: usize,
        s: usize,
        p: usize,
        d: usize,
    ) -> ConvGeom {
        let eff = (k - 1) * d + 1;
        let o = (hw + 2 * p - eff) / s + 1;
        ConvGeom {
            batch,
            in_ch: ci,
            out_ch: co,
            groups,
            input: [1, hw, hw],
            kernel: [1, k, k],
            output: [1, o, o],
            strides: [1, s, s],
            dilations: [1, d, d],
            pads: [0, p, p],
        }
    }

    fn check(g: &ConvGeom) {
        let cg = g.in_ch / g.groups;
        let x = vals(g.batch * g.in_ch * prod(&g.input), 1);
        let w = vals(g.out_ch * cg * prod(&g.kernel), 5);
        let bias = vals(g.out_ch, 9);
        let mut out = vec![f32::NAN; g.batch * g.out_ch * prod(&g.output)];
        conv(g, &x, &w, Some(&bias), &mut out).unwrap();
        let want = naive_conv2d(g, &x, &w, Some(&bias));
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-3, "{g:?} at {i}: {a} vs {b}");
        }
    }

    #[test]
    fn conv_paths_match_naive() {
        check(&geom(1, 3, 4, 1, 7, 3, 1, 1, 1)); // padded im2col
        check(&geom(2, 4, 6, 2, 8, 3, 2, 1, 1)); // groups, stride, batch
        check(&geom(1, 2, 2, 1, 9, 3, 1, 2, 2)); // dilation
        check(&geom(2, 3, 5, 1, 5, 1, 1, 0, 1)); // pointwise
        check(&geom(1, 4, 4, 4, 6, 3, 1, 1, 1)); // depthwise
        check(&geom(2, 3, 6, 3, 7, 3, 2, 1, 1)); // depthwise multiplier 2, stride 2
        check(&geom(1, 1, 8, 1, 28, 5, 1, 2, 1)); // MNIST's first layer
    }

    /// The padded-plane im2col equals the general one, asymmetric and over-wide pads included,
    /// for f32 and for i8 codes padded with their zero point.
    #[test]
    fn im2col_2d_matches_the_general_loop() {
        for (c, ih, iw, kh, kw, pads, oh, ow) in [
            (2, 5, 7, 3, 3, [0, 1, 1], 5, 7),
            (1, 4, 4, 5, 5, [0, 2, 2], 4, 4),
            (3, 6, 5, 2, 3, [0, 0, 1], 5, 4),
            (1, 3, 3, 3, 3, [0, 4, 0], 9, 1), // pads wider than the plane
            (2, 8, 8, 1, 1, [0, 0, 0], 8, 8),
        ] {
            let g = ConvGeom {
                batch: 1,
                in_ch: c,
                out_ch: 1,
                groups: 1,
                input: [1, ih, iw],
                kernel: [1, kh, kw],
                output: [1, oh, ow],
                strides: [1, 1, 1],
                dilations: [1, 1, 1],
                pads,
            };
            let n = c * kh * kw * oh * ow;
            let x = vals(c * ih * iw, 3);
            let (mut a, mut b) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            im2col(&g, c, &x, 0.0, &mut a);
            im2col_general(&g, c, &x, 0.0, &mut b);
            assert_eq!(a, b, "{g:?}");
            let q: Vec<i8> = x.iter().map(|v| (v * 8.0) as i8).collect();
            let (mut a, mut b) = (vec![99i8; n], vec![99i8; n]);
            im2col(&g, c, &q, -5, &mut a);
            im2col_general(&g, c, &q, -5, &mut b);
            assert_eq!(a, b, "{g:?}");
        }
    }

    #[test]
    fn tiny_conv_by_hand() {
        // 1x1x3x3 input of 1..9, 2x2 kernel of ones, no padding: sums of 2x2 windows.
        let g = geom(1, 1, 1, 1, 3, 2, 1, 0, 1);
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let mut out = vec![0.0; 4];
        conv(&g, &x, &[1.0; 4], None, &mut out).unwrap();
        assert_eq!(out, vec![12.0, 16.0, 24.0, 28.0]);
    }

    #[test]
    fn conv_transpose_by_hand() {
        // 1-D: x = [1, 2], w = [1, 10, 100], stride 2: out = [1, 10, 102, 20, 200]
        let g = ConvGeom {
            batch: 1,
            in_ch: 1,
            out_ch: 1,
            groups: 1,
            input: [1, 1, 2],
            kernel: [1, 1, 3],
            output: [1, 1, 5],
            strides: [1, 1, 2],
            dilations: [1, 1, 1],
            pads: [0, 0, 0],
        };
        let mut out = vec![0.0; 5];
        conv_transpose(&g, &[1.0, 2.0], &[1.0, 10.0, 100.0], Some(&[0.5]), &mut out).unwrap();
        assert_eq!(out, vec![1.5, 10.5, 102.5, 20.5, 200.5]);
    }
}
