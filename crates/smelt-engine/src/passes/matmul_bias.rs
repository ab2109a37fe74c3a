//! `fuse-matmul-bias`: `Add(MatMul(x, W), b)`, with `W` a 2-D float initializer and `b` a 1-D
//! one of W's width, becomes one `ai.smelt.MatMulBias`: the output rows start as copies of
//! the bias and the GEMM adds the product to them. Apart, the Add reads and writes the whole
//! product again: MiniLM's 36 bias Adds took about 6% of its float run at batch 32, and the
//! fused run is about that much faster. (rten-gemm's own bias option, added per output tile
//! after the first block of the reduction, made the run 9% slower instead.)
//!
//! Equal up to f32 rounding: where the GEMM splits a long reduction into blocks, the bias
//! joins the sum before the later blocks instead of after all of them. A product that
//! another node reads, or that the graph returns, is left alone.

use super::{left_as_written, private};
use smelt_ir::{Graph, Model, Node, Pass, PassRecord};
use smelt_tensor::{DType, Result};

/// The MatMul and bias behind `Add` node `at`, if they fit.
fn matmul_and_bias(g: &Graph, at: usize) -> Option<(&Node, String)> {
    let add = &g.nodes[at];
    if !add.domain.is_empty() || add.op_type != "Add" || add.inputs.len() != 2 {
        return None;
    }
    (0..2).find_map(|k| {
        let mm = private(g, &add.inputs[k], "MatMul", at)?;
        let (b, w) = (&add.inputs[1 - k], g.initializers.get(mm.inputs.get(1)?)?);
        let bias = g.initializers.get(b)?;
        let f32s = w.dtype() == DType::F32 && bias.dtype() == DType::F32;
        let fits = w.rank() == 2 && bias.shape() == [w.shape()[1]];
        (f32s && fits).then(|| (mm, b.clone()))
    })
}

pub struct FuseMatMulBias;

impl Pass for FuseMatMulBias {
    fn name(&self) -> &'static str {
        "fuse-matmul-bias"
    }

    fn run(&self, mut model: Model) -> Result<(Model, PassRecord)> {
        let mut rec = PassRecord::new(self.name());
        if left_as_written(&model, &mut rec) {
            return Ok((model, rec));
        }
        let g = &mut model.graph;
        let mut fused = 0;
        for i in 0..g.nodes.len() {
            let Some((mm, bias)) = matmul_and_bias(g, i) else {
                continue;
            };
            let mut node = mm.clone();
            node.op_type = "MatMulBias".into();
            node.domain = "ai.smelt".into();
            node.inputs.push(bias);
            node.outputs = g.nodes[i].outputs.clone();
            // The MatMul now feeds nothing: `remove_dead` below drops it.
            g.nodes[i] = node;
            fused += 1;
        }
        if fused > 0 {
            g.remove_dead();
            rec.note(format!(
                "{fused} MatMul + bias Add pairs became MatMulBias nodes"
            ));
        }
        Ok((model, rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Session;
    use smelt_ir::{Dim, ValueInfo};
    use smelt_tensor::Tensor;

    /// Long enough for the GEMM to split the reduction into blocks.
    const K: usize = 1500;

    /// `x [2, 5, K] @ w [K, 7] + b [7]` (bias first when `swap`), with the product also
    /// returned when `share`; the bias listed as an input when `listed` (IR < 4 style).
    fn model(swap: bool, share: bool, listed: bool) -> Model {
        let mut g = Graph::default();
        let dims = |d: &[usize]| d.iter().map(|&v| Dim::Fixed(v)).collect::<Vec<_>>();
        g.inputs
            .push(ValueInfo::new("x", DType::F32, dims(&[2, 5, K])));
        if listed {
            // Any width, so a wrong one reaches the op.
            let any = vec![Dim::Sym("n".into())];
            g.inputs.push(ValueInfo::new("b", DType::F32, any));
        }
        g.outputs
            .push(ValueInfo::new("y", DType::F32, dims(&[2, 5, 7])));
        if share {
            g.outputs
                .push(ValueInfo::new("p", DType::F32, dims(&[2, 5, 7])));
        }
        let w = (0..K * 7)
            .map(|i| ((i * 29) % 17) as f32 / 7.0 - 1.1)
            .collect();
        g.initializers
            .insert("w".into(), Tensor::from_vec(vec![K, 7], w).unwrap());
        let b = (0..7).map(|i| i as f32 * 0.37 - 1.3).collect();
        g.initializers
            .insert("b".into(), Tensor::from_vec(vec![7], b).unwrap());
        g.nodes.push(Node::new("MatMul", "mm", &["x", "w"], &["p"]));
        let ins: &[&str] = if swap { &["b", "p"] } else { &["p", "b"] };
        g.nodes.push(Node::new("Add", "add", ins, &["y"]));
        Model::new(g, 17)
    }

    fn input() -> Tensor {
        let v = (0..10 * K)
            .map(|i| ((i * 13) % 11) as f32 * 0.21 - 1.0)
            .collect();
        Tensor::from_vec(vec![2, 5, K], v).unwrap()
    }

    #[test]
    fn fuses_either_operand_order_and_matches_the_unfused_graph() {
        for swap in [false, true] {
            let m = model(swap, false, false);
            let (f, rec) = FuseMatMulBias.run(m.clone()).unwrap();
            let ops: Vec<&str> = f.graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
            assert_eq!(ops, ["MatMulBias"], "{:?}", rec.changes);
            let run = |s: Session| s.run(&[("x", input())]).unwrap()[0].1.clone();
            let want = run(Session::reference(m.clone()).unwrap());
            let got = run(Session::new(m).unwrap());
            let (w, g) = (
                want.as_slice::<f32>().unwrap(),
                got.as_slice::<f32>().unwrap(),
            );
            assert_eq!(want.shape(), got.shape());
            // Sums of 1500 products of magnitude ~1: within a few of their ulps.
            let close = w.iter().zip(g).all(|(a, b)| (a - b).abs() <= 1e-4);
            assert!(close, "{w:?} {g:?}");
        }
    }

    #[test]
    fn a_returned_product_is_left_alone_and_a_listed_bias_is_checked_when_fed() {
        let (f, _) = FuseMatMulBias.run(model(false, true, false)).unwrap();
        assert!(f.graph.nodes.iter().all(|n| n.op_type != "MatMulBias"));
        // A bias an IR < 4 file lists as an input may be fed: a different width is refused.
        let s = Session::new(model(false, false, true)).unwrap();
        let b = Tensor::from_vec(vec![7], vec![1.0f32; 7]).unwrap();
        let y = s.run(&[("x", input()), ("b", b)]).unwrap();
        let p = Session::reference(model(false, true, false)).unwrap();
        let p = p.run(&[("x", input())]).unwrap()[1].1.clone();
        let (y, p) = (
            y[0].1.as_slice::<f32>().unwrap(),
            p.as_slice::<f32>().unwrap(),
        );
        let plus_one = y.iter().zip(p).all(|(y, p)| (y - (p + 1.0)).abs() <= 1e-4);
        assert!(plus_one);
        let wide = Tensor::from_vec(vec![8], vec![0.0f32; 8]).unwrap();
        let err = s
            .run(&[("x", input()), ("b", wide)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bias"), "{err}");
    }
}
