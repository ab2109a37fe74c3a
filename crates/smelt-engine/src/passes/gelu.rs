//! `fuse-gelu`: the exact GELU written out as ops, `0.5 * x * (1 + Erf(x / sqrt 2))` (how
//! PyTorch exports `nn.GELU` below opset 20), becomes one `Gelu` node.
//!
//! Five elementwise passes over an FFN's widest activation become one: on MiniLM at batch 32
//! the Div, Erf, Add and two Muls read and write 6.3M floats each, six times per run. The
//! accepted forms are `Mul(Mul(x, 0.5), Add(Erf(x / c), 1))`, `Mul(x, Mul(0.5, Add(..)))` and
//! `Mul(Mul(x, Add(..)), 0.5)`, either operand order, with the division by sqrt 2 also written as a product with 1/sqrt 2.
//! Values any other node reads, or that the graph returns, are left alone.

use super::{left_as_written, private, scalar};
use smelt_ir::{Graph, Model, Node, Pass, PassRecord};
use smelt_tensor::Result;

pub struct FuseGelu;

impl Pass for FuseGelu {
    fn name(&self) -> &'static str {
        "fuse-gelu"
    }

    fn run(&self, mut model: Model) -> Result<(Model, PassRecord)> {
        let mut rec = PassRecord::new(self.name());
        if left_as_written(&model, &mut rec) {
            return Ok((model, rec));
        }
        let g = &mut model.graph;
        let mut fused = 0;
        for i in 0..g.nodes.len() {
            if let Some((x, y)) = gelu_at(g, i) {
                let name = g.nodes[i].name.clone();
                g.nodes[i] = Node::new("Gelu", &name, &[x.as_str()], &[y.as_str()]);
                fused += 1;
            }
        }
        if fused > 0 {
            // remove_dead walks the nodes backwards: they must be in order.
            g.sort()?;
            g.remove_dead();
            rec.note(format!("{fused} GELU subgraphs became Gelu nodes"));
        }
        Ok((model, rec))
    }
}

/// Of a binary node's two inputs, the one that is the constant `c` (within `tol`), and the
/// other.
fn split_const<'a>(g: &Graph, n: &'a Node, c: f32, tol: f32) -> Option<&'a str> {
    let [a, b] = n.inputs.as_slice() else {
        return None;
    };
    let near = |v: &str| scalar(g, v).is_some_and(|s| (s - c).abs() <= tol);
    if near(b) {
        Some(a)
    } else if near(a) {
        Some(b)
    } else {
        None
    }
}

/// `1 + Erf(x / sqrt 2)` produced privately for `reader`: returns `x`.
fn one_plus_erf(g: &Graph, value: &str, reader: usize) -> Option<String> {
    let add = private(g, value, "Add", reader)?;
    let ai = g.producer(value)?;
    let e = split_const(g, add, 1.0, 0.0)?;
    let erf = private(g, e, "Erf", ai)?;
    let ei = g.producer(e)?;
    let arg = erf.inputs.first()?;
    let scaled = g.producer(arg)?;
    let s = &g.nodes[scaled];
    if g.consumers(arg) != [ei] || g.outputs.iter().any(|o| &o.name == arg) || !s.domain.is_empty()
    {
        return None;
    }
    let x = match s.op_type.as_str() {
        "Div"
            if s.inputs.len() == 2
                && scalar(g, &s.inputs[1])
                    .is_some_and(|c| (c - std::f32::consts::SQRT_2).abs() < 1e-4) =>
        {
            &s.inputs[0]
        }
        "Mul" => split_const(g, s, std::f32::consts::FRAC_1_SQRT_2, 1e-4)?,
        _ => return None,
    };
    Some(x.to_string())
}

/// Whether node `i` is the last Mul of a GELU: returns (x, output).
fn gelu_at(g: &Graph, i: usize) -> Option<(String, String)> {
    let n = &g.nodes[i];
    if !n.domain.is_empty() || n.op_type != "Mul" || n.inputs.len() != 2 || n.outputs.len() != 1 {
        return None;
    }
    let out = n.outputs[0].clone();
    // Form 1: Mul(Mul(x, 0.5), 1 + erf) in either order.
    for (half, rest) in [(0, 1), (1, 0)] {
        let Some(h) = private(g, &n.inputs[half], "Mul", i) else {
            continue;
        };
        let Some(x) = split_const(g, h, 0.5, 0.0) else {
            continue;
        };
        if let Some(xe) = one_plus_erf(g, &n.inputs[rest], i) {
            if xe == x {
                return Some((xe, out));
            }
        }
    }
    // Form 3: Mul(x, Mul(0.5, 1 + erf)) in either order (torch.onnx's dynamo exporter).
    for (xs, rest) in [(0, 1), (1, 0)] {
        let Some(m) = private(g, &n.inputs[rest], "Mul", i) else {
            continue;
        };
        let (Some(mi), Some(e)) = (g.producer(&n.inputs[rest]), split_const(g, m, 0.5, 0.0)) else {
            continue;
        };
        if one_plus_erf(g, e, mi).is_some_and(|xe| xe == n.inputs[xs]) {
            return Some((n.inputs[xs].clone(), out));
        }
    }
    // Form 2: Mul(Mul(x, 1 + erf), 0.5).
    let inner = split_const(g, n, 0.5, 0.0)?;
    let m = private(g, inner, "Mul", i)?;
    let mi = g.producer(inner)?;
    for (xs, rest) in [(0, 1), (1, 0)] {
        if let Some(xe) = one_plus_erf(g, &m.inputs[rest], mi) {
            if xe == m.inputs[xs] {
                return Some((xe, out));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Session;
    use smelt_ir::{Dim, Graph, OpsetImport, ValueInfo};
    use smelt_tensor::{DType, Tensor};

    fn graph(form: u8) -> Model {
        let mut g = Graph::default();
        g.inputs
            .push(ValueInfo::new("x", DType::F32, vec![Dim::Fixed(7)]));
        g.outputs
            .push(ValueInfo::new("y", DType::F32, vec![Dim::Fixed(7)]));
        for (k, v) in [("c", std::f32::consts::SQRT_2), ("one", 1.0), ("half", 0.5)] {
            g.initializers.insert(k.into(), Tensor::scalar(v));
        }
        g.nodes.push(Node::new("Div", "d", &["x", "c"], &["a"]));
        g.nodes.push(Node::new("Erf", "e", &["a"], &["b"]));
        g.nodes.push(Node::new("Add", "p", &["b", "one"], &["c1"]));
        if form == 1 {
            g.nodes.push(Node::new("Mul", "h", &["half", "x"], &["h1"]));
            g.nodes.push(Node::new("Mul", "m", &["h1", "c1"], &["y"]));
        } else if form == 3 {
            g.nodes
                .push(Node::new("Mul", "h", &["half", "c1"], &["h1"]));
            g.nodes.push(Node::new("Mul", "m", &["x", "h1"], &["y"]));
        } else {
            g.nodes.push(Node::new("Mul", "h", &["x", "c1"], &["h1"]));
            g.nodes.push(Node::new("Mul", "m", &["h1", "half"], &["y"]));
        }
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
    fn both_forms_fuse_and_compute_the_same() {
        let x = Tensor::from_vec(vec![7], vec![-4.0f32, -1.5, -0.3, 0.0, 0.2, 1.0, 3.5]).unwrap();
        for form in [1, 2, 3] {
            let m = graph(form);
            let want = Session::reference(m.clone())
                .unwrap()
                .run(&[("x", x.clone())])
                .unwrap();
            let (fused, _) = FuseGelu.run(m).unwrap();
            assert_eq!(fused.graph.nodes.len(), 1, "form {form}");
            assert_eq!(fused.graph.nodes[0].op_type, "Gelu");
            let got = Session::reference(fused)
                .unwrap()
                .run(&[("x", x.clone())])
                .unwrap();
            for (a, b) in got[0]
                .1
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .zip(want[0].1.as_slice::<f32>().unwrap())
            {
                assert!((a - b).abs() <= 1e-6, "form {form}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_shared_intermediate_blocks_the_fusion() {
        let mut m = graph(1);
        m.graph
            .outputs
            .push(ValueInfo::new("b", DType::F32, vec![Dim::Fixed(7)]));
        let (fused, _) = FuseGelu.run(m).unwrap();
        assert_eq!(fused.graph.nodes.len(), 5);
        let mut m = graph(2);
        m.graph
            .initializers
            .insert("half".into(), Tensor::scalar(0.25f32));
        assert_eq!(FuseGelu.run(m).unwrap().0.graph.nodes.len(), 5);
    }
}
