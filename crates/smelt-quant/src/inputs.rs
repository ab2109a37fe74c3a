//! Input quantization: the model accepts raw uint8 tensors (image bytes) and turns them into
//! the float values it was trained on inside the graph, folding the preprocessing
//! x = (u * scale - mean) / std into a DequantizeLinear (and a Sub when the mean is not a whole
//! number of steps).

use smelt_ir::{Attr, Dim, Model, Node, PassRecord};
use smelt_tensor::{bail, DType, Result, Tensor};

/// Preprocessing the data pipeline applied to raw bytes; folded into the graph.
#[derive(Clone, Debug, Default)]
pub struct InputPreprocess {
    pub scale: f32,
    /// Per channel (axis 1), or one value for all; empty = 0.
    pub mean: Vec<f32>,
    /// Per channel (axis 1), or one value for all; empty = 1.
    pub std: Vec<f32>,
}

pub fn quantize_inputs(mut model: Model, pre: &InputPreprocess) -> Result<(Model, PassRecord)> {
    let mut rec = PassRecord::new("quantize-inputs");
    if model.onnx_opset() < 13 && (pre.mean.len() > 1 || pre.std.len() > 1) {
        bail!(
            Input,
            "per-channel input preprocessing needs opset 13 or later (upgrade the model first)"
        );
    }
    let g = &mut model.graph;
    let names: Vec<String> = g
        .runtime_inputs()
        .filter(|v| v.dtype == Some(DType::F32))
        .map(|v| v.name.clone())
        .collect();
    if names.is_empty() {
        bail!(Input, "the model has no float inputs to quantize");
    }
    if !(pre.scale > 0.0 && pre.scale.is_finite()) {
        bail!(
            Input,
            "input scale must be a positive number, got {}",
            pre.scale
        );
    }
    let channels = pre.mean.len().max(pre.std.len());
    for name in names {
        let info = g
            .inputs
            .iter()
            .find(|v| v.name == name)
            .cloned()
            .unwrap_or_default();
        let rank = info.shape.as_ref().map(|s| s.len());
        if channels > 1 {
            let c = info.shape.as_ref().and_then(|s| s.get(1)).cloned();
            if c != Some(Dim::Fixed(channels)) {
                bail!(
                    Input,
                    "input '{name}': {channels} channel means/stds given, but its axis 1 is {c:?}"
                );
            }
        }
        let per = |v: &[f32], c: usize, d: f32| {
            v.get(if v.len() == 1 { 0 } else { c })
                .copied()
                .unwrap_or(d)
        };
        let n = channels.max(1);
        let scales: Vec<f32> = (0..n).map(|c| pre.scale / per(&pre.std, c, 1.0)).collect();
        let shifts: Vec<f32> = (0..n)
            .map(|c| per(&pre.mean, c, 0.0) / per(&pre.std, c, 1.0))
            .collect();
        // A mean that is a whole number of input steps becomes the zero point (exact).
        let zps: Vec<f32> = (0..n).map(|c| per(&pre.mean, c, 0.0) / pre.scale).collect();
        let integral = zps
            .iter()
            .all(|z| (z - z.round()).abs() < 1e-6 && (0.0..=255.0).contains(z));
        let float_name = g.unique_name(&format!("{name}_float"));
        let s = g.unique_name(&format!("{name}_scale"));
        let z = g.unique_name(&format!("{name}_zero_point"));
        let shape = if n > 1 { vec![n] } else { vec![] };
        g.initializers
            .insert(s.clone(), Tensor::from_vec(shape.clone(), scales)?);
        let zp: Vec<u8> = zps
            .iter()
            .map(|z| if integral { z.round() as u8 } else { 0 })
            .collect();
        g.initializers
            .insert(z.clone(), Tensor::from_vec(shape, zp)?);
        // Every reader of the input now reads the dequantized value.
        for node in &mut g.nodes {
            for i in node.inputs.iter_mut().filter(|i| **i == name) {
                *i = float_name.clone();
            }
        }
        let dq_out = if integral {
            float_name.clone()
        } else {
            g.unique_name(&format!("{name}_scaled"))
        };
        let mut dq = Node::new(
            "DequantizeLinear",
            &g.unique_name(&format!("{name}_DequantizeLinear")),
            &[&name, &s, &z],
            &[&dq_out],
        );
        if n > 1 {
            dq = dq.with_attr("axis", Attr::Int(1));
        }
        g.nodes.insert(0, dq);
        if !integral {
            let m = g.unique_name(&format!("{name}_shift"));
            let mut mshape = vec![1usize; rank.unwrap_or(1).max(1)];
            if n > 1 {
                mshape[1] = n;
            }
            g.initializers
                .insert(m.clone(), Tensor::from_vec(mshape, shifts)?);
            g.nodes.insert(
                1,
                Node::new(
                    "Sub",
                    &g.unique_name(&format!("{name}_Sub")),
                    &[&dq_out, &m],
                    &[&float_name],
                ),
            );
        }
        if let Some(v) = g.inputs.iter_mut().find(|v| v.name == name) {
            v.dtype = Some(DType::U8);
        }
        rec.note(format!(
            "input '{name}' now takes uint8 (scale {}, {})",
            pre.scale,
            if integral {
                "mean folded into the zero point"
            } else {
                "mean subtracted in float"
            }
        ));
    }
    Ok((model, rec))
}
