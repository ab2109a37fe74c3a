//! `fuse-conv-relu`: a float `Conv` (after its bias `Add` is folded in by `fuse-bias`) followed
//! by a `Relu` becomes one `ai.smelt.ConvRelu`, which clamps each output block while it is
//! still in cache. Kept apart, the Add and the Relu each read and write the whole activation:
//! on MNIST-8 at batch 32 they took a quarter of the float run.
//!
//! Exact: the bias is added to the same f32 sums, and max(0, v) is applied to the same values.
//! A Conv output that another node reads, or that the graph returns, is left alone.

use super::{left_as_written, private};
use smelt_ir::passes::FuseBias;
use smelt_ir::{Attr, Graph, Model, Node, Pass, PassRecord};
use smelt_tensor::Result;

/// A bias value and the shape it had when fused.
type Bias = (String, Vec<i64>);

/// `Add(Conv(x, w), b)` read only by node `reader`, the Conv without a bias of its own and `b`
/// an initializer that broadcasts along the channel axis only (`[M, 1, 1]`, `[1, M, 1, 1]`):
/// the Conv and `b` with its shape. `fuse-bias` takes only true constants; this also takes an
/// initializer that IR < 4 files list as an input (MNIST-8), which a caller may override: the
/// fused op reads it at run time and checks it still has this shape.
fn bias_add<'a>(g: &'a Graph, value: &str, reader: usize) -> Option<(&'a Node, Bias)> {
    let add = private(g, value, "Add", reader)?;
    let at = g.producer(value)?;
    (0..2).find_map(|k| {
        let conv = private(g, &add.inputs[k], "Conv", at)?;
        let b = &add.inputs[1 - k];
        let (t, w) = (
            g.initializers.get(b)?,
            g.initializers.get(conv.inputs.get(1)?)?,
        );
        if conv.inputs.get(2).is_some_and(|s| !s.is_empty()) || w.rank() < 3 {
            return None;
        }
        // Right-aligned against [N, M, spatial...]: every dim 1 but the channel one.
        let (rank, dims) = (w.rank(), t.shape());
        let channel = dims.len().checked_sub(rank - 1)?;
        let ok = dims.len() < rank + 1
            && dims[channel] == w.shape()[0]
            && dims
                .iter()
                .enumerate()
                .all(|(d, &n)| d == channel || n == 1);
        ok.then(|| {
            let shape = dims.iter().map(|&n| n as i64).collect();
            (conv, (b.clone(), shape))
        })
    })
}

pub struct FuseConvRelu;

impl Pass for FuseConvRelu {
    fn name(&self) -> &'static str {
        "fuse-conv-relu"
    }

    fn run(&self, model: Model) -> Result<(Model, PassRecord)> {
        let mut rec = PassRecord::new(self.name());
        if left_as_written(&model, &mut rec) {
            return Ok((model, rec));
        }
        let (mut model, biases) = FuseBias.run(model)?;
        rec.changes.extend(biases.changes);
        let g = &mut model.graph;
        let mut fused = 0;
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            if !n.domain.is_empty() || n.op_type != "Relu" || n.inputs.len() != 1 {
                continue;
            }
            let (conv, bias) = match private(g, &n.inputs[0], "Conv", i) {
                Some(conv) => (conv, None),
                None => match bias_add(g, &n.inputs[0], i) {
                    Some((conv, bias)) => (conv, Some(bias)),
                    None => continue,
                },
            };
            let mut fusedn = conv.clone();
            fusedn.op_type = "ConvRelu".into();
            fusedn.domain = "ai.smelt".into();
            fusedn.outputs = n.outputs.clone();
            if let Some((b, shape)) = bias {
                fusedn.inputs.resize(2, String::new());
                fusedn.inputs.push(b);
                fusedn = fusedn.with_attr("bias_shape", Attr::Ints(shape));
            }
            // The Conv (and Add) now feed nothing: `remove_dead` below drops them.
            g.nodes[i] = fusedn;
            fused += 1;
        }
        if fused > 0 {
            g.remove_dead();
            rec.note(format!(
                "{fused} Conv (+ bias Add) + Relu chains became ConvRelu nodes"
            ));
        }
        Ok((model, rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Session;
    use smelt_ir::{Dim, Graph, OpsetImport, ValueInfo};
    use smelt_tensor::{DType, Tensor};

    /// Conv (16 channels: the direct kernel where the CPU has it; 8: the GEMM) -> Add(bias)
    /// -> Relu, the way MNIST-8 is written.
    fn model(out_ch: usize, share: bool, listed: bool) -> Model {
        let mut g = Graph::default();
        let x = |n: usize| vec![Dim::Fixed(2), Dim::Fixed(n), Dim::Fixed(9), Dim::Fixed(9)];
        g.inputs.push(ValueInfo::new("x", DType::F32, x(3)));
        g.outputs.push(ValueInfo::new("y", DType::F32, x(out_ch)));
        if share {
            g.outputs.push(ValueInfo::new("c", DType::F32, x(out_ch)));
        }
        let w: Vec<f32> = (0..out_ch * 3 * 9)
            .map(|i| ((i * 37) % 23) as f32 / 11.0 - 1.0)
            .collect();
        g.initializers.insert(
            "w".into(),
            Tensor::from_vec(vec![out_ch, 3, 3, 3], w).unwrap(),
        );
        let b: Vec<f32> = (0..out_ch).map(|i| i as f32 * 0.3 - 1.2).collect();
        g.initializers
            .insert("b".into(), Tensor::from_vec(vec![out_ch, 1, 1], b).unwrap());
        if listed {
            // As IR < 4 files write it: an initializer that is also an (overridable) input,
            // which `fuse-bias` leaves alone and this pass takes with its shape.
            let dims = vec![Dim::Fixed(out_ch), Dim::Fixed(1), Dim::Fixed(1)];
            g.inputs.push(ValueInfo::new("b", DType::F32, dims));
        }
        g.nodes.push(
            Node::new("Conv", "conv", &["x", "w"], &["c"])
                .with_attr("pads", Attr::Ints(vec![1; 4])),
        );
        g.nodes.push(Node::new("Add", "add", &["c", "b"], &["a"]));
        g.nodes.push(Node::new("Relu", "relu", &["a"], &["y"]));
        Model {
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: 13,
            }],
            graph: g,
            ..Default::default()
        }
    }

    #[test]
    fn conv_bias_relu_fuse_and_compute_the_same() {
        let x: Vec<f32> = (0..2 * 3 * 81)
            .map(|i| ((i * 53) % 29) as f32 / 7.0 - 2.0)
            .collect();
        let x = Tensor::from_vec(vec![2, 3, 9, 9], x).unwrap();
        for (out_ch, listed) in [(8, false), (16, false), (16, true)] {
            let m = model(out_ch, false, listed);
            let (fused, _) = FuseConvRelu.run(m.clone()).unwrap();
            let ops: Vec<&str> = fused
                .graph
                .nodes
                .iter()
                .map(|n| n.op_type.as_str())
                .collect();
            assert_eq!(ops, ["ConvRelu"]);
            assert_eq!(
                fused.graph.nodes[0].inputs.len(),
                3,
                "the bias joined the Conv"
            );
            let want = Session::reference(m.clone())
                .unwrap()
                .run(&[("x", x.clone())]);
            let got = Session::new(m).unwrap().run(&[("x", x.clone())]);
            let (want, got) = (want.unwrap(), got.unwrap());
            let (w, g) = (
                want[0].1.as_slice::<f32>().unwrap(),
                got[0].1.as_slice::<f32>().unwrap(),
            );
            assert!(w.contains(&0.0) && w.iter().any(|&v| v > 0.0));
            let attr = fused.graph.nodes[0].attr_ints("bias_shape").unwrap();
            assert_eq!(attr.is_some(), listed);
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{out_ch}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn a_conv_output_read_elsewhere_is_left_alone() {
        let (fused, _) = FuseConvRelu.run(model(8, true, false)).unwrap();
        let ops: Vec<&str> = fused
            .graph
            .nodes
            .iter()
            .map(|n| n.op_type.as_str())
            .collect();
        assert_eq!(ops, ["Conv", "Add", "Relu"]);
    }
}
