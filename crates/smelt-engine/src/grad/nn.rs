//! Gradients of the layers: convolution, Gemm / MatMul, pooling, BatchNorm, LayerNorm,
//! Softmax.

use super::elementwise::expand;
use super::{f32s, reduce_to, GradRegistry};
use crate::kernels::conv::{self, ConvGeom};
use crate::kernels::gemm::gemm;
use crate::kernels::pool::PoolGeom;
use crate::ops::nn::{conv_geometry, pool_geom};
use crate::ops::{input, norm_axis, opt_input, OpCtx};
use smelt_tensor::{bail, broadcast_shapes, Result, Tensor};

pub fn register(r: &mut GradRegistry) {
    r.insert("Conv", conv_grad);
    r.insert("Gemm", gemm_grad);
    r.insert("MatMul", matmul_grad);
    r.insert("MaxPool", max_pool_grad);
    r.insert("AveragePool", avg_pool_grad);
    r.insert("GlobalAveragePool", global_avg_grad);
    r.insert("BatchNormalization", batch_norm_grad);
    r.insert("Softmax", softmax_grad);
    r.insert("LayerNormalization", layer_norm_grad);
}

type Grads = Result<Vec<Option<Tensor>>>;

fn conv_grad(ctx: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let (x, w) = (input(i, 0)?, input(i, 1)?);
    let Some(dy) = d[0] else {
        return Ok(vec![None; i.len()]);
    };
    let (g, _) = conv_geometry(ctx, x, w)?;
    let dyv = f32s(dy)?;
    // dX is the transposed convolution of dY with the same weights and geometry.
    let tg = ConvGeom {
        batch: g.batch,
        in_ch: g.out_ch,
        out_ch: g.in_ch,
        groups: g.groups,
        input: g.output,
        kernel: g.kernel,
        output: g.input,
        strides: g.strides,
        dilations: g.dilations,
        pads: g.pads,
    };
    let mut dx = vec![0f32; x.numel()];
    conv::conv_transpose(&tg, dyv, f32s(w)?, None, &mut dx)?;
    let mut dw = vec![0f32; w.numel()];
    conv::conv_weight_grad(&g, f32s(x)?, dyv, &mut dw)?;
    let mut out = vec![
        Some(Tensor::from_vec(x.shape().to_vec(), dx)?),
        Some(Tensor::from_vec(w.shape().to_vec(), dw)?),
    ];
    if opt_input(i, 2).is_some() {
        let plane = dy.numel() / (g.batch * g.out_ch).max(1);
        let mut db = vec![0f32; g.out_ch];
        for (k, chunk) in dyv.chunks(plane.max(1)).enumerate() {
            db[k % g.out_ch] += chunk.iter().sum::<f32>();
        }
        out.push(Some(Tensor::from_vec(vec![g.out_ch], db)?));
    }
    Ok(out)
}

fn gemm_grad(ctx: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let (a, b) = (input(i, 0)?, input(i, 1)?);
    let Some(dy) = d[0] else {
        return Ok(vec![None; i.len()]);
    };
    let (ta, tb) = (ctx.int("transA", 0)? != 0, ctx.int("transB", 0)? != 0);
    let (alpha, beta) = (ctx.float("alpha", 1.0)?, ctx.float("beta", 1.0)?);
    if a.rank() != 2 || b.rank() != 2 {
        bail!(Shape, "Gemm needs 2-D A and B");
    }
    let (m, k) = if ta {
        (a.shape()[1], a.shape()[0])
    } else {
        (a.shape()[0], a.shape()[1])
    };
    let n = if tb { b.shape()[0] } else { b.shape()[1] };
    let (av, bv, g) = (f32s(a)?, f32s(b)?, f32s(dy)?);
    let mut da = vec![0f32; m * k];
    if ta {
        gemm(k, n, m, bv, tb, g, true, &mut da, alpha, 0.0, None)?;
    } else {
        gemm(m, n, k, g, false, bv, !tb, &mut da, alpha, 0.0, None)?;
    }
    let mut db = vec![0f32; k * n];
    if tb {
        gemm(n, m, k, g, true, av, ta, &mut db, alpha, 0.0, None)?;
    } else {
        gemm(k, m, n, av, !ta, g, false, &mut db, alpha, 0.0, None)?;
    }
    let mut out = vec![
        Some(Tensor::from_vec(a.shape().to_vec(), da)?),
        Some(Tensor::from_vec(b.shape().to_vec(), db)?),
    ];
    if let Some(c) = opt_input(i, 2) {
        let scaled: Vec<f32> = g.iter().map(|v| v * beta).collect();
        out.push(Some(reduce_to(
            &Tensor::from_vec(dy.shape().to_vec(), scaled)?,
            c.shape(),
        )?));
    }
    Ok(out)
}

fn matmul_grad(_: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let (a, b) = (input(i, 0)?, input(i, 1)?);
    let Some(dy) = d[0] else {
        return Ok(vec![None, None]);
    };
    // 1-D operands become matrices ([K] -> [1, K] for A, [K, 1] for B), as MatMul defines.
    let a2 = if a.rank() == 1 {
        vec![1, a.shape()[0]]
    } else {
        a.shape().to_vec()
    };
    let b2 = if b.rank() == 1 {
        vec![b.shape()[0], 1]
    } else {
        b.shape().to_vec()
    };
    let (ra, rb) = (a2.len(), b2.len());
    let (m, k, n) = (a2[ra - 2], a2[ra - 1], b2[rb - 1]);
    let batch = broadcast_shapes(&a2[..ra - 2], &b2[..rb - 2])?;
    let nb: usize = batch.iter().product();
    let full = |s: &[usize], r: usize| -> Vec<usize> {
        let mut v = batch.clone();
        v.extend_from_slice(&s[r - 2..]);
        v
    };
    let (fa, fb) = (full(&a2, ra), full(&b2, rb));
    let av = expand(&Tensor::from_vec(a2.clone(), f32s(a)?.to_vec())?, &fa)?;
    let bv = expand(&Tensor::from_vec(b2.clone(), f32s(b)?.to_vec())?, &fb)?;
    let g = f32s(dy)?;
    let (mut da, mut db) = (vec![0f32; nb * m * k], vec![0f32; nb * k * n]);
    for t in 0..nb {
        let gt = &g[t * m * n..][..m * n];
        gemm(
            m,
            n,
            k,
            gt,
            false,
            &bv[t * k * n..][..k * n],
            true,
            &mut da[t * m * k..][..m * k],
            1.0,
            0.0,
            None,
        )?;
        gemm(
            k,
            m,
            n,
            &av[t * m * k..][..m * k],
            true,
            gt,
            false,
            &mut db[t * k * n..][..k * n],
            1.0,
            0.0,
            None,
        )?;
    }
    let da = reduce_to(&Tensor::from_vec(fa, da)?, &a2)?.reshape(a.shape().to_vec())?;
    let db = reduce_to(&Tensor::from_vec(fb, db)?, &b2)?.reshape(b.shape().to_vec())?;
    Ok(vec![Some(da), Some(db)])
}

/// Visits each (plane, output position) and the valid input positions of its window, in
/// window order, with flat indices into the plane's input and output.
fn windows(g: &PoolGeom, mut f: impl FnMut(usize, usize, &[usize])) {
    let [id, ih, iw] = g.input;
    let [od, oh, ow] = g.output;
    let isz = id * ih * iw;
    let osz = od * oh * ow;
    let mut win = Vec::new();
    for p in 0..g.planes {
        for z in 0..od {
            for y in 0..oh {
                for x in 0..ow {
                    win.clear();
                    for a in 0..g.kernel[0] {
                        let iz = (z * g.strides[0] + a * g.dilations[0]) as isize
                            - g.pads_begin[0] as isize;
                        if iz < 0 || iz >= id as isize {
                            continue;
                        }
                        for b in 0..g.kernel[1] {
                            let iy = (y * g.strides[1] + b * g.dilations[1]) as isize
                                - g.pads_begin[1] as isize;
                            if iy < 0 || iy >= ih as isize {
                                continue;
                            }
                            for c in 0..g.kernel[2] {
                                let ix = (x * g.strides[2] + c * g.dilations[2]) as isize
                                    - g.pads_begin[2] as isize;
                                if ix < 0 || ix >= iw as isize {
                                    continue;
                                }
                                win.push(
                                    p * isz + ((iz as usize * ih) + iy as usize) * iw + ix as usize,
                                );
                            }
                        }
                    }
                    f(p, p * osz + (z * oh + y) * ow + x, &win);
                }
            }
        }
    }
}

fn max_pool_grad(
    ctx: &OpCtx,
    i: &[Option<&Tensor>],
    o: &[&Tensor],
    d: &[Option<&Tensor>],
) -> Grads {
    let x = input(i, 0)?;
    let Some(dy) = d[0] else {
        return Ok(vec![None]);
    };
    let (g, _) = pool_geom(ctx, x, true)?;
    let (xv, yv, gv) = (f32s(x)?, f32s(o[0])?, f32s(dy)?);
    let mut dx = vec![0f32; x.numel()];
    // The gradient goes to the first window element equal to the maximum (the forward's pick).
    windows(&g, |_, out, win| {
        if let Some(&at) = win.iter().find(|&&k| xv[k] == yv[out]) {
            dx[at] += gv[out];
        }
    });
    Ok(vec![Some(Tensor::from_vec(x.shape().to_vec(), dx)?)])
}

fn avg_pool_grad(
    ctx: &OpCtx,
    i: &[Option<&Tensor>],
    _: &[&Tensor],
    d: &[Option<&Tensor>],
) -> Grads {
    let x = input(i, 0)?;
    let Some(dy) = d[0] else {
        return Ok(vec![None]);
    };
    let (g, _) = pool_geom(ctx, x, true)?;
    let with_pad = ctx.int("count_include_pad", 0)? != 0;
    let full = g.kernel.iter().product::<usize>();
    let gv = f32s(dy)?;
    let mut dx = vec![0f32; x.numel()];
    windows(&g, |_, out, win| {
        // With count_include_pad the divisor is the window clipped to the padded input.
        let count = if with_pad { full } else { win.len() };
        let share = gv[out] / count.max(1) as f32;
        for &k in win {
            dx[k] += share;
        }
    });
    if with_pad
        && g.pads_end
            .iter()
            .zip(&g.pads_begin)
            .any(|(e, b)| *e != 0 || *b != 0)
    {
        // Windows hanging past the padding are averaged over fewer cells; not handled yet.
        let clipped = g.output.iter().enumerate().any(|(k, &o)| {
            (o.saturating_sub(1)) * g.strides[k] + (g.kernel[k] - 1) * g.dilations[k]
                >= g.input[k] + g.pads_begin[k] + g.pads_end[k]
        });
        if clipped {
            bail!(
                Unsupported,
                "AveragePool gradient with count_include_pad and ceil-mode windows"
            );
        }
    }
    Ok(vec![Some(Tensor::from_vec(x.shape().to_vec(), dx)?)])
}

fn global_avg_grad(
    _: &OpCtx,
    i: &[Option<&Tensor>],
    _: &[&Tensor],
    d: &[Option<&Tensor>],
) -> Grads {
    let x = input(i, 0)?;
    let Some(dy) = d[0] else {
        return Ok(vec![None]);
    };
    let planes = x.shape()[0] * x.shape()[1];
    let area = x.numel() / planes.max(1);
    let gv = f32s(dy)?;
    let mut dx = Vec::with_capacity(x.numel());
    for &g in gv.iter().take(planes) {
        dx.extend(std::iter::repeat_n(g / area as f32, area));
    }
    Ok(vec![Some(Tensor::from_vec(x.shape().to_vec(), dx)?)])
}

/// BatchNorm with fixed statistics (inference form, what fine-tuning a deployed model uses):
/// an affine map per channel. Mean and variance get no gradient.
fn batch_norm_grad(
    ctx: &OpCtx,
    i: &[Option<&Tensor>],
    _: &[&Tensor],
    d: &[Option<&Tensor>],
) -> Grads {
    let (x, scale, mean, var) = (input(i, 0)?, input(i, 1)?, input(i, 3)?, input(i, 4)?);
    let Some(dy) = d[0] else {
        return Ok(vec![None; 5]);
    };
    let eps = ctx.float("epsilon", 1e-5)?;
    let c = x.shape()[1];
    let plane: usize = x.shape()[2..].iter().product();
    let (xv, gv) = (f32s(x)?, f32s(dy)?);
    let (s, mu, v) = (f32s(scale)?, f32s(mean)?, f32s(var)?);
    let inv: Vec<f32> = v.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let mut dx = vec![0f32; x.numel()];
    let (mut ds, mut db) = (vec![0f32; c], vec![0f32; c]);
    for (k, (xc, gc)) in xv
        .chunks(plane.max(1))
        .zip(gv.chunks(plane.max(1)))
        .enumerate()
    {
        let ch = k % c;
        let dxc = &mut dx[k * plane..(k + 1) * plane];
        for ((dxi, &xi), &gi) in dxc.iter_mut().zip(xc).zip(gc) {
            *dxi = gi * s[ch] * inv[ch];
            ds[ch] += gi * (xi - mu[ch]) * inv[ch];
            db[ch] += gi;
        }
    }
    Ok(vec![
        Some(Tensor::from_vec(x.shape().to_vec(), dx)?),
        Some(Tensor::from_vec(vec![c], ds)?),
        Some(Tensor::from_vec(vec![c], db)?),
        None,
        None,
    ])
}

fn softmax_grad(ctx: &OpCtx, i: &[Option<&Tensor>], o: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let x = input(i, 0)?;
    let Some(dy) = d[0] else {
        return Ok(vec![None]);
    };
    let r = x.rank();
    let s = x.shape();
    // Rows of the normalisation: opset 13 normalises one axis, older opsets the flattened tail.
    let (outer, len, inner) = if ctx.opset >= 13 {
        let a = norm_axis(ctx.int("axis", -1)?, r)?;
        (
            s[..a].iter().product::<usize>(),
            s[a],
            s[a + 1..].iter().product::<usize>(),
        )
    } else {
        let a = norm_axis(ctx.int("axis", 1)?, r)?;
        (
            s[..a].iter().product::<usize>(),
            s[a..].iter().product::<usize>(),
            1,
        )
    };
    let (yv, gv) = (f32s(o[0])?, f32s(dy)?);
    let mut dx = vec![0f32; x.numel()];
    for ou in 0..outer {
        for inn in 0..inner {
            let at = |j: usize| (ou * len + j) * inner + inn;
            let dot: f32 = (0..len).map(|j| yv[at(j)] * gv[at(j)]).sum();
            for j in 0..len {
                dx[at(j)] = yv[at(j)] * (gv[at(j)] - dot);
            }
        }
    }
    Ok(vec![Some(Tensor::from_vec(s.to_vec(), dx)?)])
}

/// LayerNormalization over the axes from `axis` on. Statistics are recomputed per row (the
/// forward's optional Mean / InvStdDev outputs are not trained through).
fn layer_norm_grad(
    ctx: &OpCtx,
    i: &[Option<&Tensor>],
    _: &[&Tensor],
    d: &[Option<&Tensor>],
) -> Grads {
    let (x, scale) = (input(i, 0)?, input(i, 1)?);
    let mut out = vec![None; i.len()];
    if d.iter().skip(1).any(Option::is_some) {
        bail!(
            Unsupported,
            "no gradient through LayerNormalization's Mean / InvStdDev outputs"
        );
    }
    let Some(dy) = d[0] else {
        return Ok(out);
    };
    let axis = norm_axis(ctx.int("axis", -1)?, x.rank())?;
    let eps = ctx.float("epsilon", 1e-5)? as f64;
    let tail = x.shape()[axis..].to_vec();
    let len: usize = tail.iter().product();
    let s = expand(scale, &tail)?;
    let (xv, gv) = (f32s(x)?, f32s(dy)?);
    let mut dx = vec![0f32; x.numel()];
    let (mut ds, mut db) = (vec![0f32; len], vec![0f32; len]);
    for ((xr, gr), dxr) in xv
        .chunks(len.max(1))
        .zip(gv.chunks(len.max(1)))
        .zip(dx.chunks_mut(len.max(1)))
    {
        let n = len as f64;
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        let xhat: Vec<f64> = xr.iter().map(|&v| (v as f64 - mean) * inv).collect();
        let dxhat: Vec<f64> = gr
            .iter()
            .zip(&s)
            .map(|(&g, &s)| g as f64 * s as f64)
            .collect();
        let m1 = dxhat.iter().sum::<f64>() / n;
        let m2 = dxhat.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / n;
        for j in 0..len {
            dxr[j] = (inv * (dxhat[j] - m1 - xhat[j] * m2)) as f32;
            ds[j] += gr[j] * xhat[j] as f32;
            db[j] += gr[j];
        }
    }
    out[0] = Some(Tensor::from_vec(x.shape().to_vec(), dx)?);
    out[1] = Some(reduce_to(
        &Tensor::from_vec(tail.clone(), ds)?,
        scale.shape(),
    )?);
    if let Some(b) = opt_input(i, 2) {
        out[2] = Some(reduce_to(&Tensor::from_vec(tail, db)?, b.shape())?);
    }
    Ok(out)
}
