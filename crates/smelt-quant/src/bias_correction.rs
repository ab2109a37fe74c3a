//! Empirical bias correction: quantizing weights shifts the mean of each output channel;
//! measure the shift on calibration data (quantized model vs float model) and subtract it
//! from the channel's bias.

use crate::calibrate::{for_each_run, Feed};
use crate::placement::Placement;
use smelt_ir::{Graph, Model, Node};
use smelt_tensor::{Result, Tensor};

/// Per-channel means of each value over all feeds, along its axis (None: the last axis),
/// with each value's rank.
fn channel_means(
    model: &Model,
    values: &[(String, Option<usize>)],
    feeds: &[Feed],
) -> Result<(Vec<Vec<f64>>, Vec<usize>)> {
    let names: Vec<String> = values.iter().map(|v| v.0.clone()).collect();
    let mut sums: Vec<Vec<f64>> = vec![Vec::new(); values.len()];
    let mut counts = vec![0f64; values.len()];
    let mut ranks = vec![0usize; values.len()];
    for_each_run(model, &names, feeds, |_, cap| {
        for (k, (name, axis)) in values.iter().enumerate() {
            let t = &cap[name];
            let shape = t.shape();
            ranks[k] = shape.len();
            let axis = axis.unwrap_or(shape.len().saturating_sub(1));
            let c = shape.get(axis).copied().unwrap_or(1);
            let inner: usize = shape.get(axis + 1..).map_or(1, |s| s.iter().product());
            let v = t.to_f32_vec()?;
            if sums[k].len() != c {
                sums[k] = vec![0.0; c];
            }
            for (i, x) in v.iter().enumerate() {
                sums[k][(i / inner.max(1)) % c.max(1)] += *x as f64;
            }
            counts[k] += (v.len() / c.max(1)) as f64;
        }
        Ok(())
    })?;
    let means = sums
        .into_iter()
        .zip(counts)
        .map(|(s, n)| s.into_iter().map(|x| x / n.max(1.0)).collect())
        .collect();
    Ok((means, ranks))
}

/// Corrects every quantized node that has a bias it can adjust: its own (Conv B, Gemm C,
/// float or int32-dequantized) or a constant Add right after it. Returns notes per node.
pub fn correct(
    float: &Model,
    mut quant: Model,
    plan: &Placement,
    feeds: &[Feed],
) -> Result<(Model, Vec<String>)> {
    // Conv channels are axis 1; MatMul/Gemm channels the last axis.
    let values: Vec<(String, Option<usize>)> = plan
        .targets
        .iter()
        .map(|t| {
            let out = float.graph.nodes[t.node].outputs[0].clone();
            (out, (t.op == "Conv").then_some(1))
        })
        .collect();
    let (mf, ranks) = channel_means(float, &values, feeds)?;
    let (mq, _) = channel_means(&quant, &values, feeds)?;
    let mut notes = Vec::new();
    for (k, (t, (out, axis))) in plan.targets.iter().zip(&values).enumerate() {
        let rank = ranks[k];
        let axis = axis.unwrap_or(rank.saturating_sub(1));
        let delta: Vec<f64> = mq[k].iter().zip(&mf[k]).map(|(q, f)| q - f).collect();
        let max_shift = delta.iter().fold(0.0f64, |a, d| a.max(d.abs()));
        let g = &mut quant.graph;
        let done = match g.producer(out) {
            Some(p) => adjust_bias(g, p, t.bias, &delta, rank, axis)?,
            None => false,
        };
        if done {
            notes.push(format!(
                "bias correction: {} (largest channel shift {:.3e})",
                t.label, max_shift
            ));
        }
    }
    Ok((quant, notes))
}

/// Subtracts `delta` from the bias of node `p`; false when there is none to adjust.
fn adjust_bias(
    g: &mut Graph,
    p: usize,
    bias: Option<usize>,
    delta: &[f64],
    rank: usize,
    axis: usize,
) -> Result<bool> {
    if let Some(b) = bias {
        let name = g.nodes[p].inputs[b].clone();
        if let Some(t) = g.initializers.get_mut(&name) {
            return sub_from(t, delta, 1.0);
        }
        // int32 bias behind a DequantizeLinear: shift the codes by delta / scale.
        if let Some(dq) = g.producer(&name).map(|i| g.nodes[i].clone()) {
            let scales = g
                .initializers
                .get(&dq.inputs[1])
                .map(|t| t.to_f32_vec())
                .transpose()?;
            if let (Some(scales), true) = (scales, dq.op_type == "DequantizeLinear") {
                if let Some(codes) = g.initializers.get_mut(&dq.inputs[0]) {
                    let mut c = codes.to_i64_vec()?;
                    if c.len() != delta.len() || scales.len() != delta.len() {
                        return Ok(false);
                    }
                    for ((ci, d), s) in c.iter_mut().zip(delta).zip(&scales) {
                        *ci -= (d / *s as f64).round() as i64;
                        *ci = (*ci).clamp(i32::MIN as i64, i32::MAX as i64);
                    }
                    let v: Vec<i32> = c.iter().map(|&x| x as i32).collect();
                    *codes = Tensor::from_vec(codes.shape().to_vec(), v)?;
                    return Ok(true);
                }
            }
        }
        return Ok(false);
    }
    // A bias written as a separate Add of a constant (MNIST-8 style), possibly after the
    // output's QuantizeLinear/DequantizeLinear pair.
    let mut v = g.nodes[p].outputs[0].clone();
    for _ in 0..3 {
        let cons = g.consumers(&v);
        let [c] = cons.as_slice() else {
            return Ok(false);
        };
        let n: Node = g.nodes[*c].clone();
        match n.op_type.as_str() {
            "QuantizeLinear" | "DequantizeLinear" => v = n.outputs[0].clone(),
            "Add" => {
                let other = n
                    .inputs
                    .iter()
                    .find(|i| **i != v)
                    .cloned()
                    .unwrap_or_default();
                let fits = g.initializers.get(&other).is_some_and(|t| {
                    t.numel() == delta.len() && channel_aligned(t.shape(), rank, axis)
                });
                if !fits {
                    return Ok(false);
                }
                let consumers_of_const = g.consumers(&other).len();
                if consumers_of_const != 1 {
                    return Ok(false);
                }
                let t = g.initializers.get_mut(&other).expect("checked above");
                return sub_from(t, delta, 1.0);
            }
            _ => return Ok(false),
        }
    }
    Ok(false)
}

/// Whether a constant of `shape` broadcast against a rank-`rank` value varies only along `axis`.
fn channel_aligned(shape: &[usize], rank: usize, axis: usize) -> bool {
    let off = rank as isize - shape.len() as isize;
    shape
        .iter()
        .enumerate()
        .all(|(i, &d)| d == 1 || (off + i as isize) == axis as isize)
}

fn sub_from(t: &mut Tensor, delta: &[f64], k: f64) -> Result<bool> {
    let v = t.to_f32_vec()?;
    if v.len() != delta.len() {
        return Ok(false);
    }
    let out: Vec<f32> = v
        .iter()
        .zip(delta)
        .map(|(x, d)| (*x as f64 - k * d) as f32)
        .collect();
    *t = Tensor::from_vec(t.shape().to_vec(), out)?;
    Ok(true)
}
