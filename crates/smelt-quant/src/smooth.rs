//! SmoothQuant (Xiao et al. 2023): transformer activations have a few channels with
//! outliers 10-100x larger than the rest, which per-tensor activation scales cannot resolve.
//! For X·W, dividing channel j of X by s_j and multiplying row j of W by s_j changes
//! nothing in float but moves the difficulty from activations to weights (which have
//! per-channel scales). s_j = max|X_j|^alpha / max|W_j|^(1-alpha).
//!
//! The division is an explicit Mul in front of the MatMuls that read X (X itself often also
//! feeds a residual Add that must stay unscaled).

use crate::calibrate::Feed;
use smelt_engine::{RunOptions, Session};
use smelt_ir::{Graph, Model, Node, PassRecord};
use smelt_tensor::{bail, DType, Result, Tensor};

/// Activations read as the left operand by MatMuls with a constant [K, N] right operand.
fn groups(g: &Graph) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if n.op_type != "MatMul" || !n.domain.is_empty() {
            continue;
        }
        let (a, b) = (&n.inputs[0], &n.inputs[1]);
        let Some(w) = g.initializers.get(b) else { continue };
        if w.rank() != 2 || w.dtype() != DType::F32 || g.initializers.contains_key(a) {
            continue;
        }
        match out.iter_mut().find(|(v, _)| v == a) {
            Some((_, v)) => v.push(i),
            None => out.push((a.clone(), vec![i])),
        }
    }
    out
}

/// Per-channel (last axis) max |x| of each value over the calibration feeds.
fn channel_absmax(model: &Model, values: &[String], feeds: &[Feed]) -> Result<Vec<Vec<f32>>> {
    let s = Session::new(model.clone())?;
    let opts = RunOptions {
        capture: values.to_vec(),
        ..Default::default()
    };
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); values.len()];
    for f in feeds {
        let inputs: Vec<(&str, Tensor)> = f.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let (_, cap) = s.run_with(&inputs, &opts)?;
        for (k, v) in values.iter().enumerate() {
            let t = &cap[v];
            let c = *t.shape().last().unwrap_or(&1);
            let x = t.to_f32_vec()?;
            if out[k].len() != c {
                out[k] = vec![0.0; c];
            }
            for (i, &val) in x.iter().enumerate() {
                if !val.is_finite() {
                    bail!(Input, "activation '{v}' holds {val} on the calibration data");
                }
                let m = &mut out[k][i % c.max(1)];
                *m = m.max(val.abs());
            }
        }
    }
    Ok(out)
}

pub fn smooth(mut model: Model, alpha: f32, feeds: &[Feed]) -> Result<(Model, PassRecord)> {
    let mut rec = PassRecord::new("smooth");
    if !(0.0..=1.0).contains(&alpha) {
        bail!(Input, "smoothing strength must be in [0, 1], got {alpha}");
    }
    if feeds.is_empty() {
        bail!(Input, "smoothing needs calibration data");
    }
    let gs = groups(&model.graph);
    let values: Vec<String> = gs.iter().map(|g| g.0.clone()).collect();
    let amax = channel_absmax(&model, &values, feeds)?;
    let g = &mut model.graph;
    for ((v, users), amax) in gs.iter().zip(amax) {
        let k = amax.len();
        let weights: Vec<String> = users.iter().map(|&u| g.nodes[u].inputs[1].clone()).collect();
        if weights.iter().any(|w| g.initializers[w].shape()[0] != k) {
            continue;
        }
        let mut wmax = vec![0.0f32; k];
        for w in &weights {
            let t = &g.initializers[w];
            let n = t.shape()[1];
            for (i, x) in t.to_f32_vec()?.iter().enumerate() {
                let m = &mut wmax[i / n.max(1)];
                *m = m.max(x.abs());
            }
        }
        let s: Vec<f32> = amax
            .iter()
            .zip(&wmax)
            .map(|(&a, &w)| {
                if a > 0.0 && w > 0.0 {
                    (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-5, 1e5)
                } else {
                    1.0
                }
            })
            .collect();
        let spread = |x: &[f32]| {
            let (lo, hi) = x.iter().fold((f32::MAX, 0.0f32), |(a, b), &v| (a.min(v), b.max(v)));
            hi / lo.max(f32::MIN_POSITIVE)
        };
        let scaled_amax: Vec<f32> = amax.iter().zip(&s).map(|(a, s)| a / s).collect();
        // Scale each weight's rows; a weight read elsewhere too gets a private copy.
        for (&u, w) in users.iter().zip(&weights) {
            let t = g.initializers[w].clone();
            let n = t.shape()[1];
            let data: Vec<f32> = t.to_f32_vec()?.iter().enumerate().map(|(i, x)| x * s[i / n]).collect();
            let name = g.unique_name(&format!("{w}_smoothed"));
            g.initializers.insert(name.clone(), Tensor::from_vec(t.shape().to_vec(), data)?);
            g.nodes[u].inputs[1] = name;
        }
        let inv = g.unique_name(&format!("{v}_smooth_scale"));
        g.initializers.insert(inv.clone(), Tensor::from_vec(vec![k], s.iter().map(|x| 1.0 / x).collect::<Vec<f32>>())?);
        let out = g.unique_name(&format!("{v}_smoothed"));
        let mul = Node::new("Mul", &g.unique_name(&format!("{v}_Smooth")), &[v, &inv], &[&out]);
        for &u in users {
            g.nodes[u].inputs[0] = out.clone();
        }
        // Appended (node indices in `gs` stay valid); the graph is re-sorted below.
        g.nodes.push(mul);
        rec.note(format!(
            "'{v}' ({} MatMuls): channel max spread {:.1}x -> {:.1}x",
            users.len(),
            spread(&amax),
            spread(&scaled_amax)
        ));
    }
    g.sort()?;
    g.remove_dead();
    Ok((model, rec))
}
