//! The training form of a QDQ model, for quantization-aware training, and the way back.
//!
//! A QDQ model stores weights as integer codes; training needs them in float. [`to_training`]
//! turns each weight's constant codes back into a float weight followed by a QuantizeLinear
//! with the same scale and zero point, so every forward run still sees exactly the quantized
//! values (fake quantization) while the gradient reaches the float weight through the
//! straight-through estimator. Int32 biases become float biases. [`to_qdq`] folds the trained
//! weights back into codes and re-quantizes each bias with the (possibly learned) scales of
//! its node's input and weight, giving the same QDQ form the quantizer writes.

use smelt_engine::ops::{lookup, OpCtx};
use smelt_ir::{Model, Node, Pass};
use smelt_tensor::{bail, DType, Result, Tensor};

/// What [`to_training`] changed: the names a training loop needs.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TrainingForm {
    /// Float weights read by a QuantizeLinear: trained through the straight-through estimator.
    pub weights: Vec<String>,
    /// Every QuantizeLinear / DequantizeLinear scale: frozen unless scales are learned (LSQ).
    pub scales: Vec<String>,
    /// Biases that were int32 codes: back to codes on export.
    pub biases: Vec<String>,
}

/// Runs one forward op on constant inputs.
fn eval(model: &Model, node: &Node) -> Result<Vec<Tensor>> {
    let Some(f) = lookup("", &node.op_type) else {
        bail!(Unsupported, "no op {}", node.op_type);
    };
    let g = &model.graph;
    let ins: Vec<Option<&Tensor>> = node
        .inputs
        .iter()
        .map(|x| (!x.is_empty()).then(|| g.initializers.get(x)).flatten())
        .collect();
    let ctx = OpCtx::new(node, model.onnx_opset());
    f(&ctx, &ins).map_err(|e| e.context(node.label()))
}

fn is_codes(t: &Tensor) -> bool {
    !t.dtype().is_float()
}

/// The QDQ model with float weights behind fake quantization, ready to train.
pub fn to_training(mut model: Model) -> Result<(Model, TrainingForm)> {
    let mut form = TrainingForm::default();
    let mut i = 0;
    while i < model.graph.nodes.len() {
        let n = model.graph.nodes[i].clone();
        let codes = n
            .inputs
            .first()
            .and_then(|x| model.graph.initializers.get(x));
        let Some(codes) = codes.filter(|t| n.op_type == "DequantizeLinear" && is_codes(t)) else {
            i += 1;
            continue;
        };
        let codes_dtype = codes.dtype();
        let float = eval(&model, &n)?.remove(0);
        let g = &mut model.graph;
        let base = n.inputs[0]
            .strip_suffix("_quantized")
            .unwrap_or(&n.inputs[0]);
        let name = if g.value_names().contains(base) {
            g.unique_name(base)
        } else {
            base.to_string()
        };
        if codes_dtype == DType::I32 {
            // A bias: read in float directly; its codes are rebuilt on export.
            g.initializers.insert(name.clone(), float);
            for m in g.nodes.iter_mut() {
                for x in m.inputs.iter_mut().filter(|x| **x == n.outputs[0]) {
                    *x = name.clone();
                }
            }
            g.nodes.remove(i);
            for x in &n.inputs {
                if g.consumers(x).is_empty() {
                    g.initializers.shift_remove(x);
                }
            }
            form.biases.push(name);
            continue;
        }
        let mut q_inputs = vec![name.clone(), n.inputs[1].clone()];
        match n.inputs.get(2).filter(|z| !z.is_empty()) {
            Some(z) => q_inputs.push(z.clone()),
            None => {
                // Without a zero point QuantizeLinear would produce uint8: give it the codes' type.
                let scale = &g.initializers[&n.inputs[1]];
                let z = g.unique_name(&format!("{name}_zero_point"));
                g.initializers.insert(
                    z.clone(),
                    Tensor::zeros(codes_dtype, scale.shape().to_vec()),
                );
                q_inputs.push(z.clone());
                g.nodes[i].inputs.resize(2, String::new());
                g.nodes[i].inputs.push(z);
            }
        }
        g.initializers.insert(name.clone(), float);
        g.initializers.shift_remove(&n.inputs[0]);
        let ins: Vec<&str> = q_inputs.iter().map(String::as_str).collect();
        let mut q = Node::new(
            "QuantizeLinear",
            &g.unique_name(&format!("{name}_QuantizeLinear")),
            &ins,
            &[&n.inputs[0]],
        );
        for key in ["axis", "block_size"] {
            if let Some(a) = n.attrs.get(key) {
                q = q.with_attr(key, a.clone());
            }
        }
        g.nodes.insert(i, q);
        form.weights.push(name);
        i += 2;
    }
    let g = &model.graph;
    for n in &g.nodes {
        if matches!(n.op_type.as_str(), "QuantizeLinear" | "DequantizeLinear") {
            if let Some(s) = n.inputs.get(1) {
                if g.initializers.contains_key(s) && !form.scales.contains(s) {
                    form.scales.push(s.clone());
                }
            }
        }
    }
    Ok((model, form))
}

/// The scale initializer of the DequantizeLinear producing `value`, if it is one.
fn dq_scale<'a>(model: &'a Model, value: &str) -> Option<&'a Tensor> {
    let g = &model.graph;
    let p = &g.nodes[g.producer(value)?];
    (p.op_type == "DequantizeLinear")
        .then(|| g.initializers.get(p.inputs.get(1)?))
        .flatten()
}

/// Back to the QDQ form: trained weights folded into integer codes, biases re-quantized to
/// int32 with scale = input scale x weight scale.
pub fn to_qdq(mut model: Model, form: &TrainingForm) -> Result<Model> {
    let mut i = 0;
    while i < model.graph.nodes.len() {
        let n = &model.graph.nodes[i];
        let weight = n.op_type == "QuantizeLinear" && form.weights.contains(&n.inputs[0]);
        if !weight
            || !n
                .inputs
                .iter()
                .all(|x| model.graph.initializers.contains_key(x))
        {
            i += 1;
            continue;
        }
        let n = n.clone();
        let codes = eval(&model, &n)?.remove(0);
        let g = &mut model.graph;
        g.initializers.insert(n.outputs[0].clone(), codes);
        g.nodes.remove(i);
        if g.consumers(&n.inputs[0]).is_empty() {
            g.initializers.shift_remove(&n.inputs[0]);
        }
    }
    for b in &form.biases {
        for c in model.graph.consumers(b) {
            let n = model.graph.nodes[c].clone();
            if n.inputs.get(2) != Some(b) {
                continue;
            }
            let (Some(sx), Some(sw)) = (
                dq_scale(&model, &n.inputs[0]),
                dq_scale(&model, &n.inputs[1]),
            ) else {
                continue;
            };
            if sx.numel() != 1 {
                continue;
            }
            let sx = sx.to_f32_vec()?[0];
            let sw = sw.to_f32_vec()?;
            let bv = model.graph.initializers[b].to_f32_vec()?;
            if !(sw.len() == 1 || sw.len() == bv.len()) {
                continue;
            }
            let scales: Vec<f32> = (0..bv.len())
                .map(|k| sx * sw[if sw.len() == 1 { 0 } else { k }])
                .collect();
            let codes: Option<Vec<i32>> = bv
                .iter()
                .zip(&scales)
                .map(|(&v, &s)| {
                    let q = (v as f64 / s as f64).round_ties_even();
                    (s > 0.0 && q.abs() <= i32::MAX as f64).then_some(q as i32)
                })
                .collect();
            let Some(codes) = codes else { continue };
            let g = &mut model.graph;
            let len = bv.len();
            let qn = g.unique_name(&format!("{b}_quantized"));
            g.initializers
                .insert(qn.clone(), Tensor::from_vec(vec![len], codes)?);
            let sn = g.unique_name(&format!("{b}_scale"));
            g.initializers
                .insert(sn.clone(), Tensor::from_vec(vec![len], scales)?);
            let out = g.unique_name(&format!("{b}_dequantized"));
            let dq = Node::new(
                "DequantizeLinear",
                &g.unique_name(&format!("{b}_DequantizeLinear")),
                &[&qn, &sn],
                &[&out],
            )
            .with_attr("axis", smelt_ir::Attr::Int(0));
            g.nodes[c].inputs[2] = out;
            g.nodes.push(dq);
        }
        if model.graph.consumers(b).is_empty() {
            model.graph.initializers.shift_remove(b);
        }
    }
    model.graph.sort()?;
    Ok(crate::compact::CompactQdq.run(model)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_engine::Session;
    use smelt_ir::{Dim, Graph, OpsetImport, ValueInfo};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32 + 1).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn conv_model() -> Model {
        let mut g = Graph::default();
        let dims = |v: &[usize]| v.iter().map(|&d| Dim::Fixed(d)).collect();
        g.inputs
            .push(ValueInfo::new("x", DType::F32, dims(&[1, 2, 6, 6])));
        g.initializers.insert(
            "w".into(),
            Tensor::from_vec(vec![3, 2, 3, 3], values(54, 7)).unwrap(),
        );
        g.initializers
            .insert("b".into(), Tensor::from_vec(vec![3], values(3, 9)).unwrap());
        g.nodes
            .push(Node::new("Conv", "conv", &["x", "w", "b"], &["c"]));
        g.nodes.push(Node::new("Relu", "relu", &["c"], &["y"]));
        g.outputs
            .push(ValueInfo::new("y", DType::F32, dims(&[1, 3, 4, 4])));
        Model {
            ir_version: 8,
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: 13,
            }],
            graph: g,
            ..Default::default()
        }
    }

    fn run(m: &Model, x: &Tensor) -> Vec<f32> {
        let s = Session::reference(m.clone()).unwrap();
        s.run(&[("x", x.clone())]).unwrap()[0]
            .1
            .to_f32_vec()
            .unwrap()
    }

    #[test]
    fn training_form_computes_the_same_and_folds_back_to_the_same_codes() {
        let calib: Vec<smelt_engine::Feed> = (0..4)
            .map(|k| {
                vec![(
                    "x".to_string(),
                    Tensor::from_vec(vec![1, 2, 6, 6], values(72, k)).unwrap(),
                )]
            })
            .collect();
        let (qdq, _) = crate::quantize(
            conv_model(),
            &crate::Options::default(),
            &calib,
            |_, _, _| {},
        )
        .unwrap();
        let (train, form) = to_training(qdq.clone()).unwrap();
        assert_eq!(form.weights, vec!["w".to_string()]);
        assert_eq!(form.biases, vec!["b".to_string()]);
        assert!(train.graph.initializers["w"].dtype() == DType::F32);
        let x = &calib[1][0].1;
        assert_eq!(run(&qdq, x), run(&train, x));
        let back = to_qdq(train, &form).unwrap();
        assert_eq!(run(&back, x), run(&qdq, x));
        let mut a: Vec<_> = back.graph.initializers.iter().collect();
        let mut b: Vec<_> = qdq.graph.initializers.iter().collect();
        a.sort_by_key(|p| p.0);
        b.sort_by_key(|p| p.0);
        assert_eq!(a, b);
    }
}
