//! What a compression changes, measured: accuracy, parameters (and how many are zero), FLOPs,
//! file size, peak memory, and latency timed side by side.

use serde::Serialize;
use smelt_engine::analysis::{infer_shapes, model_stats, peak_memory, synth_inputs, InputSpec};
use smelt_engine::Session;
use smelt_ir::{Model, Pass};
use smelt_tensor::{Result, Tensor};
use smelt_train::Samples;
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct Measure {
    /// Top-1 accuracy on the validation data, when there is some.
    pub accuracy: Option<f64>,
    /// Mean cosine of the outputs to the original model's, when measured instead.
    pub fidelity: Option<f64>,
    pub params: u64,
    pub nonzero: u64,
    pub flops: u64,
    /// Size of the ONNX file.
    pub bytes: u64,
    /// Peak memory of a batch-1 run in smelt's engine: weights plus the most activation bytes
    /// alive at once (see `smelt_engine::analysis::peak_memory`).
    pub peak_bytes: u64,
}

impl Measure {
    /// What the charts plot: accuracy, or fidelity when there are no labels.
    pub fn score(&self) -> Option<f64> {
        self.accuracy.or(self.fidelity)
    }
}

/// Measures `model` (batch-1 shapes for FLOPs); accuracy on `val` when given.
pub fn measure(model: &Model, val: Option<&Samples>) -> Result<Measure> {
    // FLOPs count the file's nodes, which the reference session keeps; peak memory is that of
    // the session that really runs (QDQ patterns fused into integer ops).
    let reference = Session::reference(model.clone())?;
    let st = model_stats(model, &infer_shapes(&reference, &InputSpec::default())?);
    let s = Session::new(model.clone())?;
    let shapes = infer_shapes(&s, &InputSpec::default())?;
    let accuracy = val.map(|v| accuracy(model, v)).transpose()?;
    Ok(Measure {
        accuracy,
        fidelity: None,
        params: st.params,
        nonzero: st.params - st.zero_params,
        flops: st.flops,
        bytes: smelt_onnx::encode(model)?.len() as u64,
        peak_bytes: peak_memory(&s, &shapes),
    })
}

/// Top-1 accuracy of `model` on `val` (batches of 256; a fixed batch of 1 is made dynamic).
pub fn accuracy(model: &Model, val: &Samples) -> Result<f64> {
    let input = smelt_train::input_name(model)?;
    let m = smelt_train::prepare(model.clone())?;
    smelt_train::accuracy(&Session::new(m)?, &input, val, 256)
}

/// Median latency in ms of both models at `batch`, timed in alternation so that machine noise
/// hits both alike. Fixed-batch models are made batch-dynamic for the measurement when needed.
pub fn latency_pair(a: &Model, b: &Model, batch: usize, runs: usize) -> Result<(f64, f64)> {
    let prep = |m: &Model| -> Result<Session> {
        let m = if batch > 1 {
            smelt_ir::passes::DynamicBatch::default()
                .run(m.clone())
                .map(|r| r.0)
                .unwrap_or_else(|_| m.clone())
        } else {
            m.clone()
        };
        Session::new(m)
    };
    let (sa, sb) = (prep(a)?, prep(b)?);
    let spec = InputSpec {
        batch,
        ..Default::default()
    };
    let feed = |s: &Session| -> Vec<(String, Tensor)> { synth_inputs(s.graph(), &spec) };
    let (fa, fb) = (feed(&sa), feed(&sb));
    let run = |s: &Session, f: &[(String, Tensor)]| -> Result<f64> {
        let inputs: Vec<(&str, Tensor)> = f.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let t = Instant::now();
        s.run(&inputs)?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    for _ in 0..2 {
        run(&sa, &fa)?;
        run(&sb, &fb)?;
    }
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        ta.push(run(&sa, &fa)?);
        tb.push(run(&sb, &fb)?);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(ta), median(tb)))
}
