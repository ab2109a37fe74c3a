//! 8-bit quantization kernels: f32 <-> u8/i8 with one scale and zero point (the run-time path of
//! every static activation), and the u8 x i8 -> i32 matrix product through rten-gemm.
//!
//! The float steps are the ONNX reference's, in f32: `q = sat(round_half_even(x / s) + z)` and
//! `x = (q - z) * s`, so results equal the generic ops' bit for bit.

use rayon::prelude::*;
use rten_gemm::{GemmExecutor, GemmInputA, GemmInputB, GemmOptions, PackedBMatrix};
use rten_tensor::Matrix;
use smelt_tensor::{bail, Result};
use std::sync::OnceLock;

use super::{elementwise, Scratch, CHUNK};

/// An 8-bit quantized element type.
pub trait Q8: Copy + Send + Sync + Default + 'static {
    const SIGNED: bool;
    const LO: f32;
    const HI: f32;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Q8 for u8 {
    const SIGNED: bool = false;
    const LO: f32 = 0.0;
    const HI: f32 = 255.0;
    #[inline]
    fn from_f32(v: f32) -> u8 {
        // Through i32, which vectorizes (the value is in range, or NaN, which gives 0 both ways).
        v as i32 as u8
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self as f32
    }
}

impl Q8 for i8 {
    const SIGNED: bool = true;
    const LO: f32 = -128.0;
    const HI: f32 = 127.0;
    #[inline]
    fn from_f32(v: f32) -> i8 {
        v as i32 as i8
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self as f32
    }
}

/// Rounds half to even: adding 1.5 * 2^23 leaves no fraction bits, and the default rounding
/// mode rounds ties to even. Exact for |t| < 2^22; unlike `round_ties_even` on baseline
/// x86-64 (a library call), it vectorizes.
const MAGIC: f32 = 12_582_912.0;

/// `out[i] = sat(round_half_even(x[i] / s) + z)`; NaN becomes 0, as in the reference.
pub fn quantize<T: Q8>(x: &[f32], s: f32, z: T, out: &mut [T]) {
    let zf = z.to_f32();
    // Clamping before rounding gives the same result (the bounds are integers) and keeps the
    // values in the rounding trick's range.
    let (lo, hi) = (T::LO - zf, T::HI - zf);
    elementwise(x, out, |x, out| {
        #[cfg(target_arch = "x86_64")]
        let done = if std::arch::is_x86_feature_detected!("avx2") {
            // Safety: the CPU has AVX2, checked just above.
            unsafe { quantize_avx2(x, s, zf, lo, hi, out) }
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = 0;
        for (o, &v) in out[done..].iter_mut().zip(&x[done..]) {
            let t = (v / s).clamp(lo, hi);
            *o = T::from_f32((t + MAGIC) - MAGIC + zf);
        }
    });
}

/// [`quantize`] of rows of `x` (`k_in` wide) read through a channel map: column c of a row
/// is `x[src[c]] * mult[c]` (`src` None: `x[c] * mult[c]`), multiplied in f32 before rounding,
/// as a Gather and a Mul in front of a QuantizeLinear compute it. `out` holds `mult.len()`
/// columns per row.
pub fn quantize_mapped<T: Q8>(
    x: &[f32],
    k_in: usize,
    src: Option<&[usize]>,
    mult: &[f32],
    s: f32,
    z: T,
    out: &mut [T],
) {
    let k = mult.len();
    if k == 0 || k_in == 0 {
        return;
    }
    // Maps keep the channels in place and append copies: the in-place prefix is a plain
    // (vectorized) product, only the rest is gathered.
    let same = src.map_or(k.min(k_in), |src| {
        src.iter()
            .enumerate()
            .take_while(|&(c, &j)| c == j && c < k_in)
            .count()
    });
    let rows_per = (CHUNK / k).max(1);
    let map_rows = |x: &[f32], tmp: &mut [f32]| {
        for (xr, tr) in x.chunks_exact(k_in).zip(tmp.chunks_exact_mut(k)) {
            let (head, tail) = tr.split_at_mut(same);
            for ((t, &v), &m) in head.iter_mut().zip(&xr[..same]).zip(&mult[..same]) {
                *t = v * m;
            }
            if let Some(src) = src {
                for ((t, &j), &m) in tail.iter_mut().zip(&src[same..]).zip(&mult[same..]) {
                    *t = xr[j] * m;
                }
            }
        }
    };
    let one = |x: &[f32], out: &mut [T]| {
        Scratch::with(out.len(), |tmp: &mut [f32]| {
            super::simd(x, tmp, &map_rows);
            quantize(tmp, s, z, out);
        })
    };
    out.par_chunks_mut(rows_per * k)
        .zip(x.par_chunks(rows_per * k_in))
        .for_each(|(o, x)| one(x, o));
}

/// [`quantize`] 32 values at a time; returns how many it did (a multiple of 32). The compiler
/// leaves the scalar loop's saturating float-to-int casts unvectorized (about 5 cycles a
/// value); here the clamp makes the conversion exact and two packs narrow it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2<T: Q8>(
    x: &[f32],
    s: f32,
    zf: f32,
    lo: f32,
    hi: f32,
    out: &mut [T],
) -> usize {
    use std::arch::x86_64::*;
    const { assert!(std::mem::size_of::<T>() == 1) };
    let n = x.len().min(out.len()) / 32 * 32;
    let (vs, vlo, vhi, vz) = (
        _mm256_set1_ps(s),
        _mm256_set1_ps(lo),
        _mm256_set1_ps(hi),
        _mm256_set1_ps(zf),
    );
    // packs works within 128-bit lanes: this puts the 4-byte groups back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut i = 0;
    while i < n {
        let mut q = [_mm256_setzero_si256(); 4];
        for (k, q) in q.iter_mut().enumerate() {
            let d = _mm256_div_ps(_mm256_loadu_ps(x.as_ptr().add(i + 8 * k)), vs);
            let t = _mm256_min_ps(_mm256_max_ps(d, vlo), vhi);
            // Round half to even (the default rounding mode), then shift by the zero point:
            // an integer in the type's range, so the conversion is exact.
            let r = _mm256_add_ps(
                _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t),
                vz,
            );
            // A NaN quotient (NaN input, or 0/0 and inf/inf with a degenerate scale) quantizes
            // to 0, as in the reference.
            let ordered = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(d, d));
            *q = _mm256_and_si256(_mm256_cvtps_epi32(r), ordered);
        }
        let a = _mm256_packs_epi32(q[0], q[1]);
        let b = _mm256_packs_epi32(q[2], q[3]);
        let c = if T::SIGNED {
            _mm256_packs_epi16(a, b)
        } else {
            _mm256_packus_epi16(a, b)
        };
        let c = _mm256_permutevar8x32_epi32(c, order);
        _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, c);
        i += 32;
    }
    n
}

/// `out[i] = (q[i] - z) * s`.
pub fn dequantize<T: Q8>(q: &[T], s: f32, z: T, out: &mut [f32]) {
    let zf = z.to_f32();
    elementwise(q, out, |q, out| {
        for (o, &v) in out.iter_mut().zip(q) {
            *o = (v.to_f32() - zf) * s;
        }
    });
}

fn int8_executor() -> &'static GemmExecutor<u8, i8, i32> {
    // Sync but not Send, as for the f32 executor: the lock holds a leaked shared reference.
    static EXEC: OnceLock<&'static GemmExecutor<u8, i8, i32>> = OnceLock::new();
    EXEC.get_or_init(|| Box::leak(Box::new(GemmExecutor::<u8, i8, i32>::default())))
}

/// Whether this CPU's u8 x i8 kernel adds pairs of products in 16 bits with saturation
/// (`vpmaddubsw` on x86 without VNNI). Then a product is exact only when every weight lies in
/// [-64, 64]: 255 * 64 * 2 fits in an i16.
pub fn int8_may_saturate() -> bool {
    int8_executor().may_saturate()
}

/// The name of the u8 x i8 kernel in use (for reports).
pub fn int8_kernel_name() -> &'static str {
    int8_executor().kernel_name()
}

/// The zero-point terms of an integer product computed without them: summed over `k`,
/// `(a - za)(b - zb) = ab - za colsum(b) - zb (rowsum(a) - k za)`. Applied where the sums are
/// read ([`scale_sums`]), so they cost no pass of their own.
pub struct ZeroPoints {
    za: Vec<i32>,
    zb: Vec<i32>,
    /// Per row: `rowsum(a) - k za`.
    row: Vec<i32>,
    colsum: Vec<i32>,
}

impl ZeroPoints {
    /// No correction: for `m x n` sums that are already exact.
    pub fn exact(m: usize, n: usize) -> ZeroPoints {
        ZeroPoints {
            za: vec![0; m],
            zb: vec![0; n],
            row: vec![0; m],
            colsum: vec![0; n],
        }
    }

    /// The exact sum at `(i, j)` from the raw product there.
    #[inline(always)]
    pub fn sum(&self, i: usize, j: usize, raw: i32) -> i32 {
        raw.wrapping_sub(self.za[i].wrapping_mul(self.colsum[j]))
            .wrapping_sub(self.zb[j].wrapping_mul(self.row[i]))
    }
}

/// The raw product `ab` (row-major `m x k` u8 times `k x n` i8) into `out`, and the terms that
/// turn it into `(a - za) @ (b - zb)` with one zero point per row of `a` and per column of `b`.
/// On a CPU where [`int8_may_saturate`], the caller keeps the operands in its safe range.
#[allow(clippy::too_many_arguments)]
pub fn qgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[u8],
    za: &[u8],
    b: &[i8],
    zb: &[i8],
    out: &mut [i32],
) -> Result<ZeroPoints> {
    if b.len() < k * n {
        bail!(
            Shape,
            "integer matmul {m}x{k} @ {k}x{n}: got {} elements for B",
            b.len()
        );
    }
    let bm = match Matrix::from_data_with_strides([k, n], &b[..k * n], [n, 1]) {
        Ok(v) => v,
        Err(e) => bail!(Shape, "B of {k}x{n}: {e:?}"),
    };
    let colsum = if za.iter().any(|&z| z != 0) {
        col_sums(b, k, n)
    } else {
        vec![0; n]
    };
    product(m, k, n, a, za, GemmInputB::Unpacked(bm), zb, colsum, out)
}

/// Rows of A up to which [`qgemm_packed`] beats packing B per call. Past it the library's own
/// per-call packing (in cache-sized blocks) wins: MiniLM W8A8 at batch 32 (4,096 rows) ran
/// 530-560 ms that way and 670-770 ms with the weights packed once; at batch 1 (128 rows)
/// packing once took it from 16-19 to 10-11.6 ms.
pub const PACKED_MAX_ROWS: usize = 1024;

/// Constant weights (`k x n` i8) packed once into the GEMM kernel's layout, with their column
/// sums: at batch 1 MiniLM's W8A8 run spent 17% of its time packing weights per call.
pub struct PackedQ8 {
    k: usize,
    n: usize,
    b: PackedBMatrix<i8>,
    colsum: Vec<i32>,
}

impl PackedQ8 {
    pub fn new(k: usize, n: usize, b: &[i8]) -> Result<PackedQ8> {
        if b.len() != k * n {
            bail!(Shape, "{k}x{n} weights: got {} elements", b.len());
        }
        let bm = match Matrix::from_data_with_strides([k, n], b, [n, 1]) {
            Ok(v) => v,
            Err(e) => bail!(Shape, "B of {k}x{n}: {e:?}"),
        };
        Ok(PackedQ8 {
            k,
            n,
            b: int8_executor().prepack_b(bm),
            colsum: col_sums(b, k, n),
        })
    }
}

/// [`qgemm`] with weights packed beforehand.
pub fn qgemm_packed(
    m: usize,
    a: &[u8],
    za: &[u8],
    b: &PackedQ8,
    zb: &[i8],
    out: &mut [i32],
) -> Result<ZeroPoints> {
    let (k, n) = (b.k, b.n);
    let colsum = b.colsum.clone();
    product(m, k, n, a, za, GemmInputB::Packed(&b.b), zb, colsum, out)
}

fn col_sums(b: &[i8], k: usize, n: usize) -> Vec<i32> {
    let mut colsum = vec![0i32; n];
    for row in b[..k * n].chunks(n.max(1)) {
        for (c, &v) in colsum.iter_mut().zip(row) {
            *c += v as i32;
        }
    }
    colsum
}

#[allow(clippy::too_many_arguments)]
fn product(
    m: usize,
    k: usize,
    n: usize,
    a: &[u8],
    za: &[u8],
    b: GemmInputB<i8>,
    zb: &[i8],
    colsum: Vec<i32>,
    out: &mut [i32],
) -> Result<ZeroPoints> {
    if a.len() < m * k || out.len() < m * n || za.len() != m || zb.len() != n {
        bail!(
            Shape,
            "integer matmul {m}x{k} @ {k}x{n}: got {} / {} elements and {} / {} zero points",
            a.len(),
            out.len(),
            za.len(),
            zb.len()
        );
    }
    let za: Vec<i32> = za.iter().map(|&z| z as i32).collect();
    let zb: Vec<i32> = zb.iter().map(|&z| z as i32).collect();
    let kk = k as i32;
    let row: Vec<i32> = if zb.iter().any(|&z| z != 0) {
        a[..m * k]
            .chunks(k.max(1))
            .zip(&za)
            .map(|(r, &z)| r.iter().map(|&v| v as i32).sum::<i32>() - kk.wrapping_mul(z))
            .collect()
    } else {
        vec![0; m]
    };
    let zp = ZeroPoints {
        za,
        zb,
        row,
        colsum,
    };
    if m == 0 || n == 0 {
        return Ok(zp);
    }
    if k == 0 {
        out[..m * n].fill(0);
        return Ok(zp);
    }
    let am = match Matrix::from_data_with_strides([m, k], &a[..m * k], [k, 1]) {
        Ok(v) => v,
        Err(e) => bail!(Shape, "A of {m}x{k}: {e:?}"),
    };
    // rten-gemm 0.27 applies per-row / per-column zero points to the wrong tiles past the
    // first (the unit test below caught it), so the product runs without them.
    if let Err(e) = int8_executor().gemm(
        &mut out[..m * n],
        GemmInputA::Unpacked(am),
        b,
        GemmOptions::default(),
    ) {
        bail!(Invalid, "integer matmul {m}x{k} @ {k}x{n} failed: {e:?}");
    }
    Ok(zp)
}

/// The values an 8-bit quantized tensor can dequantize to: `DequantizeLinear(QuantizeLinear(v))`
/// maps `v` onto this grid.
#[derive(Clone, Copy, Debug)]
pub struct Grid {
    s: f32,
    lo: f32,
    hi: f32,
    nan: f32,
}

impl Grid {
    pub fn new<T: Q8>(s: f32, z: T) -> Grid {
        let zf = z.to_f32();
        Grid {
            s,
            lo: T::LO - zf,
            hi: T::HI - zf,
            // NaN quantizes to 0, which dequantizes to -z * s.
            nan: -zf * s,
        }
    }

    #[inline(always)]
    pub fn snap(&self, v: f32) -> f32 {
        // q - z is the rounded, clamped quotient itself: no integer conversion needed.
        let t = (v / self.s).clamp(self.lo, self.hi);
        let r = ((t + MAGIC) - MAGIC) * self.s;
        if v.is_nan() {
            self.nan
        } else {
            r
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Grid {
    /// [`Grid::snap`] of eight values, bit for bit (the same division, clamp, round half to
    /// even, and product).
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn snap8(&self, v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let t = _mm256_div_ps(v, _mm256_set1_ps(self.s));
        let t = _mm256_min_ps(
            _mm256_max_ps(t, _mm256_set1_ps(self.lo)),
            _mm256_set1_ps(self.hi),
        );
        let r = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        // Rounding keeps the sign of -0.2; a dequantized code is +0, like the scalar trick's.
        let r = _mm256_add_ps(r, _mm256_setzero_ps());
        let r = _mm256_mul_ps(r, _mm256_set1_ps(self.s));
        let nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        _mm256_blendv_ps(r, _mm256_set1_ps(self.nan), nan)
    }
}

/// [`Grid::snap`] of every value of a short slice (a row), in place, on the caller's thread.
pub fn snap_in_place(g: Grid, v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // Safety: the CPU has AVX2, checked just above.
        unsafe { snap_avx2(g, v) };
        return;
    }
    for x in v.iter_mut() {
        *x = g.snap(*x);
    }
}

/// [`snap_in_place`] in one AVX2 function, so that `snap8` inlines.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn snap_avx2(g: Grid, v: &mut [f32]) {
    use std::arch::x86_64::*;
    let n8 = v.len() / 8 * 8;
    let (head, tail) = v.split_at_mut(n8);
    for c in head.chunks_exact_mut(8) {
        _mm256_storeu_ps(c.as_mut_ptr(), g.snap8(_mm256_loadu_ps(c.as_ptr())));
    }
    for x in tail.iter_mut() {
        *x = g.snap(*x);
    }
}

/// `out[i] = dequantize(quantize(x[i]))`: a QuantizeLinear / DequantizeLinear pair in one pass,
/// without the 8-bit tensor in between.
pub fn fake_quantize(x: &[f32], grid: Grid, out: &mut [f32]) {
    elementwise(x, out, |x, out| {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = grid.snap(v);
        }
    });
}

/// The float result of an integer product, in place: `out` holds `m x n` raw i32 products
/// (as bits, from [`qgemm`], made exact by `zp`) and receives `acc * scale[j] + bias[j]` (per column `j`) or `acc * scale[i] + bias[i]`
/// (per row `i`, when `per_row`), snapped onto `grid` when the next op quantizes it.
pub fn scale_sums(
    out: &mut [f32],
    n: usize,
    zp: &ZeroPoints,
    scale: &[f32],
    bias: Option<&[f32]>,
    per_row: bool,
    grid: Option<Grid>,
) {
    if n == 0 {
        return;
    }
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = vec![0f32; if per_row { out.len() / n } else { n }];
            &zeros
        }
    };
    let rows = |r0: usize, o: &mut [f32]| {
        for (r, row) in o.chunks_mut(n).enumerate() {
            let i = r0 + r;
            let (za, ri) = (zp.za[i], zp.row[i]);
            let terms = zp.colsum.iter().zip(&zp.zb);
            if per_row {
                let (s, b) = (scale[i], bias[i]);
                for (y, (&c, &z)) in row.iter_mut().zip(terms) {
                    let acc = (y.to_bits() as i32)
                        .wrapping_sub(za.wrapping_mul(c))
                        .wrapping_sub(z.wrapping_mul(ri));
                    *y = acc as f32 * s + b;
                }
            } else {
                for (((y, (&c, &z)), &s), &b) in row.iter_mut().zip(terms).zip(scale).zip(bias) {
                    let acc = (y.to_bits() as i32)
                        .wrapping_sub(za.wrapping_mul(c))
                        .wrapping_sub(z.wrapping_mul(ri));
                    *y = acc as f32 * s + b;
                }
            }
            if let Some(g) = grid {
                for y in row.iter_mut() {
                    *y = g.snap(*y);
                }
            }
        }
    };
    let per_task = (CHUNK / n).max(1) * n;
    let run = |t: usize, o: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // Safety: the CPU has AVX2, checked just above.
            unsafe { avx2_rows(t * per_task / n, o, &rows) };
            return;
        }
        rows(t * per_task / n, o)
    };
    if out.len() <= per_task {
        run(0, out);
    } else {
        out.par_chunks_mut(per_task)
            .enumerate()
            .for_each(|(t, o)| run(t, o));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_rows(r0: usize, o: &mut [f32], rows: &impl Fn(usize, &mut [f32])) {
    rows(r0, o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_rounds_half_even_saturates_and_zeroes_nan() {
        let x = [0.25f32, 0.75, -10.0, 1000.0, f32::NAN, 0.5];
        let mut q = [0u8; 6];
        quantize(&x, 0.5, 3u8, &mut q);
        assert_eq!(q, [3, 5, 0, 255, 0, 4]);
        let mut qi = [0i8; 6];
        quantize(&x, 0.5, -1i8, &mut qi);
        assert_eq!(qi, [-1, 1, -21, 127, 0, 0]);
        let mut fq = [0f32; 6];
        fake_quantize(&x, Grid::new(0.5, 3u8), &mut fq);
        assert_eq!(fq, [0.0, 1.0, -1.5, 126.0, -1.5, 0.5]);
        let mut back = [0f32; 6];
        dequantize(&q, 0.5, 3u8, &mut back);
        assert_eq!(back, [0.0, 1.0, -1.5, 126.0, -1.5, 0.5]);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn snap8_equals_snap_bit_for_bit() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        use std::arch::x86_64::*;
        let mut x: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.0625 + 0.03125).collect();
        x.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.25,
            0.75,
            -0.25,
            1e30,
            -0.0,
        ]);
        for grid in [
            Grid::new(0.5f32, 3u8),
            Grid::new(0.017f32, -7i8),
            Grid::new(1.0 / 255.0, 0u8),
        ] {
            for c in x.chunks_exact(8) {
                let mut got = [0f32; 8];
                // Safety: the CPU has AVX2, checked above.
                unsafe {
                    _mm256_storeu_ps(got.as_mut_ptr(), grid.snap8(_mm256_loadu_ps(c.as_ptr())))
                };
                for (&v, g) in c.iter().zip(got) {
                    assert_eq!(g.to_bits(), grid.snap(v).to_bits(), "{v} on {grid:?}");
                }
            }
        }
    }

    #[test]
    fn large_tensors_match_the_serial_path() {
        let x: Vec<f32> = (0..100_000)
            .map(|i| (i as f32 * 0.37).sin() * 4.0)
            .collect();
        let mut par = vec![0u8; x.len()];
        quantize(&x, 0.03, 128u8, &mut par);
        let serial: Vec<u8> = x
            .iter()
            .map(|&v| ((v / 0.03).round_ties_even() + 128.0).clamp(0.0, 255.0) as u8)
            .collect();
        assert_eq!(par, serial);
        // Ties on both sides of zero, and values far outside the range.
        let ties = [
            0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5, 1e30, -1e30, 126.5, 127.5,
        ];
        let mut q = [0i8; 10];
        quantize(&ties, 1.0, 0i8, &mut q);
        assert_eq!(q, [0, 2, 2, 0, -2, -2, 127, -128, 126, 127]);
    }

    #[test]
    fn the_vector_path_equals_the_scalar_reference() {
        // Lengths around the 32-value blocks, ties, NaN, infinities, values past both ends.
        let mut x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.013)
            .collect();
        x.extend([
            0.5,
            -0.5,
            1.5,
            -2.5,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
        ]);
        let reference = |v: f32, s: f32, z: f32, lo: f32, hi: f32| -> f32 {
            if v.is_nan() {
                0.0
            } else {
                ((v / s).round_ties_even() + z).clamp(lo, hi)
            }
        };
        // A zero scale makes 0/0 a NaN quotient: code 0 on both paths.
        let zeros = [0.0f32; 40];
        let mut q = [1i8; 40];
        quantize(&zeros, 0.0, -7i8, &mut q);
        assert_eq!(q, [0i8; 40]);
        for len in [0, 5, 31, 32, 33, 64, 100, x.len()] {
            let x = &x[x.len() - len..];
            let mut u = vec![0u8; len];
            quantize(x, 0.05, 131u8, &mut u);
            let mut i = vec![0i8; len];
            quantize(x, 0.05, -7i8, &mut i);
            for k in 0..len {
                assert_eq!(
                    u[k] as f32,
                    reference(x[k], 0.05, 131.0, 0.0, 255.0),
                    "u8 {len} {k} {}",
                    x[k]
                );
                assert_eq!(
                    i[k] as f32,
                    reference(x[k], 0.05, -7.0, -128.0, 127.0),
                    "i8 {len} {k} {}",
                    x[k]
                );
            }
        }
    }

    #[test]
    fn qgemm_is_exact_with_zero_points() {
        for (m, k, n) in [
            (7, 37, 5),
            (8, 25, 784),
            (100, 256, 10),
            (16, 200, 196),
            (1, 64, 9),
        ] {
            qgemm_case(m, k, n);
        }
    }

    fn qgemm_case(m: usize, k: usize, n: usize) {
        let a: Vec<u8> = (0..m * k).map(|i| (i * 53 % 256) as u8).collect();
        // Weights within [-64, 64], which every kernel multiplies exactly.
        let b: Vec<i8> = (0..k * n)
            .map(|i| ((i * 29 % 129) as i32 - 64) as i8)
            .collect();
        let zb: Vec<i8> = (0..n).map(|j| (j * 7 % 100) as i8 - 50).collect();
        let mut out = vec![0i32; m * n];
        let za: Vec<u8> = (0..m).map(|i| (17 + i * 31 % 200) as u8).collect();
        let zp = qgemm(m, k, n, &a, &za, &b, &zb, &mut out).unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: i32 = (0..k)
                    .map(|p| {
                        (a[i * k + p] as i32 - za[i] as i32) * (b[p * n + j] as i32 - zb[j] as i32)
                    })
                    .sum();
                let got = zp.sum(i, j, out[i * n + j]);
                assert_eq!(got, want, "{m}x{k}x{n} at ({i}, {j})");
            }
        }
        assert!(qgemm(m, k, n, &a[1..], &za, &b, &zb, &mut out).is_err());
    }
}
