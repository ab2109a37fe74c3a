//! Empirical bias correction: quantizing weights shifts the mean of each output channel;
//! measure the shift on calibration data (each quantized node against a float twin that
//! reads the same input) and subtract it from the channel's bias.

use crate::calibrate::{for_each_run, Feed};
use crate::placement::Placement;
use smelt_ir::{DType, Graph, Model, Node, ValueInfo};
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

/// Suffix of the float twins (and their weights) that [`correct`] adds to a probe copy.
const TWIN: &str = ".bias_correction_float";

/// Corrects every quantized node that has a bias it can adjust: its own (Conv B, Gemm C,
/// float or int32-dequantized) or a constant Add right after it. Returns notes per node.
///
/// Each node's shift is its own: in a probe copy of the quantized model, a twin of the node
/// with the float weights and bias reads the same (quantized) input, and the two outputs'
/// channel means are compared. Measured against the float model instead, each node's shift
/// would also hold every earlier node's error, and correcting all nodes from that one run
/// counts the earlier errors again at each layer (MiniLM W8A8: cosine 0.9976 -> 0.976).
pub fn correct(
    float: &Model,
    mut quant: Model,
    plan: &Placement,
    feeds: &[Feed],
) -> Result<(Model, Vec<String>)> {
    let mut probe = quant.clone();
    // Per correctable target: its index in the plan, then the output and its twin's output.
    let mut targets = Vec::new();
    let mut values: Vec<(String, Option<usize>)> = Vec::new();
    for (k, t) in plan.targets.iter().enumerate() {
        let Some(slot) = &t.weight else { continue };
        let f = &float.graph.nodes[t.node];
        let out = f.outputs[0].clone();
        let Some(p) = probe.graph.producer(&out) else {
            continue;
        };
        let mut twin = probe.graph.nodes[p].clone();
        let float_inputs: Vec<usize> = std::iter::once(slot.input).chain(t.bias).collect();
        let mut whole = true;
        for i in float_inputs {
            let name = &f.inputs[i];
            match float.graph.initializers.get(name) {
                Some(w) => {
                    let twin_name = format!("{name}{TWIN}");
                    probe
                        .graph
                        .initializers
                        .insert(twin_name.clone(), w.clone());
                    twin.inputs[i] = twin_name;
                }
                None => whole = false,
            }
        }
        if !whole {
            continue;
        }
        twin.name = format!("{}{TWIN}", twin.name);
        twin.outputs = vec![format!("{out}{TWIN}")];
        probe.graph.nodes.push(twin);
        // A graph output, so that the session does not drop the twin as dead.
        probe.graph.outputs.push(ValueInfo {
            name: format!("{out}{TWIN}"),
            dtype: Some(DType::F32),
            shape: None,
            doc_string: String::new(),
        });
        // Conv channels are axis 1; MatMul/Gemm channels the last axis.
        let axis = (t.op == "Conv").then_some(1);
        values.push((out.clone(), axis));
        values.push((format!("{out}{TWIN}"), axis));
        targets.push(k);
    }
    let (means, ranks) = channel_means(&probe, &values, feeds)?;
    let mut notes = Vec::new();
    for (j, &k) in targets.iter().enumerate() {
        let t = &plan.targets[k];
        let (out, axis) = &values[2 * j];
        let rank = ranks[2 * j];
        let axis = axis.unwrap_or(rank.saturating_sub(1));
        let (mq, mf) = (&means[2 * j], &means[2 * j + 1]);
        let delta: Vec<f64> = mq.iter().zip(mf).map(|(q, f)| q - f).collect();
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
