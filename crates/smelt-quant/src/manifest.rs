//! What a quantization run did, per tensor: the JSON manifest and the printed summary read it.

use crate::placement::Fallback;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct TensorRecord {
    pub name: String,
    /// "weight", "activation", "bias" or "input".
    pub kind: &'static str,
    /// The node whose operand this is (first consumer for activations).
    pub node: String,
    pub qtype: &'static str,
    pub bits: u32,
    pub granularity: String,
    pub symmetric: bool,
    pub scale_min: f32,
    pub scale_max: f32,
    /// Clipping range chosen by the observer (activations).
    pub range: Option<[f32; 2]>,
    pub observer: Option<String>,
    pub mse: Option<f64>,
    pub sqnr_db: Option<f64>,
    pub elements: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Manifest {
    pub mode: String,
    pub opset: i64,
    pub tensors: Vec<TensorRecord>,
    pub fallbacks: Vec<Fallback>,
    /// Lines from the passes that ran (equalization, bias correction, opset upgrade, ...).
    pub notes: Vec<String>,
    pub nodes_quantized: usize,
    pub calibration_samples: usize,
}

impl Manifest {
    pub fn weights(&self) -> impl Iterator<Item = &TensorRecord> {
        self.tensors.iter().filter(|t| t.kind == "weight")
    }
}
