//! Gradients of ops that only move data: the gradient moves back the same way.

use super::{f32s, GradRegistry};
use crate::ops::{input, lookup, norm_axis, OpCtx};
use smelt_tensor::{Result, Tensor};

pub fn register(r: &mut GradRegistry) {
    for op in ["Reshape", "Flatten", "Squeeze", "Unsqueeze"] {
        r.insert(op, reshape_back);
    }
    r.insert("Transpose", transpose);
    r.insert("Concat", concat);
    r.insert("Split", split);
    for op in ["Slice", "Gather", "Expand", "Tile"] {
        r.insert(op, traced);
    }
}

type Grads = Result<Vec<Option<Tensor>>>;

fn reshape_back(_: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let x = input(i, 0)?;
    let mut out = vec![None; i.len()];
    if let Some(g) = d[0] {
        out[0] = Some(g.clone().reshape(x.shape().to_vec())?);
    }
    Ok(out)
}

/// Permutes `g` (shaped `shape`) by `perm`: out[i_0..] = g[i_perm..].
fn permute(g: &[f32], shape: &[usize], perm: &[usize]) -> (Vec<usize>, Vec<f32>) {
    let r = shape.len();
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let mut in_strides = vec![1usize; r];
    for k in (0..r.saturating_sub(1)).rev() {
        in_strides[k] = in_strides[k + 1] * shape[k + 1];
    }
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let mut idx = vec![0usize; r];
    let mut out = Vec::with_capacity(g.len());
    for _ in 0..g.len() {
        out.push(g[idx.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>()]);
        for k in (0..r).rev() {
            idx[k] += 1;
            if idx[k] < out_shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    (out_shape, out)
}

fn transpose(ctx: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let x = input(i, 0)?;
    let Some(g) = d[0] else {
        return Ok(vec![None]);
    };
    let r = x.rank();
    let perm: Vec<usize> = match ctx.ints("perm")? {
        Some(p) => p.iter().map(|&v| v as usize).collect(),
        None => (0..r).rev().collect(),
    };
    // The inverse permutation takes the output's axes back.
    let mut inv = vec![0; r];
    for (k, &p) in perm.iter().enumerate() {
        inv[p] = k;
    }
    let (shape, v) = permute(f32s(g)?, g.shape(), &inv);
    Ok(vec![Some(Tensor::from_vec(shape, v)?)])
}

/// Splits `g` along `axis` into pieces of the given sizes.
fn split_along(g: &Tensor, axis: usize, sizes: &[usize]) -> Result<Vec<Tensor>> {
    let s = g.shape();
    let outer: usize = s[..axis].iter().product();
    let inner: usize = s[axis + 1..].iter().product();
    let src = f32s(g)?;
    let mut out = Vec::new();
    let mut off = 0;
    for &len in sizes {
        let mut v = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            let start = (o * s[axis] + off) * inner;
            v.extend_from_slice(&src[start..start + len * inner]);
        }
        let mut shape = s.to_vec();
        shape[axis] = len;
        out.push(Tensor::from_vec(shape, v)?);
        off += len;
    }
    Ok(out)
}

fn concat(ctx: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let Some(g) = d[0] else {
        return Ok(vec![None; i.len()]);
    };
    let axis = norm_axis(ctx.int("axis", 0)?, g.rank())?;
    let sizes: Vec<usize> = i.iter().map(|t| t.map_or(0, |t| t.shape()[axis])).collect();
    Ok(split_along(g, axis, &sizes)?
        .into_iter()
        .map(Some)
        .collect())
}

fn split(ctx: &OpCtx, i: &[Option<&Tensor>], o: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let x = input(i, 0)?;
    let axis = norm_axis(ctx.int("axis", 0)?, x.rank())?;
    let s = x.shape();
    let outer: usize = s[..axis].iter().product();
    let inner: usize = s[axis + 1..].iter().product();
    let mut dx = vec![0f32; x.numel()];
    let mut off = 0;
    for (out, g) in o.iter().zip(d) {
        let len = out.shape()[axis];
        if let Some(g) = g {
            let gv = f32s(g)?;
            for ou in 0..outer {
                let dst = (ou * s[axis] + off) * inner;
                let src = ou * len * inner;
                dx[dst..dst + len * inner].copy_from_slice(&gv[src..src + len * inner]);
            }
        }
        off += len;
    }
    let mut out = vec![None; i.len()];
    out[0] = Some(Tensor::from_vec(s.to_vec(), dx)?);
    Ok(out)
}

/// Gradient of an op that only selects or repeats elements of its first input (Slice,
/// Gather, Expand, Tile): the forward op run on the positions 0..n instead of the data says
/// where each output element came from, and the output gradient is added back there. One
/// rule for every such op, exact whatever its attributes.
fn traced(ctx: &OpCtx, i: &[Option<&Tensor>], _: &[&Tensor], d: &[Option<&Tensor>]) -> Grads {
    let x = input(i, 0)?;
    let mut out = vec![None; i.len()];
    let Some(g) = d[0] else {
        return Ok(out);
    };
    let Some(forward) = lookup("", &ctx.node.op_type) else {
        smelt_tensor::bail!(Unsupported, "no forward op {}", ctx.node.op_type);
    };
    let positions = Tensor::from_vec(x.shape().to_vec(), (0..x.numel() as i64).collect())?;
    let mut ins = i.to_vec();
    ins[0] = Some(&positions);
    let from = forward(ctx, &ins)?.remove(0);
    let mut dx = vec![0f32; x.numel()];
    for (&p, &v) in from.as_slice::<i64>()?.iter().zip(f32s(g)?) {
        dx[p as usize] += v;
    }
    out[0] = Some(Tensor::from_vec(x.shape().to_vec(), dx)?);
    Ok(out)
}
