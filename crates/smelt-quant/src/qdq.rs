//! Writing quantization into the graph in ONNX's QDQ form: a quantized tensor is an integer
//! initializer (weights) or a QuantizeLinear (activations) followed by a DequantizeLinear.
//! Runtimes that know the pattern fuse it into integer kernels; any other runtime computes
//! the same numbers in float.

use crate::manifest::TensorRecord;
use crate::params::Affine;
use crate::scheme::{QType, WeightScheme};
use crate::weights::{codes_data, quantize_weight, QuantizedWeight};
use smelt_ir::{Attr, Graph, Node};
use smelt_tensor::{Result, Tensor};
use std::collections::HashMap;

/// Adds a DequantizeLinear over constant `codes`; returns the name of its float output.
fn add_dq_const(
    g: &mut Graph,
    base: &str,
    codes: Tensor,
    scale: Tensor,
    zero_point: Option<Tensor>,
    axis: Option<usize>,
    block: Option<usize>,
) -> String {
    let q = g.unique_name(&format!("{base}_quantized"));
    g.initializers.insert(q.clone(), codes);
    let s = g.unique_name(&format!("{base}_scale"));
    g.initializers.insert(s.clone(), scale);
    let mut inputs = vec![q, s];
    if let Some(zp) = zero_point {
        let z = g.unique_name(&format!("{base}_zero_point"));
        g.initializers.insert(z.clone(), zp);
        inputs.push(z);
    }
    let out = g.unique_name(&format!("{base}_dequantized"));
    let ins: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let mut node = Node::new(
        "DequantizeLinear",
        &g.unique_name(&format!("{base}_DequantizeLinear")),
        &ins,
        &[&out],
    );
    if let Some(a) = axis {
        node = node.with_attr("axis", Attr::Int(a as i64));
    }
    if let Some(b) = block {
        node = node.with_attr("block_size", Attr::Int(b as i64));
    }
    g.nodes.push(node);
    out
}

/// Quantizes constant weights once each, however many nodes read them.
#[derive(Default)]
pub struct WeightCache {
    done: HashMap<String, (String, QuantizedWeight)>,
    /// Weights already quantized by a smarter method (GPTQ), used instead of rounding.
    pub pre: HashMap<String, QuantizedWeight>,
}

impl WeightCache {
    /// Replaces input `input` of node `node` (a float initializer) by its quantized form.
    /// `store` optionally reshapes the codes before writing (e.g. Gemm B already laid out).
    pub fn quantize_input(
        &mut self,
        g: &mut Graph,
        node: usize,
        input: usize,
        scheme: &WeightScheme,
        axes: crate::weights::Axes,
        records: &mut Vec<TensorRecord>,
    ) -> Result<QuantizedWeight> {
        let name = g.nodes[node].inputs[input].clone();
        if let Some((out, qw)) = self.done.get(&name) {
            g.nodes[node].inputs[input] = out.clone();
            return Ok(qw.clone());
        }
        let w = g.initializers.get(&name).cloned().ok_or_else(|| {
            smelt_tensor::Error::Invalid(format!("weight '{name}' is not an initializer"))
        })?;
        let qw = match self.pre.remove(&name) {
            Some(q) => q,
            None => quantize_weight(&w, scheme, axes)
                .map_err(|e| e.context(format!("weight '{name}' of {}", g.nodes[node].label())))?,
        };
        let out = add_dq_const(
            g,
            &name,
            qw.codes_tensor()?,
            qw.scale_tensor()?,
            Some(qw.zero_point_tensor()?),
            qw.axis,
            qw.block,
        );
        let (lo, hi) = qw.scale_range();
        records.push(TensorRecord {
            name: name.clone(),
            kind: "weight",
            node: g.nodes[node].label(),
            qtype: qw.qtype.name(),
            bits: qw.qtype.bits(),
            granularity: granularity_name(&qw),
            symmetric: scheme.symmetric,
            scale_min: lo,
            scale_max: hi,
            range: None,
            observer: None,
            mse: Some(qw.error.mse),
            sqnr_db: Some(qw.error.sqnr_db),
            elements: w.numel(),
        });
        g.nodes[node].inputs[input] = out.clone();
        self.done.insert(name, (out, qw.clone()));
        Ok(qw)
    }
}

fn granularity_name(qw: &QuantizedWeight) -> String {
    match (qw.axis, qw.block) {
        (None, _) => "per-tensor".into(),
        (Some(a), None) => format!("per-channel (axis {a})"),
        (Some(a), Some(b)) => format!("block {b} (axis {a})"),
    }
}

/// Puts QuantizeLinear -> DequantizeLinear on `value`; every reader then sees the
/// quantized-dequantized value. `reuse` names existing scale and zero-point initializers
/// (a value on the same grid as another). Returns the (scale, zero point) names used.
pub fn insert_activation_qdq(
    g: &mut Graph,
    value: &str,
    a: Affine,
    qtype: QType,
    reuse: Option<(String, String)>,
) -> Result<(String, String)> {
    let (s, z) = match reuse {
        Some(names) => names,
        None => {
            let s = g.unique_name(&format!("{value}_scale"));
            g.initializers.insert(s.clone(), Tensor::scalar(a.scale));
            let z = g.unique_name(&format!("{value}_zero_point"));
            g.initializers.insert(
                z.clone(),
                Tensor::new(vec![], codes_data(qtype, &[a.zero_point]))?,
            );
            (s, z)
        }
    };
    let q = g.unique_name(&format!("{value}_quantized"));
    let dq = g.unique_name(&format!("{value}_dequantized"));
    let qn = Node::new(
        "QuantizeLinear",
        &g.unique_name(&format!("{value}_QuantizeLinear")),
        &[value, &s, &z],
        &[&q],
    );
    g.insert_after_value(value, qn)?;
    let dqn = Node::new(
        "DequantizeLinear",
        &g.unique_name(&format!("{value}_DequantizeLinear")),
        &[&q, &s, &z],
        &[&dq],
    );
    g.insert_after_value(&q, dqn)?;
    Ok((s, z))
}

/// Writes a 1-D bias as int32 with scale = input scale x weight scale (zero point 0), the
/// form integer Conv/Gemm kernels add straight into their accumulators. Returns false (bias
/// left in float) when a code would not fit in 32 bits.
pub fn quantize_bias(
    g: &mut Graph,
    node: usize,
    input: usize,
    act_scale: f32,
    qw: &QuantizedWeight,
    records: &mut Vec<TensorRecord>,
) -> Result<bool> {
    let name = g.nodes[node].inputs[input].clone();
    let Some(b) = g.initializers.get(&name) else {
        return Ok(false);
    };
    let b = b.to_f32_vec()?;
    let per_channel = qw.params.len() == b.len() && qw.block.is_none();
    if !(per_channel || qw.params.len() == 1) {
        return Ok(false);
    }
    let scales: Vec<f32> = (0..b.len())
        .map(|c| act_scale * qw.params[if per_channel { c } else { 0 }].scale)
        .collect();
    let mut codes = Vec::with_capacity(b.len());
    for (&v, &s) in b.iter().zip(&scales) {
        let q = (v as f64 / s as f64).round_ties_even();
        if !v.is_finite() || s <= 0.0 || q.abs() > i32::MAX as f64 {
            return Ok(false);
        }
        codes.push(q as i32);
    }
    let approx: Vec<f32> = codes
        .iter()
        .zip(&scales)
        .map(|(&q, &s)| q as f32 * s)
        .collect();
    let err = crate::params::ErrorStats::between(&b, &approx);
    let (smin, smax) = scales
        .iter()
        .fold((f32::MAX, 0.0f32), |(a, c), &s| (a.min(s), c.max(s)));
    let n = b.len();
    let out = add_dq_const(
        g,
        &name,
        Tensor::from_vec(vec![n], codes)?,
        Tensor::from_vec(vec![n], scales)?,
        None,
        Some(0),
        None,
    );
    records.push(TensorRecord {
        name,
        kind: "bias",
        node: g.nodes[node].label(),
        qtype: "int32",
        bits: 32,
        granularity: "per-channel (axis 0)".into(),
        symmetric: true,
        scale_min: smin,
        scale_max: smax,
        range: None,
        observer: None,
        mse: Some(err.mse),
        sqnr_db: Some(err.sqnr_db),
        elements: n,
    });
    g.nodes[node].inputs[input] = out;
    Ok(true)
}
