//! `snap-layernorm`: a quantize-dequantize pair on a LayerNormalization's output is done by the
//! normalization itself, while each row is in cache.
//!
//! In a quantized transformer the Q/K/V (or FFN) projections read a LayerNorm's output through
//! a pair, and the residual Add reads the same dequantized value: after `fuse-qdq` the
//! projections quantize the raw output themselves and a `FakeQuant` remains for the Add (12 of
//! them in MiniLM). When the normalization writes the snapped values instead, the projections
//! quantize them to the same codes (a grid value divided by its scale rounds back to itself)
//! and the `FakeQuant` goes. Runs after `fuse-qdq`.

use super::left_as_written;
use smelt_ir::{Graph, Model, Pass, PassRecord};
use smelt_tensor::Result;

pub struct SnapLayerNorm;

impl Pass for SnapLayerNorm {
    fn name(&self) -> &'static str {
        "snap-layernorm"
    }

    fn run(&self, mut model: Model) -> Result<(Model, PassRecord)> {
        let mut rec = PassRecord::new(self.name());
        if left_as_written(&model, &mut rec) {
            return Ok((model, rec));
        }
        let g = &mut model.graph;
        let mut snapped = 0;
        for i in 0..g.nodes.len() {
            let Some(f) = snappable(g, i) else { continue };
            let (fq_out, grid) = {
                let fq = &g.nodes[f];
                (fq.outputs[0].clone(), fq.inputs[1..].to_vec())
            };
            let y = g.nodes[i].outputs[0].clone();
            for n in g.nodes.iter_mut() {
                for x in n.inputs.iter_mut().filter(|x| **x == fq_out) {
                    x.clone_from(&y);
                }
            }
            let ln = &mut g.nodes[i];
            ln.inputs.resize(3, String::new());
            ln.inputs.extend(grid);
            ln.outputs.truncate(1);
            ln.domain = "ai.smelt".into();
            snapped += 1;
        }
        if snapped > 0 {
            g.remove_dead();
            rec.note(format!(
                "{snapped} LayerNormalization outputs snapped onto their quantization grid"
            ));
        }
        Ok((model, rec))
    }
}

/// When node `i` is a LayerNormalization whose only output in use is read by one `FakeQuant`
/// and otherwise only by fused integer ops quantizing it onto the same grid: that FakeQuant.
fn snappable(g: &Graph, i: usize) -> Option<usize> {
    let n = &g.nodes[i];
    let returned = |v: &str| g.outputs.iter().any(|o| o.name == v);
    if !n.domain.is_empty()
        || n.op_type != "LayerNormalization"
        || n.inputs.len() > 3
        || n.outputs.is_empty()
        || n.outputs[1..]
            .iter()
            .any(|o| !o.is_empty() && (returned(o) || !g.consumers(o).is_empty()))
        || returned(&n.outputs[0])
    {
        return None;
    }
    let y = &n.outputs[0];
    let readers = g.consumers(y);
    let is_fq = |r: usize| {
        let m = &g.nodes[r];
        m.domain == "ai.smelt"
            && m.op_type == "FakeQuant"
            && m.inputs.first() == Some(y)
            && m.outputs.len() == 1
            && !returned(&m.outputs[0])
    };
    let mut fqs = readers.iter().copied().filter(|&r| is_fq(r));
    let f = fqs.next()?;
    if fqs.next().is_some() {
        return None;
    }
    let grid = &g.nodes[f].inputs[1..];
    let same_grid = |r: usize| {
        let m = &g.nodes[r];
        m.domain == "ai.smelt"
            && matches!(m.op_type.as_str(), "QMatMul" | "QConv")
            && m.inputs.first() == Some(y)
            && !m.inputs[1..].contains(y)
            && same_values(g, &m.inputs[1..3.min(m.inputs.len())], grid)
    };
    readers.iter().all(|&r| r == f || same_grid(r)).then_some(f)
}

/// Whether two (scale, zero point?) lists name the same constants or equal ones.
fn same_values(g: &Graph, a: &[String], b: &[String]) -> bool {
    let at = |l: &[String], k: usize| l.get(k).filter(|s| !s.is_empty()).cloned();
    (0..2).all(|k| match (at(a, k), at(b, k)) {
        (None, None) => true,
        (Some(x), Some(y)) => {
            x == y
                || matches!(
                    (g.initializers.get(&x), g.initializers.get(&y)),
                    (Some(p), Some(q)) if p == q
                )
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Session;
    use smelt_ir::{Dim, Node, ValueInfo};
    use smelt_tensor::{DType, Tensor};

    /// `LayerNorm -> Q -> DQ`, read by a quantized MatMul and by a residual Add, as in a
    /// quantized transformer block.
    fn block() -> Model {
        let w: Vec<i8> = (0..16 * 8).map(|i| ((i * 29) % 31) as i8 - 15).collect();
        let g = Graph {
            inputs: vec![ValueInfo::new(
                "x",
                DType::F32,
                [3, 16].map(Dim::Fixed).to_vec(),
            )],
            outputs: vec![
                ValueInfo::new("y", DType::F32, vec![]),
                ValueInfo::new("r", DType::F32, vec![]),
            ],
            nodes: vec![
                Node::new("LayerNormalization", "ln", &["x", "gamma", "beta"], &["n"]),
                Node::new("QuantizeLinear", "q", &["n", "s", "z"], &["nq"]),
                Node::new("DequantizeLinear", "dq", &["nq", "s", "z"], &["nd"]),
                Node::new("DequantizeLinear", "dw", &["wq", "ws"], &["w"]),
                Node::new("MatMul", "mm", &["nd", "w"], &["y"]),
                Node::new("Add", "residual", &["nd", "x"], &["r"]),
            ],
            initializers: [
                (
                    "gamma",
                    Tensor::from_vec(vec![16], (0..16).map(|i| 0.5 + i as f32 * 0.1).collect())
                        .unwrap(),
                ),
                (
                    "beta",
                    Tensor::from_vec(vec![16], (0..16).map(|i| i as f32 * 0.05 - 0.3).collect())
                        .unwrap(),
                ),
                ("s", Tensor::scalar(0.031f32)),
                ("z", Tensor::scalar(5u8)),
                ("wq", Tensor::from_vec(vec![16, 8], w).unwrap()),
                ("ws", Tensor::scalar(0.02f32)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            ..Default::default()
        };
        Model::new(g, 17)
    }

    #[test]
    fn the_norm_snaps_and_the_pair_goes() {
        let m = block();
        let fused = crate::passes::FuseQdq {
            may_saturate: false,
        }
        .run(m.clone())
        .unwrap()
        .0;
        assert!(fused.graph.nodes.iter().any(|n| n.op_type == "FakeQuant"));
        let (snapped, _) = SnapLayerNorm.run(fused).unwrap();
        let ops: Vec<_> = snapped
            .graph
            .nodes
            .iter()
            .map(|n| n.op_type.as_str())
            .collect();
        assert_eq!(ops, ["LayerNormalization", "QMatMul", "Add"]);
        let x: Vec<f32> = (0..48)
            .map(|i| ((i * 13) % 17) as f32 * 0.4 - 3.0)
            .collect();
        let ins = [("x", Tensor::from_vec(vec![3, 16], x).unwrap())];
        let want = Session::reference(m.clone()).unwrap().run(&ins).unwrap();
        let got = Session::new(m).unwrap().run(&ins).unwrap();
        for ((_, w), (_, g)) in want.iter().zip(&got) {
            for (a, b) in w
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .zip(g.as_slice::<f32>().unwrap())
            {
                assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
            }
        }
    }
}
