//! Windowed pooling (max, average, Lp) over 1 to 3 spatial dimensions, lower ranks padded to
//! 3-D with leading unit dimensions. Padding cells never contribute a value; they only count
//! towards an average's divisor when asked to.

use rayon::prelude::*;
use smelt_tensor::{bail, Result};
use std::any::TypeId;

/// Geometry of one pooling, per (image, channel) plane.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolGeom {
    /// batch * channels
    pub planes: usize,
    pub input: [usize; 3],
    pub kernel: [usize; 3],
    pub output: [usize; 3],
    pub strides: [usize; 3],
    pub dilations: [usize; 3],
    pub pads_begin: [usize; 3],
    pub pads_end: [usize; 3],
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PoolKind {
    Avg { count_include_pad: bool },
    Lp(f32),
}

fn sizes(g: &PoolGeom) -> (usize, usize) {
    (g.input.iter().product(), g.output.iter().product())
}

fn check(g: &PoolGeom, in_len: usize, out_len: usize) -> Result<()> {
    let (isz, osz) = sizes(g);
    if g.strides.contains(&0) || g.dilations.contains(&0) || g.kernel.contains(&0) {
        bail!(
            Invalid,
            "pooling kernel, strides and dilations must be positive"
        );
    }
    if in_len != g.planes * isz || out_len != g.planes * osz {
        bail!(Shape, "pooling buffers do not match geometry {g:?}");
    }
    Ok(())
}

/// Calls `f(input offset within plane)` for every in-bounds cell of the window at output
/// position (z, y, x) and returns the number of cells the window covers inside the padded
/// extent (for `count_include_pad`).
#[inline]
fn window(g: &PoolGeom, pos: [usize; 3], mut f: impl FnMut(usize)) -> usize {
    let mut padded_count = 1;
    let mut ranges = [(0usize, 0usize, 0isize); 3];
    for d in 0..3 {
        let start = (pos[d] * g.strides[d]) as isize - g.pads_begin[d] as isize;
        let lim_hi = (g.input[d] + g.pads_end[d]) as isize;
        let lim_lo = -(g.pads_begin[d] as isize);
        let mut inside_pad = 0;
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for k in 0..g.kernel[d] {
            let p = start + (k * g.dilations[d]) as isize;
            if p >= lim_lo && p < lim_hi {
                inside_pad += 1;
            }
            if p >= 0 && (p as usize) < g.input[d] {
                lo = lo.min(k);
                hi = hi.max(k + 1);
            }
        }
        padded_count *= inside_pad;
        if lo == usize::MAX {
            return 0;
        }
        ranges[d] = (lo, hi, start);
    }
    let [ih, iw] = [g.input[1], g.input[2]];
    for a in ranges[0].0..ranges[0].1 {
        let z = (ranges[0].2 + (a * g.dilations[0]) as isize) as usize;
        for b in ranges[1].0..ranges[1].1 {
            let y = (ranges[1].2 + (b * g.dilations[1]) as isize) as usize;
            let row = (z * ih + y) * iw;
            for e in ranges[2].0..ranges[2].1 {
                let x = (ranges[2].2 + (e * g.dilations[2]) as isize) as usize;
                f(row + x);
            }
        }
    }
    padded_count
}

fn positions(g: &PoolGeom) -> impl Iterator<Item = [usize; 3]> + '_ {
    let [od, oh, ow] = g.output;
    (0..od).flat_map(move |z| (0..oh).flat_map(move |y| (0..ow).map(move |x| [z, y, x])))
}

/// Work (element reads) below which waking the thread pool costs more than it saves.
const PAR_MIN_WORK: usize = 1 << 16;

fn work(g: &PoolGeom) -> usize {
    g.planes * g.output.iter().product::<usize>() * g.kernel.iter().product::<usize>()
}

/// Runs `f(plane index, output plane)` over all planes, in parallel only when worth it.
fn for_planes<T: Send>(
    out: &mut [T],
    osz: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if parallel {
        out.par_chunks_mut(osz)
            .enumerate()
            .for_each(|(p, o)| f(p, o));
    } else {
        out.chunks_mut(osz).enumerate().for_each(|(p, o)| f(p, o));
    }
}

/// Per output index of one axis (dilation 1): in-bounds input range and the count of cells
/// inside the padded extent.
fn spans(g: &PoolGeom, d: usize) -> Vec<(usize, usize, usize)> {
    let (s, k, pb, pe, len) = (
        g.strides[d],
        g.kernel[d],
        g.pads_begin[d],
        g.pads_end[d],
        g.input[d],
    );
    (0..g.output[d])
        .map(|o| {
            let start = (o * s) as isize - pb as isize;
            let end = start + k as isize;
            let lo = start.max(0);
            let hi = end.min(len as isize).max(lo);
            let padded = (end.min((len + pe) as isize) - start.max(-(pb as isize))).max(0);
            (lo as usize, hi as usize, padded as usize)
        })
        .collect()
}

/// Max pooling for any ordered element type. `indices`, when given, receives each maximum's
/// flat index into the whole input tensor (row-major, or column-major over the spatial
/// dimensions when `col_major`). A window with no in-bounds cell yields `T::default()`.
pub fn max_pool<T: Copy + PartialOrd + Default + Send + Sync + 'static>(
    g: &PoolGeom,
    x: &[T],
    out: &mut [T],
    indices: Option<&mut [i64]>,
    col_major: bool,
) -> Result<()> {
    check(g, x.len(), out.len())?;
    let (isz, osz) = sizes(g);
    if osz == 0 {
        return Ok(());
    }
    let [id, ih, iw] = g.input;
    let dense = g.dilations == [1, 1, 1];
    let sp = [spans(g, 0), spans(g, 1), spans(g, 2)];
    let plane = |p: usize, o: &mut [T], idx: Option<&mut [i64]>| {
        let xp = &x[p * isz..(p + 1) * isz];
        let track = idx.is_some();
        let mut idx = idx;
        let mut emit = |i: usize, best: Option<(T, usize)>| {
            let (v, off) = best.unwrap_or((T::default(), 0));
            o[i] = v;
            if let Some(ix) = idx.as_deref_mut() {
                let flat = if col_major {
                    let (z, y, xx) = (off / (ih * iw), (off / iw) % ih, off % iw);
                    (xx * ih + y) * id + z
                } else {
                    off
                };
                ix[i] = (p * isz + flat) as i64;
            }
        };
        // A window holding NaN gives NaN (its first), as PyTorch's and NumPy's maximum do.
        let better = |v: T, best: &Option<(T, usize)>| match best {
            Some((b, _)) => bigger(v, *b) && !is_nan(*b),
            None => true,
        };
        if dense {
            let mut i = 0;
            for &(z0, z1, _) in &sp[0] {
                for &(y0, y1, _) in &sp[1] {
                    for &(x0, x1, _) in &sp[2] {
                        let mut best: Option<(T, usize)> = None;
                        if !track {
                            // Values only: a branch-free running max per row.
                            for z in z0..z1 {
                                for y in y0..y1 {
                                    let row = (z * ih + y) * iw;
                                    if let Some((&first, rest)) =
                                        xp[row + x0..row + x1].split_first()
                                    {
                                        let m = rest.iter().fold(first, |m, &v| {
                                            if bigger(v, m) {
                                                v
                                            } else {
                                                m
                                            }
                                        });
                                        if better(m, &best) {
                                            best = Some((m, 0));
                                        }
                                    }
                                }
                            }
                            emit(i, best);
                            i += 1;
                            continue;
                        }
                        for z in z0..z1 {
                            for y in y0..y1 {
                                let row = (z * ih + y) * iw;
                                for (k, &v) in xp[row + x0..row + x1].iter().enumerate() {
                                    if better(v, &best) {
                                        best = Some((v, row + x0 + k));
                                    }
                                }
                            }
                        }
                        emit(i, best);
                        i += 1;
                    }
                }
            }
        } else {
            for (i, pos) in positions(g).enumerate() {
                let mut best: Option<(T, usize)> = None;
                window(g, pos, |off| {
                    if better(xp[off], &best) {
                        best = Some((xp[off], off));
                    }
                });
                emit(i, best);
            }
        }
    };
    let parallel = work(g) >= PAR_MIN_WORK;
    if dense && indices.is_none() && id == 1 {
        max_pool_2d(g, &sp, x, out, parallel);
        return Ok(());
    }
    match indices {
        Some(ix) => {
            if ix.len() != out.len() {
                bail!(Shape, "pooling indices buffer has the wrong size");
            }
            if parallel {
                out.par_chunks_mut(osz)
                    .zip(ix.par_chunks_mut(osz))
                    .enumerate()
                    .for_each(|(p, (o, i))| plane(p, o, Some(i)));
            } else {
                out.chunks_mut(osz)
                    .zip(ix.chunks_mut(osz))
                    .enumerate()
                    .for_each(|(p, (o, i))| plane(p, o, Some(i)));
            }
        }
        None => for_planes(out, osz, parallel, |p, o| plane(p, o, None)),
    }
    Ok(())
}

/// 2-D max pooling of values (unit dilation): max down each window's rows (contiguous, so it
/// vectorises), then across the columns of that row maximum. The row maximum is extended at
/// both ends by copies of its edge cells, so that every window has the kernel's width: a
/// window that reaches into the padding also holds the edge cell (its cells are contiguous),
/// so the copies never change its maximum, and the column pass needs no clipping. Written as
/// selects, not conditional stores, so the compiler emits packed max instructions.
fn max_pool_2d<T: Copy + PartialOrd + Default + Send + Sync + 'static>(
    g: &PoolGeom,
    sp: &[Vec<(usize, usize, usize)>; 3],
    x: &[T],
    out: &mut [T],
    parallel: bool,
) {
    let (isz, osz) = sizes(g);
    let iw = g.input[2];
    let [_, kh, kw] = g.kernel;
    let (ow, sw, pb) = (g.output[2], g.strides[2], g.pads_begin[2]);
    let rows = Rows2d {
        sp_y: &sp[1],
        sp_x: &sp[2],
        isz,
        osz,
        iw,
        ow,
        kw,
        sw,
        pb,
        len: ((ow.max(1) - 1) * sw + kw).max(pb + iw),
        hollow: sp[2].iter().any(|&(x0, x1, _)| x1 <= x0),
    };
    let avx512 = avx512::available();
    // Tasks of whole planes, compiled for AVX-512 (f32) or AVX2 where the CPU has them.
    let per_task = (PAR_MIN_WORK / (osz * kh * kw).max(1)).clamp(1, 64);
    let task = |t: usize, o: &mut [T]| {
        let x = &x[t * per_task * isz..][..o.len() / osz * isz];
        match (f32s(x), f32s_mut(o)) {
            // Safety: the CPU has AVX-512.
            (Some(x), Some(o)) if avx512 => unsafe { avx512::planes(&rows, x, o) },
            _ => super::simd(x, o, &|x: &[T], o: &mut [T]| planes_2d(&rows, x, o, false)),
        }
    };
    if parallel {
        out.par_chunks_mut(osz * per_task)
            .enumerate()
            .for_each(|(t, o)| task(t, o));
    } else {
        task(0, out);
    }
}

/// One 2-D max pooling's geometry, as its planes' loop wants it.
struct Rows2d<'a> {
    /// Per output row (column), the input rows (columns) its windows cover.
    sp_y: &'a [(usize, usize, usize)],
    sp_x: &'a [(usize, usize, usize)],
    isz: usize,
    osz: usize,
    iw: usize,
    ow: usize,
    kw: usize,
    sw: usize,
    pb: usize,
    /// Length of the row maximum with `pb` copies of cell 0 before it and copies of the last
    /// cell after it, up to the last window's end.
    len: usize,
    /// Whether some window lies wholly in the padding.
    hollow: bool,
}

/// The planes of `x` into those of `o`: [`max_pool_2d`]'s loop. Inlined into its callers, so
/// that it is compiled for their instruction sets; `avx512` only where `T` is f32.
#[inline(always)]
fn planes_2d<T: Copy + PartialOrd + Default + 'static>(
    g: &Rows2d,
    x: &[T],
    o: &mut [T],
    avx512: bool,
) {
    let (iw, pb) = (g.iw, g.pb);
    // Row maximum with `pb` copies of cell 0 before it and copies of the last cell after it,
    // up to the last window's end.
    let mut rowmax = vec![T::default(); g.len];
    for (xp, o) in x.chunks_exact(g.isz).zip(o.chunks_mut(g.osz)) {
        for (orow, &(y0, y1, _)) in o.chunks_mut(g.ow).zip(g.sp_y) {
            if y1 <= y0 || iw == 0 {
                orow.fill(T::default());
                continue;
            }
            let r = &mut rowmax[pb..pb + iw];
            let rows = &xp[y0 * iw..y1 * iw];
            match (f32s_mut(r), f32s(rows)) {
                // Safety: `avx512` only when the CPU has it.
                (Some(r), Some(rows)) if avx512 => unsafe { avx512::row_max(r, rows) },
                _ => {
                    r.copy_from_slice(&rows[..iw]);
                    for row in rows[iw..].chunks_exact(iw) {
                        for (m, &v) in r.iter_mut().zip(row) {
                            *m = if bigger(v, *m) { v } else { *m };
                        }
                    }
                }
            }
            let (first, last) = (rowmax[pb], rowmax[pb + iw - 1]);
            rowmax[..pb].fill(first);
            rowmax[pb + iw..].fill(last);
            match (f32s_mut(&mut rowmax), f32s_mut(orow)) {
                // Safety: as above; `rowmax` covers every window.
                (Some(r), Some(o)) if avx512 => unsafe { avx512::columns(r, g.kw, g.sw, o) },
                _ => columns(&rowmax, g.kw, g.sw, orow),
            }
            if g.hollow {
                // Windows wholly in the padding have no cell (only with pads >= kernel).
                for (ov, &(x0, x1, _)) in orow.iter_mut().zip(g.sp_x) {
                    if x1 <= x0 {
                        *ov = T::default();
                    }
                }
            }
        }
    }
}

/// Whether `v` replaces the running maximum `m`: when larger, or NaN (a NaN maximum stays,
/// since nothing compares larger than it). Written as a select, so loops vectorise.
#[inline(always)]
fn bigger<T: PartialOrd>(v: T, m: T) -> bool {
    v > m || is_nan(v)
}

#[inline(always)]
#[allow(clippy::eq_op)]
fn is_nan<T: PartialOrd>(v: T) -> bool {
    v != v
}

/// `v` as f32 values, when `T` is f32 (the type the AVX-512 loops take).
fn f32s<T: 'static>(v: &[T]) -> Option<&[f32]> {
    // Safety: `T` is f32.
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) })
}

fn f32s_mut<T: 'static>(v: &mut [T]) -> Option<&mut [f32]> {
    // Safety: `T` is f32.
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) })
}

/// f32 max pooling's two passes in 16-lane registers, NaN winning as in [`bigger`].
mod avx512 {
    pub fn available() -> bool {
        super::super::conv_direct::available_f32()
    }

    /// `v > m ? v : m` (`max_ps`), then NaN lanes of `v` taken over.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn max_nan(
        v: std::arch::x86_64::__m512,
        m: std::arch::x86_64::__m512,
    ) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_mask_mov_ps(_mm512_max_ps(v, m), nan, v)
    }

    /// Indices of the even lanes of two registers side by side (for `permutex2var`).
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn evens() -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
    }

    /// [`planes_2d`](super::planes_2d) for f32, compiled for AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn planes(g: &super::Rows2d, x: &[f32], o: &mut [f32]) {
        if g.kw == 2 && g.sw == 2 && g.pb == 0 && !g.hollow {
            return pairs(g, x, o);
        }
        super::planes_2d(g, x, o, true)
    }

    /// Windows two columns wide at stride 2 from column 0 (the common 2 x 2 pooling), in
    /// registers: the row maximum of 32 columns, then its even and odd lanes side by side.
    /// (Through memory, a masked store read back at once waits for the store: that stall
    /// was most of the pooling's time.)
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn pairs(g: &super::Rows2d, x: &[f32], o: &mut [f32]) {
        use std::arch::x86_64::*;
        let (iw, ow) = (g.iw, g.ow);
        let upto = super::super::first_lanes;
        let even = evens();
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        for (xp, o) in x.chunks_exact(g.isz).zip(o.chunks_mut(g.osz)) {
            for (orow, &(y0, y1, _)) in o.chunks_mut(ow).zip(g.sp_y) {
                if y1 <= y0 || iw == 0 {
                    orow.fill(0.0);
                    continue;
                }
                let mut x0 = 0;
                while x0 < ow {
                    let at = 2 * x0;
                    let (ma, mb) = (upto(iw - at), upto(iw.saturating_sub(at + 16)));
                    let row = |y: usize| xp.as_ptr().add(y * iw + at);
                    let mut a = _mm512_maskz_loadu_ps(ma, row(y0));
                    let mut b = _mm512_maskz_loadu_ps(mb, row(y0).wrapping_add(16));
                    for y in y0 + 1..y1 {
                        a = max_nan(_mm512_maskz_loadu_ps(ma, row(y)), a);
                        b = max_nan(_mm512_maskz_loadu_ps(mb, row(y).wrapping_add(16)), b);
                    }
                    let first = _mm512_permutex2var_ps(a, even, b);
                    let second = _mm512_permutex2var_ps(a, odd, b);
                    // A window clipped at the row's end (ceil mode) has only its first column.
                    let whole = upto((iw - at) / 2);
                    let m = _mm512_mask_mov_ps(first, whole, max_nan(second, first));
                    _mm512_mask_storeu_ps(orow.as_mut_ptr().add(x0), upto(ow - x0), m);
                    x0 += 16;
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn planes(_: &super::Rows2d, _: &[f32], _: &mut [f32]) {
        unreachable!("not available")
    }

    /// `r` = the element-wise maximum of the rows of `rows` (each `r.len()` long).
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn row_max(r: &mut [f32], rows: &[f32]) {
        use std::arch::x86_64::*;
        let n = r.len();
        let mut x = 0;
        while x < n {
            let mask = super::super::first_lanes(n - x);
            let mut m = _mm512_maskz_loadu_ps(mask, rows.as_ptr().add(x));
            for row in rows[n..].chunks_exact(n) {
                m = max_nan(_mm512_maskz_loadu_ps(mask, row.as_ptr().add(x)), m);
            }
            _mm512_mask_storeu_ps(r.as_mut_ptr().add(x), mask, m);
            x += 16;
        }
    }

    /// `o[x]` = the maximum of `r[x * s..x * s + k]`. First the maximum of every window of
    /// `k` cells, in place from left to right (each chunk loads before it stores, and no
    /// later chunk reads what it writes), then every `s`-th of them.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn columns(r: &mut [f32], k: usize, s: usize, o: &mut [f32]) {
        use std::arch::x86_64::*;
        let n = o.len();
        if n == 0 {
            return;
        }
        let span = (n - 1) * s + 1;
        assert!(span + k - 1 <= r.len());
        let p = r.as_mut_ptr();
        let mut i = 0;
        while i < span {
            let mask = super::super::first_lanes(span - i);
            let mut m = _mm512_maskz_loadu_ps(mask, p.add(i));
            for j in 1..k {
                m = max_nan(_mm512_maskz_loadu_ps(mask, p.add(i + j)), m);
            }
            _mm512_mask_storeu_ps(p.add(i), mask, m);
            i += 16;
        }
        if s == 2 {
            // Every other one: two registers' even lanes, 16 outputs at a time.
            let (even, upto) = (evens(), super::super::first_lanes);
            let mut x = 0;
            while x < n {
                let at = 2 * x;
                let a = _mm512_maskz_loadu_ps(upto(span - at), p.add(at));
                let rest = span.saturating_sub(at + 16);
                let b = _mm512_maskz_loadu_ps(upto(rest), p.wrapping_add(at + 16));
                let v = _mm512_permutex2var_ps(a, even, b);
                _mm512_mask_storeu_ps(o.as_mut_ptr().add(x), upto(n - x), v);
                x += 16;
            }
            return;
        }
        for (x, v) in o.iter_mut().enumerate() {
            *v = *r.get_unchecked(x * s);
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn row_max(_: &mut [f32], _: &[f32]) {
        unreachable!("not available")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn columns(_: &mut [f32], _: usize, _: usize, _: &mut [f32]) {
        unreachable!("not available")
    }
}

/// `o[x]` = the maximum of `r[x * s..x * s + k]` (r long enough), first cell winning ties
/// and NaN winning; the common sizes get loops the compiler unrolls.
#[inline(always)]
fn columns<T: Copy + PartialOrd>(r: &[T], k: usize, s: usize, o: &mut [T]) {
    #[inline(always)]
    fn fixed<T: Copy + PartialOrd, const K: usize, const S: usize>(r: &[T], o: &mut [T]) {
        let r = &r[..(o.len().max(1) - 1) * S + K];
        for (x, ov) in o.iter_mut().enumerate() {
            let w = &r[x * S..x * S + K];
            let mut m = w[0];
            for &v in &w[1..] {
                m = if bigger(v, m) { v } else { m };
            }
            *ov = m;
        }
    }
    match (k, s) {
        (2, 2) => fixed::<T, 2, 2>(r, o),
        (3, 3) => fixed::<T, 3, 3>(r, o),
        (3, 2) => fixed::<T, 3, 2>(r, o),
        (3, 1) => fixed::<T, 3, 1>(r, o),
        (2, 1) => fixed::<T, 2, 1>(r, o),
        _ => {
            for (x, ov) in o.iter_mut().enumerate() {
                let w = &r[x * s..x * s + k];
                *ov = w[1..]
                    .iter()
                    .fold(w[0], |m, &v| if bigger(v, m) { v } else { m });
            }
        }
    }
}

/// Average or Lp pooling.
pub fn pool(g: &PoolGeom, kind: PoolKind, x: &[f32], out: &mut [f32]) -> Result<()> {
    check(g, x.len(), out.len())?;
    let (isz, osz) = sizes(g);
    if osz == 0 {
        return Ok(());
    }
    let dense = g.dilations == [1, 1, 1];
    let sp = [spans(g, 0), spans(g, 1), spans(g, 2)];
    let [_, ih, iw] = g.input;
    let finish = |acc: f32, n: usize, padded: usize| match kind {
        PoolKind::Avg { count_include_pad } => {
            let div = if count_include_pad { padded } else { n };
            if div == 0 {
                0.0
            } else {
                acc / div as f32
            }
        }
        PoolKind::Lp(pw) => acc.powf(1.0 / pw),
    };
    let term = |v: f32| match kind {
        PoolKind::Avg { .. } => v,
        PoolKind::Lp(pw) => v.abs().powf(pw),
    };
    for_planes(out, osz, work(g) >= PAR_MIN_WORK, |p, o| {
        let xp = &x[p * isz..(p + 1) * isz];
        if dense {
            let mut i = 0;
            for &(z0, z1, pz) in &sp[0] {
                for &(y0, y1, py) in &sp[1] {
                    for &(x0, x1, px) in &sp[2] {
                        let mut acc = 0.0f32;
                        for z in z0..z1 {
                            for y in y0..y1 {
                                let row = (z * ih + y) * iw;
                                acc += xp[row + x0..row + x1].iter().map(|&v| term(v)).sum::<f32>();
                            }
                        }
                        let n = (z1 - z0) * (y1 - y0) * (x1 - x0);
                        o[i] = finish(acc, n, pz * py * px);
                        i += 1;
                    }
                }
            }
        } else {
            for (i, pos) in positions(g).enumerate() {
                let mut acc = 0.0f32;
                let mut n = 0usize;
                let padded = window(g, pos, |off| {
                    acc += term(xp[off]);
                    n += 1;
                });
                o[i] = finish(acc, n, padded);
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn g2(
        h: usize,
        w: usize,
        k: usize,
        s: usize,
        pb: usize,
        pe: usize,
        oh: usize,
        ow: usize,
    ) -> PoolGeom {
        PoolGeom {
            planes: 1,
            input: [1, h, w],
            kernel: [1, k, k],
            output: [1, oh, ow],
            strides: [1, s, s],
            dilations: [1, 1, 1],
            pads_begin: [0, pb, pb],
            pads_end: [0, pe, pe],
        }
    }

    #[test]
    fn max_with_indices_and_partial_windows() {
        // 3x3 input 1..9, kernel 2 stride 2, ceil mode: 2x2 output with clipped windows.
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let g = g2(3, 3, 2, 2, 0, 1, 2, 2);
        let mut out = vec![0.0; 4];
        let mut idx = vec![0i64; 4];
        max_pool(&g, &x, &mut out, Some(&mut idx), false).unwrap();
        assert_eq!(out, vec![5.0, 6.0, 8.0, 9.0]);
        assert_eq!(idx, vec![4, 5, 7, 8]);
        max_pool(&g, &x, &mut out, Some(&mut idx), true).unwrap();
        // column-major: (y, x) -> x * 3 + y
        assert_eq!(idx, vec![4, 7, 5, 8]);
        // The values-only path (rows first, then columns) agrees.
        let mut plain = vec![0.0; 4];
        max_pool(&g, &x, &mut plain, None, false).unwrap();
        assert_eq!(plain, vec![5.0, 6.0, 8.0, 9.0]);
        let g = g2(3, 3, 2, 1, 1, 0, 3, 3);
        let mut padded = vec![0.0; 9];
        max_pool(&g, &x, &mut padded, None, false).unwrap();
        assert_eq!(padded, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    }

    /// The values-only 2-D path (row maximum extended by edge copies, AVX-512 for f32) against
    /// the index-tracking loop, which visits every in-bounds cell of every window.
    #[test]
    fn values_only_max_equals_the_cell_by_cell_loop() {
        let mut seed = 11u32;
        let mut next = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 16) as f32 / 65536.0 - 0.5
        };
        // (h, w, k, s, pads begin, pads end): MNIST-8's two, overlapping windows, rows longer
        // than a register, ceil mode's clipped windows, windows wholly in the padding.
        for (h, w, k, s, pb, pe) in [
            (28, 28, 2, 2, 0, 0),
            (14, 14, 3, 3, 0, 0),
            (9, 37, 3, 1, 1, 1),
            (7, 19, 3, 2, 1, 2),
            (5, 6, 2, 2, 0, 1),
            (5, 5, 2, 2, 0, 1),
            (3, 45, 2, 2, 0, 1),
            (4, 4, 2, 3, 2, 2),
        ] {
            let out = |n: usize| (n + pb + pe - k) / s + 1;
            let mut g = g2(h, w, k, s, pb, pe, out(h), out(w));
            g.planes = 3;
            let mut x: Vec<f32> = (0..3 * h * w).map(|_| next()).collect();
            x[5] = f32::NAN;
            x[h * w + 1] = f32::NAN;
            let n = 3 * out(h) * out(w);
            let (mut want, mut got, mut idx) = (vec![0.0; n], vec![0.0; n], vec![0i64; n]);
            max_pool(&g, &x, &mut want, Some(&mut idx), false).unwrap();
            max_pool(&g, &x, &mut got, None, false).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{h}x{w} k{k} s{s} pads {pb},{pe}");
            let xi: Vec<i8> = x.iter().map(|&v| (v * 200.0) as i8).collect();
            let (mut want, mut got) = (vec![0i8; n], vec![0i8; n]);
            max_pool(&g, &xi, &mut want, Some(&mut idx), false).unwrap();
            max_pool(&g, &xi, &mut got, None, false).unwrap();
            assert_eq!(got, want, "i8 {h}x{w} k{k} s{s} pads {pb},{pe}");
        }
    }

    #[test]
    fn average_with_and_without_pads_counted() {
        // 2x2 input, kernel 2, pad 1 each side, stride 2 -> 2x2 windows each covering one cell.
        let x = [1.0, 2.0, 3.0, 4.0];
        let g = g2(2, 2, 2, 2, 1, 1, 2, 2);
        let mut out = vec![0.0; 4];
        pool(
            &g,
            PoolKind::Avg {
                count_include_pad: false,
            },
            &x,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0]);
        pool(
            &g,
            PoolKind::Avg {
                count_include_pad: true,
            },
            &x,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, vec![0.25, 0.5, 0.75, 1.0]);
        let g = g2(2, 2, 2, 1, 0, 0, 1, 1);
        let mut o = vec![0.0];
        pool(&g, PoolKind::Lp(2.0), &[3.0, 4.0, 0.0, 0.0], &mut o).unwrap();
        assert!((o[0] - 5.0).abs() < 1e-6);
    }
}
