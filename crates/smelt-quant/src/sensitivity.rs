//! Per-layer sensitivity: quantize one layer at a time, everything else in float, and
//! measure the metric. Layers with a large drop are the ones to keep in higher precision.

use crate::{quantize, Feed, Options};
use serde::Serialize;
use smelt_ir::{Model, Pass};
use smelt_tensor::Result;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Clone, Debug, Serialize)]
pub struct LayerSensitivity {
    pub node: String,
    pub op: String,
    pub metric: f64,
    /// Float metric minus this layer's metric (positive: quantizing it hurts).
    pub drop: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub metric: String,
    pub float_metric: f64,
    pub layers: Vec<LayerSensitivity>,
}

/// `eval` scores a model (higher is better). Activation ranges are calibrated once for the
/// whole model and reused for every single-layer variant.
pub fn analyze(
    model: &Model,
    opts: &Options,
    calib: &[Feed],
    metric: &str,
    eval: impl Fn(&Model) -> Result<f64>,
) -> Result<Report> {
    let float_metric = eval(model)?;
    let (_, full) = quantize(model.clone(), opts, calib, |_, _, _| {})?;
    let ranges: HashMap<String, (f32, f32)> = full
        .tensors
        .iter()
        .filter_map(|t| t.range.map(|r| (t.name.clone(), (r[0], r[1]))))
        .collect();
    let ranges = Arc::new(ranges);
    let (folded, _) = smelt_engine::passes::FoldConstants {
        max_elements: 1 << 28,
    }
    .run(model.clone())?;
    let plan = crate::placement::plan(&folded.graph, &opts.ops, &opts.exclude)?;
    let mut layers = Vec::new();
    for t in &plan.targets {
        let out0 = folded.graph.nodes[t.node].outputs[0].clone();
        let one = Options {
            only: Some(vec![out0]),
            ranges: Some(ranges.clone()),
            bias_correction: false,
            ..opts.clone()
        };
        let (m, _) = quantize(model.clone(), &one, calib, |_, _, _| {})?;
        let metric = eval(&m)?;
        layers.push(LayerSensitivity {
            node: t.label.clone(),
            op: t.op.clone(),
            metric,
            drop: float_metric - metric,
        });
    }
    Ok(Report {
        metric: metric.to_string(),
        float_metric,
        layers,
    })
}
