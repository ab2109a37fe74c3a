//! Gradients of reductions: the output gradient spread back over what was reduced.

use super::elementwise::expand;
use super::GradRegistry;
use crate::ops::reduce::reduce_axes;
use crate::ops::{input, norm_axis, OpCtx};
use smelt_tensor::{Result, Tensor};

pub fn register(r: &mut GradRegistry) {
    r.insert("ReduceSum", |c, i, _, d| spread(c, i, d, false));
    r.insert("ReduceMean", |c, i, _, d| spread(c, i, d, true));
}

type Grads = Result<Vec<Option<Tensor>>>;

fn spread(ctx: &OpCtx, i: &[Option<&Tensor>], d: &[Option<&Tensor>], mean: bool) -> Grads {
    let x = input(i, 0)?;
    let mut out = vec![None; i.len()];
    let Some(g) = d[0] else {
        return Ok(out);
    };
    let rank = x.rank();
    let mut reduced = vec![false; rank];
    match reduce_axes(ctx, i)? {
        None if ctx.int("noop_with_empty_axes", 0)? != 0 => {
            out[0] = Some(g.clone());
            return Ok(out);
        }
        None => reduced.iter_mut().for_each(|r| *r = true),
        Some(axes) => {
            for a in axes {
                if rank > 0 {
                    reduced[norm_axis(a, rank)?] = true;
                }
            }
        }
    }
    // The output gradient with the reduced axes kept as 1, broadcast back over them.
    let kept: Vec<usize> = x
        .shape()
        .iter()
        .zip(&reduced)
        .map(|(&n, &r)| if r { 1 } else { n })
        .collect();
    let g = g.clone().reshape(kept)?;
    let mut v = expand(&g, x.shape())?;
    if mean {
        let count: usize = x
            .shape()
            .iter()
            .zip(&reduced)
            .filter(|p| *p.1)
            .map(|p| *p.0)
            .product();
        let k = 1.0 / count.max(1) as f32;
        v.iter_mut().for_each(|e| *e *= k);
    }
    out[0] = Some(Tensor::from_vec(x.shape().to_vec(), v)?);
    Ok(out)
}
