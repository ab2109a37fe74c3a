//! Mixed precision: per-layer weight bits chosen from measured sensitivity to meet a metric
//! floor (accuracy, or fidelity to the float model).
//!
//! Every quantizable layer starts at the high-precision scheme; if that alone misses the floor,
//! the layers it costs most stay float (the fewest that bring the metric back, by bisection).
//! Each remaining layer's cost is measured by switching only that layer to the low-precision
//! scheme; layers are then ordered by cost per byte saved, and the longest prefix of that order
//! whose combined model stays at or above the floor is kept. The prefix is found by bisection
//! (the metric falls as layers are added), so the search costs one evaluation per layer plus a
//! handful.

use crate::{quantize, Feed, Options, WeightScheme};
use serde::Serialize;
use smelt_ir::{Model, Pass};
use smelt_tensor::{bail, Result};

#[derive(Clone, Debug, Serialize)]
pub struct LayerChoice {
    pub node: String,
    pub op: String,
    pub bits: u32,
    /// The metric lost when only this layer is quantized, to the low-precision scheme.
    pub low_drop: f64,
    /// Bytes the low-precision scheme saves on this layer's weight.
    pub bytes_saved: u64,
    /// Why the layer got its bits.
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// The options that produce the chosen model (`weight_overrides` filled in).
    #[serde(skip)]
    pub options: Options,
    /// The metric of the chosen model, and with every layer at the high precision.
    pub metric: f64,
    pub high_metric: f64,
    pub floor: f64,
    pub layers: Vec<LayerChoice>,
    pub evaluations: usize,
}

/// Chooses per-layer bits between `base.weights` (high) and `low`, keeping `eval` >= `floor`.
pub fn choose(
    model: &Model,
    base: &Options,
    low: WeightScheme,
    calib: &[Feed],
    floor: f64,
    mut eval: impl FnMut(&Model) -> Result<f64>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Plan> {
    // The float model and each single layer, then each combination tried.
    let mut layer_evaluations = 1usize;
    let mut evaluations = 0usize;
    let mut score =
        |base: &Options, overrides: &[&str], eval: &mut dyn FnMut(&Model) -> Result<f64>| {
            let opts = Options {
                weight_overrides: overrides.iter().map(|n| (n.to_string(), low)).collect(),
                ..base.clone()
            };
            smelt_tensor::interrupt::check()?;
            let (m, _) = quantize(model.clone(), &opts, calib, |_, _, _| {})?;
            evaluations += 1;
            eval(&m).map(|v| (v, opts))
        };
    let float_metric = eval(model)?;
    if float_metric < floor {
        bail!(
            Input,
            "the float model itself scores {float_metric:.5}, below the floor {floor}"
        );
    }
    // The quantizer's own view of the graph: folded constants, fused biases.
    let mut m = model.clone();
    m.graph.drop_initializer_inputs();
    let (folded, _) = smelt_engine::passes::FoldConstants {
        max_elements: 1 << 28,
    }
    .run(m)?;
    let (folded, _) = smelt_ir::passes::FuseBias.run(folded)?;
    let plan = crate::placement::plan(&folded.graph, &base.ops, &base.exclude)?;
    // Each layer's cost at `scheme` with only it quantized (the rest float).
    let mut alone =
        |scheme: WeightScheme, out0: &str, eval: &mut dyn FnMut(&Model) -> Result<f64>| {
            let one = Options {
                weights: scheme,
                only: Some(vec![out0.to_string()]),
                ..base.clone()
            };
            smelt_tensor::interrupt::check()?;
            let (q, _) = quantize(model.clone(), &one, calib, |_, _, _| {})?;
            layer_evaluations += 1;
            eval(&q).map(|m| float_metric - m)
        };
    let weighted: Vec<(String, String)> = plan
        .targets
        .iter()
        .filter(|t| t.weight.is_some())
        .map(|t| {
            (
                folded.graph.nodes[t.node].outputs[0].clone(),
                t.label.clone(),
            )
        })
        .collect();
    // When the high precision everywhere misses the floor, the layers it costs most stay
    // float: the fewest of them (most costly first) that bring the metric back.
    let mut base = base.clone();
    let mut float_layers: Vec<(String, String, f64)> = Vec::new();
    let (mut high_metric, mut high_opts) = score(&base, &[], &mut eval)?;
    if high_metric < floor {
        let mut costs = Vec::new();
        for (out0, label) in &weighted {
            costs.push((
                out0.clone(),
                label.clone(),
                alone(base.weights, out0, &mut eval)?,
            ));
        }
        costs.sort_by(|a, b| b.2.total_cmp(&a.2));
        let n = costs.len();
        // The j least costly layers quantized, the rest float.
        let quantized = |j: usize| -> Options {
            Options {
                only: Some(costs[n - j..].iter().map(|c| c.0.clone()).collect()),
                ..base.clone()
            }
        };
        // j = 0 is the float model itself; j = n (everything) is known to miss.
        let (j, (m, o)) = last_holding((0, (float_metric, quantized(0))), n, |j| {
            let (m, o) = score(&quantized(j), &[], &mut eval)?;
            Ok((m >= floor).then_some((m, o)))
        })?;
        (high_metric, high_opts) = (m, o.clone());
        base = o;
        float_layers = costs[..n - j].to_vec();
    }
    let (hb, lb) = (base.weights.qtype.bits() as u64, low.qtype.bits() as u64);
    let mut layers = Vec::new();
    for (i, t) in plan.targets.iter().enumerate() {
        let Some(slot) = &t.weight else { continue };
        let node = &folded.graph.nodes[t.node];
        let elements = folded
            .graph
            .initializers
            .get(&node.inputs[slot.input])
            .map_or(0, |w| w.numel() as u64);
        let out0 = node.outputs[0].clone();
        if float_layers.iter().any(|f| f.0 == out0) {
            continue;
        }
        // Only this layer quantized (the rest float): cheaper than re-quantizing every layer,
        // and the high precision's own error is small next to the low one's.
        let cost = alone(low, &out0, &mut eval)?;
        progress(i + 1, plan.targets.len());
        layers.push((
            out0,
            LayerChoice {
                node: t.label.clone(),
                op: t.op.clone(),
                bits: base.weights.qtype.bits(),
                low_drop: cost,
                bytes_saved: elements * hb.saturating_sub(lb) / 8,
                reason: String::new(),
            },
        ));
    }
    // Cheapest per byte first; a layer that gains from low precision costs nothing. A layer
    // that alone costs more than the whole slack cannot go low, whatever its savings.
    let slack = high_metric - floor;
    let cost = |c: &LayerChoice| {
        if c.low_drop > slack {
            f64::INFINITY
        } else {
            c.low_drop.max(0.0) / c.bytes_saved.max(1) as f64
        }
    };
    layers.sort_by(|a, b| {
        cost(&a.1)
            .total_cmp(&cost(&b.1))
            .then(b.1.bytes_saved.cmp(&a.1.bytes_saved))
    });
    let names: Vec<&str> = layers
        .iter()
        .take_while(|(_, c)| cost(c).is_finite())
        .map(|(n, _)| n.as_str())
        .collect();
    // Largest k with metric(first k low) >= floor; k = 0 is known to hold. All of them is
    // tried first: often everything fits.
    let mut low_at = |k: usize| -> Result<Option<(f64, Options)>> {
        let (m, o) = score(&base, &names[..k], &mut eval)?;
        Ok((m >= floor).then_some((m, o)))
    };
    let (ok, (ok_metric, ok_opts)) = match low_at(names.len())? {
        Some(all) => (names.len(), all),
        None => last_holding((0, (high_metric, high_opts)), names.len(), low_at)?,
    };
    let n = layers.len();
    let low_bits = low.qtype.bits();
    let out: Vec<LayerChoice> = layers
        .into_iter()
        .enumerate()
        .map(|(r, (_, mut c))| {
            if r < ok {
                c.bits = low_bits;
                c.reason = format!(
                    "{low_bits} bits: alone it costs {:.5}, rank {} of {n} by cost per byte saved",
                    c.low_drop,
                    r + 1
                );
            } else if c.low_drop > slack {
                c.reason = format!(
                    "kept at {} bits: {low_bits} bits alone costs {:.5}, more than the {:.5} \
                     the floor leaves",
                    c.bits, c.low_drop, slack
                );
            } else {
                c.reason = format!(
                    "kept at {} bits: {low_bits} bits alone costs {:.5} (rank {} of {n} by cost \
                     per byte saved); the floor {floor} allows only the {ok} cheapest layers at \
                     {low_bits} bits",
                    c.bits,
                    c.low_drop,
                    r + 1
                );
            }
            c
        })
        .collect();
    let nf = float_layers.len();
    let out: Vec<LayerChoice> = float_layers
        .into_iter()
        .enumerate()
        .map(|(r, (_, label, cost))| LayerChoice {
            op: label.split(' ').next().unwrap_or("").to_string(),
            node: label,
            bits: 32,
            low_drop: cost,
            bytes_saved: 0,
            reason: format!(
                "kept in float: {} bits alone costs {cost:.5}, rank {} of the layers by that \
                 cost; {} bits everywhere missed the floor {floor}, and the {nf} most costly \
                 in float bring it back",
                base.weights.qtype.bits(),
                r + 1,
                base.weights.qtype.bits()
            ),
        })
        .chain(out)
        .collect();
    Ok(Plan {
        options: ok_opts,
        metric: ok_metric,
        high_metric,
        floor,
        layers: out,
        evaluations: evaluations + layer_evaluations,
    })
}

/// Bisection over a monotone condition: given that it holds at `ok.0` (with value `ok.1`) and
/// fails at `bad`, the largest k in between where `holds(k)` gives a value.
fn last_holding<T>(
    mut ok: (usize, T),
    mut bad: usize,
    mut holds: impl FnMut(usize) -> Result<Option<T>>,
) -> Result<(usize, T)> {
    while bad > ok.0 + 1 {
        let mid = (ok.0 + bad) / 2;
        match holds(mid)? {
            Some(v) => ok = (mid, v),
            None => bad = mid,
        }
    }
    Ok(ok)
}
