//! Windowed pooling (max, average, Lp) over 1 to 3 spatial dimensions, lower ranks padded to
//! 3-D with leading unit dimensions. Padding cells never contribute a value; they only count
//! towards an average's divisor when asked to.

use rayon::prelude::*;
use smelt_tensor::{bail, Result};

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
pub fn max_pool<T: Copy + PartialOrd + Default + Send + Sync>(
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
        // NaN compares false, so a NaN is kept only if it came first.
        let better = |v: T, best: &Option<(T, usize)>| match best {
            Some((b, _)) => v > *b,
            None => true,
        };
        if dense && !track && id == 1 {
            // 2-D values only: max down each window's rows (contiguous, vectorises), then
            // across the columns of that row maximum. Written as selects, not conditional
            // stores, so the compiler emits packed max instructions (AVX2 where the CPU has it).
            super::simd(xp, o, &|xp: &[T], o: &mut [T]| {
                let mut rowmax: Vec<T> = vec![T::default(); iw];
                let mut i = 0;
                for &(y0, y1, _) in &sp[1] {
                    if y1 > y0 {
                        rowmax.copy_from_slice(&xp[y0 * iw..(y0 + 1) * iw]);
                        for y in y0 + 1..y1 {
                            for (m, &v) in rowmax.iter_mut().zip(&xp[y * iw..(y + 1) * iw]) {
                                *m = if v > *m { v } else { *m };
                            }
                        }
                    }
                    for (ov, &(x0, x1, _)) in o[i..i + sp[2].len()].iter_mut().zip(&sp[2]) {
                        *ov = if y1 > y0 && x1 > x0 {
                            rowmax[x0 + 1..x1]
                                .iter()
                                .fold(rowmax[x0], |m, &v| if v > m { v } else { m })
                        } else {
                            T::default()
                        };
                    }
                    i += sp[2].len();
                }
            });
        } else if dense {
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
                                        let m = rest
                                            .iter()
                                            .fold(first, |m, &v| if v > m { v } else { m });
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
