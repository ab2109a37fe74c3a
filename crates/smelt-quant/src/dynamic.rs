//! Dynamic quantization: weights are stored in int8, activations are quantized at run time
//! from their own min/max (DynamicQuantizeLinear), and the product runs in integers
//! (MatMulInteger), then is rescaled to float. No calibration data needed.

use crate::manifest::TensorRecord;
use crate::placement::Target;
use crate::qdq::WeightCache;
use crate::scheme::{Granularity, WeightScheme};
use crate::weights::Axes;
use smelt_ir::{Attr, Graph, Node};
use smelt_tensor::{bail, DType, Result, Tensor};

/// Rewrites one MatMul / Gemm target. Returns Err(reason) for a node that must stay float.
pub fn rewrite(
    g: &mut Graph,
    t: &Target,
    scheme: &WeightScheme,
    cache: &mut WeightCache,
    records: &mut Vec<TensorRecord>,
) -> Result<std::result::Result<(), String>> {
    if matches!(scheme.granularity, Granularity::Block(_)) {
        bail!(
            Input,
            "dynamic quantization needs per-tensor or per-channel weights, not blocks"
        );
    }
    if scheme.qtype.bits() != 8 {
        bail!(
            Input,
            "dynamic quantization stores weights in 8 bits (int8 or uint8)"
        );
    }
    let Some(slot) = &t.weight else {
        return Ok(Err(
            "no constant weight (activation x activation product)".into()
        ));
    };
    if t.op == "Gather" {
        // An embedding lookup has no product to run in integers: its table is stored in int8.
        cache.quantize_input(g, t.node, slot.input, scheme, slot.axes, records)?;
        return Ok(Ok(()));
    }
    if t.op != "MatMul" && t.op != "Gemm" {
        return Ok(Err(format!(
            "dynamic {} is not rewritten (integer {} without calibrated ranges is slower than float in common runtimes)",
            t.op, t.op
        )));
    }
    let node = g.nodes[t.node].clone();
    let b_name = node.inputs[slot.input].clone();
    let b = &g.initializers[&b_name];
    if b.rank() != 2 {
        return Ok(Err("weight is not 2-D".into()));
    }
    // MatMulInteger wants B as [K, N]: a transposed Gemm weight is stored transposed once.
    let mut alpha = 1.0f32;
    let mut bias: Option<(String, f32)> = None;
    if t.op == "Gemm" {
        alpha = node.attr_float("alpha")?.unwrap_or(1.0);
        let beta = node.attr_float("beta")?.unwrap_or(1.0);
        if let Some(c) = node.inputs.get(2).filter(|c| !c.is_empty()) {
            bias = Some((c.clone(), beta));
        }
        if slot.transposed {
            let (n, k) = (b.shape()[0], b.shape()[1]);
            let v = b.to_f32_vec()?;
            let mut tr = vec![0.0f32; v.len()];
            for i in 0..n {
                for j in 0..k {
                    tr[j * n + i] = v[i * k + j];
                }
            }
            let name = g.unique_name(&format!("{b_name}_kn"));
            g.initializers
                .insert(name.clone(), Tensor::from_vec(vec![k, n], tr)?);
            g.nodes[t.node].inputs[slot.input] = name;
        }
    }
    let axes = Axes {
        channel_axis: 1,
        reduce_axis: 0,
    };
    let qw = cache.quantize_input(g, t.node, slot.input, scheme, axes, records)?;
    // quantize_input wired a DequantizeLinear; MatMulInteger reads the codes directly.
    let dq_out = g.nodes[t.node].inputs[slot.input].clone();
    let dq = g
        .producer(&dq_out)
        .map(|p| g.nodes[p].clone())
        .ok_or_else(|| smelt_tensor::Error::Invalid("weight DequantizeLinear missing".into()))?;
    let (codes, scale, zp) = (
        dq.inputs[0].clone(),
        dq.inputs[1].clone(),
        dq.inputs[2].clone(),
    );
    let x = node.inputs[0].clone();
    let out = node.outputs[0].clone();
    let base = if node.name.is_empty() {
        out.clone()
    } else {
        node.name.clone()
    };
    let mut taken = Vec::new();
    let (xq, xs, xz, acc, accf, sc, prod) = (
        fresh(g, &mut taken, &base, "x_quantized"),
        fresh(g, &mut taken, &base, "x_scale"),
        fresh(g, &mut taken, &base, "x_zero_point"),
        fresh(g, &mut taken, &base, "int32"),
        fresh(g, &mut taken, &base, "float"),
        fresh(g, &mut taken, &base, "scale"),
        fresh(g, &mut taken, &base, "scaled"),
    );
    let mut alpha_scale = scale.clone();
    if alpha != 1.0 {
        let s: Vec<f32> = g.initializers[&scale]
            .to_f32_vec()?
            .iter()
            .map(|v| v * alpha)
            .collect();
        alpha_scale = g.unique_name(&format!("{scale}_alpha"));
        let shape = g.initializers[&scale].shape().to_vec();
        g.initializers
            .insert(alpha_scale.clone(), Tensor::from_vec(shape, s)?);
    }
    let final_mul_out = if bias.is_some() {
        prod.clone()
    } else {
        out.clone()
    };
    let mut nodes = vec![
        Node::new(
            "DynamicQuantizeLinear",
            &fresh(g, &mut taken, &base, "DynamicQuantizeLinear"),
            &[&x],
            &[&xq, &xs, &xz],
        ),
        Node::new(
            "MatMulInteger",
            &fresh(g, &mut taken, &base, "MatMulInteger"),
            &[&xq, &codes, &xz, &zp],
            &[&acc],
        ),
        Node::new(
            "Cast",
            &fresh(g, &mut taken, &base, "Cast"),
            &[&acc],
            &[&accf],
        )
        .with_attr("to", Attr::Int(DType::F32.onnx_code() as i64)),
        Node::new(
            "Mul",
            &fresh(g, &mut taken, &base, "ScaleMul"),
            &[&xs, &alpha_scale],
            &[&sc],
        ),
        Node::new(
            "Mul",
            &fresh(g, &mut taken, &base, "Rescale"),
            &[&accf, &sc],
            &[&final_mul_out],
        ),
    ];
    if let Some((c, beta)) = bias {
        let mut c_in = c.clone();
        if beta != 1.0 {
            let ct = g.initializers.get(&c).cloned();
            match ct {
                Some(ct) => {
                    let v: Vec<f32> = ct.to_f32_vec()?.iter().map(|v| v * beta).collect();
                    c_in = g.unique_name(&format!("{c}_beta"));
                    g.initializers
                        .insert(c_in.clone(), Tensor::from_vec(ct.shape().to_vec(), v)?);
                }
                None => {
                    let bname = g.unique_name(&format!("{base}_beta"));
                    g.initializers.insert(bname.clone(), Tensor::scalar(beta));
                    c_in = g.unique_name(&format!("{base}_beta_c"));
                    nodes.push(Node::new(
                        "Mul",
                        &fresh(g, &mut taken, &base, "BetaMul"),
                        &[&c, &bname],
                        &[&c_in],
                    ));
                }
            }
        }
        nodes.push(Node::new(
            "Add",
            &fresh(g, &mut taken, &base, "BiasAdd"),
            &[&prod, &c_in],
            &[&out],
        ));
    }
    let _ = qw;
    g.replace_node(t.node, nodes);
    Ok(Ok(()))
}

/// A name unused in the graph and not yet handed out by this rewrite.
fn fresh(g: &Graph, taken: &mut Vec<String>, base: &str, what: &str) -> String {
    let mut k = g.unique_name(&format!("{base}_{what}"));
    while taken.contains(&k) {
        k.push('_');
    }
    taken.push(k.clone());
    k
}
