//! Empirical bias correction: quantizing weights shifts the mean of each output channel;
//! measure the shift on calibration data (quantized model vs float model) and subtract it
//! from the channel's bias.

use crate::calibrate::Feed;
use crate::placement::Placement;
use smelt_engine::{RunOptions, Session};
use smelt_ir::{Graph, Model, Node};
use smelt_tensor::{Result, Tensor};

/// Per-channel means of each captured value, summed over all feeds.
fn channel_means(
    model: &Model,
    values: &[(String, usize)],
    feeds: &[Feed],
) -> Result<Vec<Vec<f64>>> {
    let s = Session::new(model.clone())?;
    let opts = RunOptions {
        capture: values.iter().map(|v| v.0.clone()).collect(),
        ..Default::default()
    };
    let mut sums: Vec<Vec<f64>> = vec![Vec::new(); values.len()];
    let mut counts = vec![0f64; values.len()];
    for f in feeds {
        let inputs: Vec<(&str, Tensor)> = f.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let (_, cap) = s.run_with(&inputs, &opts)?;
        for (k, (name, axis)) in values.iter().enumerate() {
            let t = &cap[name];
            let shape = t.shape();
            let c = shape.get(*axis).copied().unwrap_or(1);
            let inner: usize = shape[axis + 1..].iter().product();
            let v = t.to_f32_vec()?;
            if sums[k].len() != c {
                sums[k] = vec![0.0; c];
            }
            for (i, x) in v.iter().enumerate() {
                sums[k][(i / inner.max(1)) % c.max(1)] += *x as f64;
            }
            counts[k] += (v.len() / c.max(1)) as f64;
        }
    }
    Ok(sums
        .into_iter()
        .zip(counts)
        .map(|(s, n)| s.into_iter().map(|x| x / n.max(1.0)).collect())
        .collect())
}

/// Corrects every quantized node that has a bias it can adjust: its own (Conv B, Gemm C,
/// float or int32-dequantized) or a constant Add right after it. Returns notes per node.
pub fn correct(
    float: &Model,
    mut quant: Model,
    plan: &Placement,
    feeds: &[Feed],
) -> Result<(Model, Vec<String>)> {
    let mut values = Vec::new();
    for t in &plan.targets {
        let n = &float.graph.nodes[t.node];
        let axis = if t.op == "Conv" { 1 } else { usize::MAX };
        values.push((n.outputs[0].clone(), axis));
    }
    // MatMul/Gemm channels are the last axis: resolve its index from a float run's rank.
    let probe = Session::new(float.clone())?;
    let opts = RunOptions {
        capture: values.iter().map(|v| v.0.clone()).collect(),
        ..Default::default()
    };
    let inputs: Vec<(&str, Tensor)> = feeds[0]
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let (_, cap) = probe.run_with(&inputs, &opts)?;
    for v in values.iter_mut() {
        if v.1 == usize::MAX {
            v.1 = cap[&v.0].rank().saturating_sub(1);
        }
    }
    let mf = channel_means(float, &values, feeds)?;
    let mq = channel_means(&quant, &values, feeds)?;
    let mut notes = Vec::new();
    for (k, (t, (out, axis))) in plan.targets.iter().zip(&values).enumerate() {
        let delta: Vec<f64> = mq[k].iter().zip(&mf[k]).map(|(q, f)| q - f).collect();
        let max_shift = delta.iter().fold(0.0f64, |a, d| a.max(d.abs()));
        let g = &mut quant.graph;
        let rank = cap[out].rank();
        let done = match g.producer(out) {
            Some(p) => adjust_bias(g, p, t.bias, &delta, rank, *axis)?,
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
