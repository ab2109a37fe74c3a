//! `compact-qdq`: the quantizer's last pass, which writes a QDQ graph in its smallest exact form.
//!
//! - A Conv weight's all-zero signed zero point goes: ONNX defaults it to 0 in the codes' type.
//!   Only Conv's: onnxruntime (1.32) fuses Gemm into its integer kernel only when the weight's
//!   zero point is written out, and other readers are unverified.
//! - Ops that only pick or move values (MaxPool, Reshape, Flatten, Transpose, Squeeze,
//!   Unsqueeze, Identity) between two quantize-dequantize pairs on one grid run on the 8-bit
//!   codes: `Q -> DQ -> MaxPool -> Q -> DQ` becomes `Q -> MaxPool -> DQ`. Quantization is
//!   monotone, so a maximum or a move gives the same codes either way; the second pair only
//!   re-quantized values already on the grid. Runtimes run these ops on 8-bit data
//!   (onnxruntime rewrites its own graph the same way), and the file loses two nodes a pool.
//!
//! The training form of QAT keeps the float layout (gradients cannot flow through 8-bit
//! ops); its export runs this pass.

use smelt_ir::{Graph, Model, Pass, PassRecord};
use smelt_tensor::{DType, Tensor};

/// Ops whose output holds only values of their first input, in the ONNX opset from which each
/// accepts 8-bit integers.
const VIEWS: &[(&str, i64)] = &[
    ("MaxPool", 12),
    ("Reshape", 1),
    ("Flatten", 1),
    ("Transpose", 1),
    ("Squeeze", 1),
    ("Unsqueeze", 1),
    ("Identity", 1),
];

pub struct CompactQdq;

impl Pass for CompactQdq {
    fn name(&self) -> &'static str {
        "compact-qdq"
    }

    fn run(&self, mut model: Model) -> smelt_tensor::Result<(Model, PassRecord)> {
        let mut rec = PassRecord::new(self.name());
        let opset = model.onnx_opset();
        let g = &mut model.graph;
        // Names are shared with If/Loop/Scan bodies, which this pass does not look into.
        if g.has_subgraphs() {
            rec.note("the graph has control flow: left as written");
            return Ok((model, rec));
        }
        let zps = drop_zero_points(g);
        if zps > 0 {
            rec.note(format!("{zps} all-zero weight zero points dropped"));
        }
        while let Some(chain) = find_view_chain(g, opset) {
            rec.note(format!(
                "{} runs on 8-bit codes",
                chain
                    .iter()
                    .map(|&i| g.nodes[i].label())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            into_codes(g, &chain);
        }
        g.remove_dead();
        Ok((model, rec))
    }
}

fn is_signed_codes(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::I8 | DType::I4 | DType::I2)
}

/// Drops the zero-point input of each DequantizeLinear of constant signed codes whose zero
/// point is a constant of zeros, when only Convs read it. Returns how many.
fn drop_zero_points(g: &mut Graph) -> usize {
    let mut dropped = 0;
    for i in 0..g.nodes.len() {
        let n = &g.nodes[i];
        if !n.domain.is_empty() || n.op_type != "DequantizeLinear" || n.inputs.len() != 3 {
            continue;
        }
        let (Some(codes), Some(z)) = (
            g.initializers.get(&n.inputs[0]),
            g.initializers.get(&n.inputs[2]),
        ) else {
            continue;
        };
        let zero = z.to_i64_vec().is_ok_and(|v| v.iter().all(|&x| x == 0));
        let conv_only = n.outputs.iter().all(|o| {
            g.consumers(o)
                .iter()
                .all(|&c| g.nodes[c].domain.is_empty() && g.nodes[c].op_type == "Conv")
        });
        if is_signed_codes(codes) && z.dtype() == codes.dtype() && zero && conv_only {
            g.nodes[i].inputs.truncate(2);
            dropped += 1;
        }
    }
    dropped
}

/// The scale and zero point of a per-tensor Q or DQ as (scale bits, zero-point type, value).
fn grid(g: &Graph, n: &smelt_ir::Node) -> Option<(u32, DType, i64)> {
    let attr = |k: &str| n.attr_int(k).ok().flatten().unwrap_or(0);
    if attr("block_size") != 0 || attr("output_dtype") != 0 || attr("precision") != 0 {
        return None;
    }
    let s = g.initializers.get(n.inputs.get(1)?)?;
    if s.dtype() != DType::F32 || s.numel() != 1 {
        return None;
    }
    let s = s.as_slice::<f32>().ok()?[0];
    if !(s.is_finite() && s > 0.0) {
        return None;
    }
    let (zt, zv) = match n.inputs.get(2).filter(|z| !z.is_empty()) {
        None => (DType::U8, 0),
        Some(z) => {
            let z = g.initializers.get(z)?;
            if z.numel() != 1 || !matches!(z.dtype(), DType::U8 | DType::I8) {
                return None;
            }
            (z.dtype(), z.to_i64_vec().ok()?[0])
        }
    };
    Some((s.to_bits(), zt, zv))
}

fn only_consumer(g: &Graph, value: &str) -> Option<usize> {
    if g.outputs.iter().any(|o| o.name == value) {
        return None;
    }
    match g.consumers(value)[..] {
        [c] => Some(c),
        _ => None,
    }
}

fn is_op(n: &smelt_ir::Node, op: &str) -> bool {
    n.domain.is_empty() && n.op_type == op
}

/// A chain `[dq, view.., q]`: `dq` reads a QuantizeLinear's codes on the same grid as `q`,
/// and each node's output feeds only the next one.
fn find_view_chain(g: &Graph, opset: i64) -> Option<Vec<usize>> {
    'dq: for (d, dn) in g.nodes.iter().enumerate() {
        if !is_op(dn, "DequantizeLinear") || dn.outputs.len() != 1 {
            continue;
        }
        let Some(q0) = dn.inputs.first().and_then(|x| g.producer(x)) else {
            continue;
        };
        if !is_op(&g.nodes[q0], "QuantizeLinear") {
            continue;
        }
        let Some(want) = grid(g, dn).filter(|gr| grid(g, &g.nodes[q0]) == Some(*gr)) else {
            continue;
        };
        let mut chain = vec![d];
        let mut value = &dn.outputs[0];
        loop {
            let Some(c) = only_consumer(g, value) else {
                continue 'dq;
            };
            let n = &g.nodes[c];
            if is_op(n, "QuantizeLinear") {
                let is_output = g.outputs.iter().any(|o| Some(&o.name) == n.outputs.first());
                if chain.len() == 1 || grid(g, n) != Some(want) || is_output {
                    continue 'dq;
                }
                chain.push(c);
                return Some(chain);
            }
            let is_view = n.domain.is_empty()
                && VIEWS
                    .iter()
                    .any(|(op, from)| n.op_type == *op && opset >= *from);
            // MaxPool's second output (indices) would have no float twin.
            let one_output =
                n.outputs.iter().filter(|o| !o.is_empty()).count() == 1 && !n.outputs[0].is_empty();
            if !is_view || !one_output {
                continue 'dq;
            }
            if n.inputs.first() != Some(value) {
                continue 'dq;
            }
            chain.push(c);
            value = &n.outputs[0];
        }
    }
    None
}

/// Rewires `[dq, view.., q]` so the views read the codes `dq` read, and whatever read `q`'s
/// codes reads the last view's output; `dq` and `q` go.
fn into_codes(g: &mut Graph, chain: &[usize]) {
    let (d, q) = (chain[0], chain[chain.len() - 1]);
    let codes = g.nodes[d].inputs[0].clone();
    let first = chain[1];
    g.nodes[first].inputs[0] = codes;
    let last_out = g.nodes[chain[chain.len() - 2]].outputs[0].clone();
    let q_out = g.nodes[q].outputs[0].clone();
    // The views' outputs change type: their float value_info entries no longer hold.
    let changed: Vec<String> = chain[1..chain.len() - 1]
        .iter()
        .map(|&i| g.nodes[i].outputs[0].clone())
        .collect();
    g.value_info.retain(|v| !changed.contains(&v.name));
    for n in g.nodes.iter_mut() {
        for x in n.inputs.iter_mut().filter(|x| **x == q_out) {
            *x = last_out.clone();
        }
    }
    let (hi, lo) = (d.max(q), d.min(q));
    g.nodes.remove(hi);
    g.nodes.remove(lo);
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_engine::Session;
    use smelt_ir::{Attr, Dim, Node, ValueInfo};

    /// x -> Q -> DQ -> MaxPool -> Reshape -> Q -> DQ -> Mul by a weight behind a DQ with
    /// zero points of zeros, read by a 1x1 Conv.
    fn model() -> Model {
        let nodes = vec![
            Node::new("QuantizeLinear", "q0", &["x", "s", "z"], &["xq"]),
            Node::new("DequantizeLinear", "d0", &["xq", "s", "z"], &["xd"]),
            Node::new("MaxPool", "pool", &["xd"], &["p"])
                .with_attr("kernel_shape", Attr::Ints(vec![2, 2]))
                .with_attr("strides", Attr::Ints(vec![2, 2])),
            Node::new("Reshape", "flat", &["p", "shape"], &["r"]),
            Node::new("QuantizeLinear", "q1", &["r", "s", "z"], &["rq"]),
            Node::new("DequantizeLinear", "d1", &["rq", "s", "z"], &["rd"]),
            Node::new("DequantizeLinear", "dw", &["wq", "ws", "wz"], &["w"])
                .with_attr("axis", Attr::Int(0)),
            Node::new("Conv", "conv", &["rd", "w"], &["y"]),
        ];
        let inits = [
            ("s", Tensor::scalar(0.05f32)),
            ("z", Tensor::scalar(100u8)),
            (
                "shape",
                Tensor::from_vec(vec![4], vec![1i64, 4, 1, 1]).unwrap(),
            ),
            (
                "wq",
                Tensor::from_vec(vec![2, 4, 1, 1], vec![1i8, -2, 3, 127, -128, 5, 0, 9]).unwrap(),
            ),
            ("ws", Tensor::from_vec(vec![2], vec![0.1f32, 0.2]).unwrap()),
            ("wz", Tensor::from_vec(vec![2], vec![0i8; 2]).unwrap()),
        ];
        Model::new(
            smelt_ir::Graph {
                inputs: vec![ValueInfo::new(
                    "x",
                    DType::F32,
                    [1, 1, 4, 4].map(Dim::Fixed).to_vec(),
                )],
                outputs: vec![ValueInfo::new("y", DType::F32, vec![])],
                value_info: vec![ValueInfo::new("p", DType::F32, vec![])],
                initializers: inits.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                nodes,
                ..Default::default()
            },
            13,
        )
    }

    fn run(m: &Model, x: &Tensor) -> Vec<f32> {
        let s = Session::reference(m.clone()).unwrap();
        s.run(&[("x", x.clone())]).unwrap()[0]
            .1
            .to_f32_vec()
            .unwrap()
    }

    #[test]
    fn views_run_on_codes_with_the_same_results() {
        let m = model();
        let (c, rec) = CompactQdq.run(m.clone()).unwrap();
        let ops: Vec<&str> = c.graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            [
                "QuantizeLinear",
                "MaxPool",
                "Reshape",
                "DequantizeLinear",
                "DequantizeLinear",
                "Conv"
            ]
        );
        assert_eq!(c.graph.nodes[1].inputs[0], "xq");
        assert_eq!(c.graph.nodes[3].inputs[0], "r");
        // The weight's zero point went; the activations' u8 one stays.
        assert_eq!(c.graph.nodes[4].inputs, ["wq", "ws"]);
        assert!(!c.graph.initializers.contains_key("wz"));
        assert!(c.graph.value_info.is_empty(), "'p' now holds codes");
        assert_eq!(rec.changes.len(), 2, "{:?}", rec.changes);
        // Values that tie, saturate, go negative and are NaN-free but far out of range.
        let x: Vec<f32> = (0..16)
            .map(|i| (i as f32 - 7.5) * 0.6 + (i % 3) as f32 * 0.025)
            .collect();
        let x = Tensor::from_vec(vec![1, 1, 4, 4], x).unwrap();
        assert_eq!(run(&m, &x), run(&c, &x));
        // A second run finds nothing more to do.
        let (again, rec) = CompactQdq.run(c.clone()).unwrap();
        assert!(rec.changes.is_empty());
        assert_eq!(again.graph.nodes.len(), c.graph.nodes.len());
    }

    #[test]
    fn different_grids_or_shared_values_are_left_alone() {
        let mut m = model();
        m.graph
            .initializers
            .insert("s2".into(), Tensor::scalar(0.07f32));
        m.graph.nodes[4].inputs[1] = "s2".into();
        m.graph.nodes[5].inputs[1] = "s2".into();
        let (c, _) = CompactQdq.run(m).unwrap();
        assert_eq!(
            c.graph.nodes.len(),
            8,
            "another grid: the pair re-quantizes"
        );
        let mut m = model();
        m.graph.nodes[7].op_type = "MatMul".into();
        let (c, _) = CompactQdq.run(m).unwrap();
        assert_eq!(
            c.graph.nodes[4].inputs.len(),
            3,
            "a MatMul weight keeps its zero point"
        );
        let mut m = model();
        m.graph
            .outputs
            .push(ValueInfo::new("p", DType::F32, vec![]));
        let (c, _) = CompactQdq.run(m).unwrap();
        assert!(
            c.graph.nodes.iter().any(|n| n.name == "d0"),
            "'p' is an output"
        );
    }
}
