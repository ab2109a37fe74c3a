//! `fuse-softmax`: attention's softmax and the elementwise passes around it become one
//! `ai.smelt.Softmax`.
//!
//! Exported transformers write `Where(IsNaN(p), 0, p)` with `p = Softmax(scores + mask)` (a
//! fully masked row gives NaN), and a quantized model follows it with a quantize-dequantize
//! pair (a `FakeQuant` once `fuse-qdq` ran). Each is a pass over the widest tensor of the model:
//! on MiniLM at batch 32, 6.3M floats per layer. Fused, the mask is added, the row normalised,
//! NaN zeroed and the result snapped while the row is in cache. Runs after `fuse-qdq`.
//!
//! Values another node reads, or the graph returns, stay as they are.

use super::{left_as_written, private, scalar};
use smelt_ir::{Attr, Graph, Model, Node, Pass, PassRecord};
use smelt_tensor::Result;

pub struct FuseSoftmax;

impl Pass for FuseSoftmax {
    fn name(&self) -> &'static str {
        "fuse-softmax"
    }

    fn run(&self, mut model: Model) -> Result<(Model, PassRecord)> {
        let mut rec = PassRecord::new(self.name());
        if left_as_written(&model, &mut rec) {
            return Ok((model, rec));
        }
        let g = &mut model.graph;
        let (mut fused, mut masks, mut nans, mut grids) = (0, 0, 0, 0);
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            if !n.domain.is_empty()
                || n.op_type != "Softmax"
                || n.inputs.len() != 1
                || n.outputs.len() != 1
            {
                continue;
            }
            let mut inputs = vec![n.inputs[0].clone(), String::new()];
            if let Some(add) = private(g, &n.inputs[0], "Add", i) {
                if add.inputs.len() == 2 {
                    inputs = add.inputs.clone();
                    masks += 1;
                }
            }
            // The node the fused op replaces: the last of the chain, so that everything
            // before it dies.
            let (mut last, mut out) = (i, n.outputs[0].clone());
            let mut nan_to_zero = false;
            if let Some(w) = nan_zeroed(g, &out) {
                (last, out) = (w, g.nodes[w].outputs[0].clone());
                nan_to_zero = true;
                nans += 1;
            }
            if let Some(f) = fake_quant_of(g, &out) {
                let fq = &g.nodes[f];
                inputs.extend(fq.inputs[1..].iter().cloned());
                (last, out) = (f, fq.outputs[0].clone());
                grids += 1;
            }
            if inputs[1].is_empty() && last == i {
                continue;
            }
            let ins: Vec<&str> = inputs.iter().map(String::as_str).collect();
            let mut node = Node::new("Softmax", &n.name, &ins, &[out.as_str()]);
            node.domain = "ai.smelt".into();
            node.attrs = n.attrs.clone();
            node.attrs
                .insert("nan_to_zero".into(), Attr::Int(nan_to_zero as i64));
            g.nodes[last] = node;
            fused += 1;
        }
        if fused > 0 {
            // remove_dead walks the nodes backwards: they must be in order.
            g.sort()?;
            g.remove_dead();
            rec.note(format!(
                "{fused} softmaxes fused with {masks} mask Adds, {nans} NaN replacements and \
                 {grids} quantize-dequantize pairs"
            ));
        }
        Ok((model, rec))
    }
}

/// `Where(IsNaN(p), 0, p)`, when that is all that reads `p`: the Where node.
fn nan_zeroed(g: &Graph, p: &str) -> Option<usize> {
    let returned = |v: &str| g.outputs.iter().any(|o| o.name == v);
    if returned(p) {
        return None;
    }
    let readers = g.consumers(p);
    let [a, b] = readers[..] else { return None };
    let (isnan, w) = if g.nodes[a].op_type == "IsNaN" {
        (a, b)
    } else {
        (b, a)
    };
    let (i, wn) = (&g.nodes[isnan], &g.nodes[w]);
    let ok = i.domain.is_empty()
        && i.op_type == "IsNaN"
        && i.inputs == [p]
        && i.outputs.len() == 1
        && g.consumers(&i.outputs[0]) == [w]
        && !returned(&i.outputs[0])
        && wn.domain.is_empty()
        && wn.op_type == "Where"
        && wn.outputs.len() == 1
        && wn.inputs.len() == 3
        && wn.inputs[0] == i.outputs[0]
        && wn.inputs[2] == p
        // +0 exactly: the kernel writes +0 for NaN.
        && scalar(g, &wn.inputs[1]).map(f32::to_bits) == Some(0);
    ok.then_some(w)
}

/// The engine's `FakeQuant` of `v`, when it is all that reads `v`.
fn fake_quant_of(g: &Graph, v: &str) -> Option<usize> {
    if g.outputs.iter().any(|o| o.name == v) {
        return None;
    }
    let [f] = g.consumers(v)[..] else {
        return None;
    };
    let n = &g.nodes[f];
    (n.domain == "ai.smelt"
        && n.op_type == "FakeQuant"
        && n.inputs.first().is_some_and(|x| x == v)
        && n.inputs.len() >= 2
        && n.outputs.len() == 1)
        .then_some(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Session;
    use smelt_ir::{Dim, ValueInfo};
    use smelt_tensor::{DType, Tensor};

    /// `Where(IsNaN(Softmax(s + mask)), 0, .)` then a quantize-dequantize pair, as a quantized
    /// MiniLM writes attention; the mask has fully masked rows (all -inf), which give NaN.
    fn attention_tail(quantized: bool) -> Model {
        let mut g = Graph {
            inputs: vec![
                ValueInfo::new("s", DType::F32, [2, 3, 4, 20].map(Dim::Fixed).to_vec()),
                ValueInfo::new("mask", DType::F32, [2, 1, 4, 20].map(Dim::Fixed).to_vec()),
            ],
            ..Default::default()
        };
        g.nodes = vec![
            Node::new("Add", "add", &["s", "mask"], &["a"]),
            Node::new("Softmax", "sm", &["a"], &["p"]).with_attr("axis", Attr::Int(-1)),
            Node::new("IsNaN", "isnan", &["p"], &["n"]),
            Node::new("Where", "where", &["n", "zero", "p"], &["w"]),
        ];
        g.initializers.insert("zero".into(), Tensor::scalar(0f32));
        let mut out = "w";
        if quantized {
            g.nodes.push(Node::new(
                "QuantizeLinear",
                "q",
                &["w", "sc", "zp"],
                &["wq"],
            ));
            g.nodes.push(Node::new(
                "DequantizeLinear",
                "dq",
                &["wq", "sc", "zp"],
                &["y"],
            ));
            g.initializers
                .insert("sc".into(), Tensor::scalar(1f32 / 255.0));
            g.initializers.insert("zp".into(), Tensor::scalar(0u8));
            out = "y";
        }
        g.outputs = vec![ValueInfo::new(out, DType::F32, vec![])];
        Model::new(g, 13)
    }

    fn inputs() -> Vec<(&'static str, Tensor)> {
        let s: Vec<f32> = (0..2 * 3 * 4 * 20)
            .map(|i| ((i * 37) % 41) as f32 * 0.31 - 6.0)
            .collect();
        // Batch 1, query row 2 is fully masked; elsewhere every third key is.
        let mask: Vec<f32> = (0..2 * 4 * 20)
            .map(|i| {
                let (b, q, k) = (i / 80, (i / 20) % 4, i % 20);
                if (b == 1 && q == 2) || k % 3 == 0 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        vec![
            ("s", Tensor::from_vec(vec![2, 3, 4, 20], s).unwrap()),
            ("mask", Tensor::from_vec(vec![2, 1, 4, 20], mask).unwrap()),
        ]
    }

    #[test]
    fn fused_softmax_equals_the_ops_it_replaces() {
        for quantized in [false, true] {
            let model = attention_tail(quantized);
            let model_copy = model.clone();
            let (fused, rec) = FuseSoftmax
                .run(
                    crate::passes::FuseQdq::default()
                        .run(model.clone())
                        .unwrap()
                        .0,
                )
                .unwrap();
            assert_eq!(fused.graph.nodes.len(), 1, "{:?}", rec);
            assert_eq!(fused.graph.nodes[0].op_type, "Softmax");
            assert_eq!(fused.graph.nodes[0].domain, "ai.smelt");
            let want = Session::reference(model).unwrap().run(&inputs()).unwrap();
            // The session runs the same passes.
            let got = Session::new(model_copy).unwrap().run(&inputs()).unwrap();
            let (w, g) = (
                want[0].1.as_slice::<f32>().unwrap(),
                got[0].1.as_slice::<f32>().unwrap(),
            );
            assert!(w.contains(&0.0) && !g.iter().any(|v| v.is_nan()));
            for (i, (a, b)) in w.iter().zip(g).enumerate() {
                // Quantized, both are on the grid: a rounding-boundary tie may move one step.
                let tol = if quantized { 1.0 / 255.0 + 1e-6 } else { 1e-6 };
                assert!((a - b).abs() <= tol, "at {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_mask_that_does_not_broadcast_by_rows_takes_the_general_path() {
        // The mask varies along the softmax axis only through a size-1 last dimension.
        let mut model = attention_tail(false);
        model.graph.inputs[1] =
            ValueInfo::new("mask", DType::F32, [2, 1, 4, 1].map(Dim::Fixed).to_vec());
        let (fused, _) = FuseSoftmax.run(model.clone()).unwrap();
        assert_eq!(fused.graph.nodes.len(), 1);
        let mut ins = inputs();
        ins[1].1 = Tensor::from_vec(
            vec![2, 1, 4, 1],
            vec![0.5f32, -1.0, 2.0, 0.0, 1.0, 1.0, 3.0, -2.0],
        )
        .unwrap();
        let want = Session::reference(model.clone())
            .unwrap()
            .run(&ins)
            .unwrap();
        let got = Session::new(model.clone()).unwrap().run(&ins).unwrap();
        assert_eq!(want[0].1.shape(), got[0].1.shape());
        for (a, b) in want[0]
            .1
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .zip(got[0].1.as_slice::<f32>().unwrap())
        {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
    }
}
