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
        bail!(Invalid, "pooling kernel, strides and dilations must be positive");
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
    let plane = |p: usize, o: &mut [T], idx: Option<&mut [i64]>| {
        let xp = &x[p * isz..(p + 1) * isz];
        let mut idx = idx;
        for (i, pos) in positions(g).enumerate() {
            let mut best: Option<(T, usize)> = None;
            window(g, pos, |off| {
                let v = xp[off];
                // NaN compares false, so a NaN is kept only if it came first (as numpy's max).
                match best {
                    Some((b, _)) if !(v > b) => {}
                    _ => best = Some((v, off)),
                }
            });
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
        }
    };
    match indices {
        Some(ix) => {
            if ix.len() != out.len() {
                bail!(Shape, "pooling indices buffer has the wrong size");
            }
            out.par_chunks_mut(osz)
                .zip(ix.par_chunks_mut(osz))
                .enumerate()
                .for_each(|(p, (o, i))| plane(p, o, Some(i)));
        }
        None => out
            .par_chunks_mut(osz)
            .enumerate()
            .for_each(|(p, o)| plane(p, o, None)),
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
    out.par_chunks_mut(osz).enumerate().for_each(|(p, o)| {
        let xp = &x[p * isz..(p + 1) * isz];
        for (i, pos) in positions(g).enumerate() {
            let mut acc = 0.0f32;
            let mut n = 0usize;
            o[i] = match kind {
                PoolKind::Avg { count_include_pad } => {
                    let padded = window(g, pos, |off| {
                        acc += xp[off];
                        n += 1;
                    });
                    let div = if count_include_pad { padded } else { n };
                    if div == 0 {
                        0.0
                    } else {
                        acc / div as f32
                    }
                }
                PoolKind::Lp(pw) => {
                    window(g, pos, |off| acc += xp[off].abs().powf(pw));
                    acc.powf(1.0 / pw)
                }
            };
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g2(h: usize, w: usize, k: usize, s: usize, pb: usize, pe: usize, oh: usize, ow: usize) -> PoolGeom {
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
    }

    #[test]
    fn average_with_and_without_pads_counted() {
        // 2x2 input, kernel 2, pad 1 each side, stride 2 -> 2x2 windows each covering one cell.
        let x = [1.0, 2.0, 3.0, 4.0];
        let g = g2(2, 2, 2, 2, 1, 1, 2, 2);
        let mut out = vec![0.0; 4];
        pool(&g, PoolKind::Avg { count_include_pad: false }, &x, &mut out).unwrap();
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0]);
        pool(&g, PoolKind::Avg { count_include_pad: true }, &x, &mut out).unwrap();
        assert_eq!(out, vec![0.25, 0.5, 0.75, 1.0]);
        let g = g2(2, 2, 2, 1, 0, 0, 1, 1);
        let mut o = vec![0.0];
        pool(&g, PoolKind::Lp(2.0), &[3.0, 4.0, 0.0, 0.0], &mut o).unwrap();
        assert!((o[0] - 5.0).abs() < 1e-6);
    }
}
