use crate::{Graph, Model, Node, Pass, PassRecord};
use smelt_tensor::{DType, Result, Tensor};

/// Folds a constant bias `Add` into the layer before it: `Conv -> Add(per-channel const)`
/// becomes a Conv with its bias input, and `MatMul(2-D A, const B) -> Add(const [N])` a Gemm.
///
/// Exporters from older frameworks (CNTK, early Keras) write the bias as a separate Add. Kept
/// apart, the Add breaks the Conv/Gemm + bias patterns that integer kernels fuse (the quantizer
/// would round the pre-bias value, and runtimes cannot add an int32 bias in the accumulator),
/// and costs one more pass over the activation in every engine.
pub struct FuseBias;

impl Pass for FuseBias {
    fn name(&self) -> &'static str {
        "fuse-bias"
    }

    fn run(&self, mut model: Model) -> Result<(Model, PassRecord)> {
        let mut rec = PassRecord::new(self.name());
        // Gemm-7 is the first with numpy-style broadcasting of C.
        let gemm_ok = model.onnx_opset() >= 7;
        let g = &mut model.graph;
        let mut i = 0;
        while i < g.nodes.len() {
            if let Some(note) = fuse_at(g, i, gemm_ok)? {
                rec.note(note);
            } else {
                i += 1;
            }
        }
        Ok((model, rec))
    }
}

/// Tries to fuse the Add at node `i` into its producer; on success the Add is removed.
fn fuse_at(g: &mut Graph, i: usize, gemm_ok: bool) -> Result<Option<String>> {
    let add = &g.nodes[i];
    if add.op_type != "Add" || !add.domain.is_empty() || add.inputs.len() != 2 {
        return Ok(None);
    }
    // One side a float constant, the other the only use of a Conv or MatMul output.
    let Some((k, c)) = (0..2).find_map(|k| constant(g, &add.inputs[1 - k]).map(|t| (k, t))) else {
        return Ok(None);
    };
    let x = &add.inputs[k];
    let Some(p) = g.producer(x) else {
        return Ok(None);
    };
    if g.consumers(x).len() != 1 || g.outputs.iter().any(|o| &o.name == x) {
        return Ok(None);
    }
    let prod = &g.nodes[p];
    if !prod.domain.is_empty() {
        return Ok(None);
    }
    let bias = match prod.op_type.as_str() {
        "Conv" => conv_bias(g, prod, c)?,
        "MatMul" if gemm_ok => matmul_bias(g, prod, c)?,
        _ => None,
    };
    let Some(mut bias) = bias else {
        return Ok(None);
    };
    if let Some(old) = prod.inputs.get(2).filter(|s| !s.is_empty()) {
        // A Conv that already has a bias: the sum is the new bias (only if it is constant).
        let Some(old) = constant(g, old) else {
            return Ok(None);
        };
        let old = old.to_f32_vec()?;
        if old.len() != bias.len() {
            return Ok(None);
        }
        bias.iter_mut().zip(old).for_each(|(b, o)| *b += o);
    }
    let (label, add_label) = (prod.label(), add.label());
    let out = add.outputs[0].clone();
    let base = if prod.name.is_empty() {
        out.clone()
    } else {
        prod.name.clone()
    };
    let name = g.unique_name(&format!("{base}_bias"));
    g.initializers
        .insert(name.clone(), Tensor::from_vec(vec![bias.len()], bias)?);
    let n = &mut g.nodes[p];
    if n.op_type == "MatMul" {
        n.op_type = "Gemm".into();
    }
    n.inputs.resize(2, String::new());
    n.inputs.push(name);
    let old_out = std::mem::replace(&mut n.outputs[0], out);
    g.nodes.remove(i);
    g.value_info.retain(|v| v.name != old_out);
    g.remove_dead();
    Ok(Some(format!("{add_label} folded into {label} as its bias")))
}

/// A float initializer that is not also a graph input: in IR < 4 files such an input is an
/// overridable default, not a constant.
fn constant<'g>(g: &'g Graph, name: &str) -> Option<&'g Tensor> {
    g.initializers
        .get(name)
        .filter(|t| t.dtype() == DType::F32 && !g.inputs.iter().any(|v| v.name == name))
}

/// The Add constant as a Conv bias: it must broadcast along the channel axis only.
fn conv_bias(g: &Graph, conv: &Node, c: &Tensor) -> Result<Option<Vec<f32>>> {
    let Some(w) = conv.inputs.get(1).and_then(|w| g.initializers.get(w)) else {
        return Ok(None);
    };
    let rank = w.rank();
    if rank < 3 || c.rank() > rank {
        return Ok(None);
    }
    let channels = w.shape()[0];
    // Right-align the constant's shape with the output [N, C, spatial...].
    let mut dims = vec![1; rank - c.rank()];
    dims.extend_from_slice(c.shape());
    let others_one = dims.iter().enumerate().all(|(a, &d)| a == 1 || d == 1);
    if !others_one || (dims[1] != channels && dims[1] != 1) {
        return Ok(None);
    }
    broadcast(c, channels)
}

/// The Add constant as a Gemm C: MatMul must be 2-D x 2-D and the constant a row vector.
fn matmul_bias(g: &Graph, mm: &Node, c: &Tensor) -> Result<Option<Vec<f32>>> {
    let Some(b) = mm.inputs.get(1).and_then(|b| g.initializers.get(b)) else {
        return Ok(None);
    };
    if b.rank() != 2 || rank_of(g, &mm.inputs[0]) != Some(2) {
        return Ok(None);
    }
    let n = b.shape()[1];
    let row = match c.shape() {
        [] => true,
        [m] => *m == n || *m == 1,
        [1, m] => *m == n || *m == 1,
        _ => false,
    };
    if !row {
        return Ok(None);
    }
    broadcast(c, n)
}

/// A scalar or length-`n` constant as `n` values.
fn broadcast(c: &Tensor, n: usize) -> Result<Option<Vec<f32>>> {
    let v = c.to_f32_vec()?;
    Ok(match v.len() {
        1 => Some(vec![v[0]; n]),
        len if len == n => Some(v),
        _ => None,
    })
}

/// The rank of a value when the graph states it or a shape-fixing producer implies it.
fn rank_of(g: &Graph, value: &str) -> Option<usize> {
    if let Some(s) = g.value_info(value).and_then(|v| v.shape.as_ref()) {
        return Some(s.len());
    }
    let n = &g.nodes[g.producer(value)?];
    match n.op_type.as_str() {
        "Flatten" | "Gemm" => Some(2),
        "Reshape" => g
            .initializers
            .get(n.inputs.get(1)?)
            .filter(|s| s.rank() == 1)
            .map(|s| s.shape()[0]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dim, ValueInfo};

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    fn model(nodes: Vec<Node>, inits: Vec<(&str, Tensor)>, out: &str) -> Model {
        let mut g = Graph {
            inputs: vec![ValueInfo::new(
                "x",
                DType::F32,
                vec![Dim::Fixed(1), Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(3)],
            )],
            outputs: vec![ValueInfo::new("y", DType::F32, vec![])],
            nodes,
            ..Default::default()
        };
        g.outputs[0].name = out.into();
        for (k, v) in inits {
            g.initializers.insert(k.into(), v);
        }
        Model {
            graph: g,
            ..Default::default()
        }
    }

    #[test]
    fn conv_add_becomes_conv_bias() {
        let m = model(
            vec![
                Node::new("Conv", "c", &["x", "w", "b0"], &["c_out"]),
                Node::new("Add", "a", &["c_out", "b"], &["s"]),
                Node::new("Relu", "r", &["s"], &["y"]),
            ],
            vec![
                ("w", t(&[4, 2, 1, 1], vec![0.5; 8])),
                ("b0", t(&[4], vec![1.0, 2.0, 3.0, 4.0])),
                ("b", t(&[4, 1, 1], vec![10.0, 20.0, 30.0, 40.0])),
            ],
            "y",
        );
        let (m, rec) = FuseBias.run(m).unwrap();
        let g = &m.graph;
        assert_eq!(
            rec.changes,
            vec!["Add node 'a' folded into Conv node 'c' as its bias"]
        );
        assert_eq!(g.nodes.len(), 2);
        assert_eq!(g.nodes[0].outputs, vec!["s"]);
        let b = &g.initializers[&g.nodes[0].inputs[2]];
        assert_eq!(b.shape(), &[4]);
        assert_eq!(b.to_f32_vec().unwrap(), vec![11.0, 22.0, 33.0, 44.0]);
        // The old constants are gone with the Add.
        assert!(!g.initializers.contains_key("b") && !g.initializers.contains_key("b0"));
    }

    #[test]
    fn matmul_add_becomes_gemm_when_2d() {
        let nodes = vec![
            Node::new("Reshape", "r", &["x", "shape"], &["flat"]),
            Node::new("MatMul", "m", &["flat", "w"], &["mm"]),
            Node::new("Add", "a", &["bias", "mm"], &["y"]),
        ];
        let inits = vec![
            ("shape", Tensor::from_vec(vec![2], vec![1i64, 18]).unwrap()),
            ("w", t(&[18, 3], vec![0.0; 54])),
            ("bias", t(&[1, 3], vec![1.0, 2.0, 3.0])),
        ];
        let mut m = model(nodes.clone(), inits.clone(), "y");
        m.opsets = vec![crate::OpsetImport {
            domain: String::new(),
            version: 13,
        }];
        let (m, _) = FuseBias.run(m).unwrap();
        let g = &m.graph;
        assert_eq!(g.nodes.len(), 2);
        assert_eq!(g.nodes[1].op_type, "Gemm");
        assert_eq!(g.nodes[1].outputs, vec!["y"]);
        assert_eq!(
            g.initializers[&g.nodes[1].inputs[2]].to_f32_vec().unwrap(),
            vec![1.0, 2.0, 3.0]
        );
        // A rank-3 activation (a transformer's [b, s, d]) stays a MatMul.
        let mut nodes3 = nodes;
        nodes3[0] = Node::new("Reshape", "r", &["x", "shape3"], &["flat"]);
        let mut inits3 = inits;
        inits3.push((
            "shape3",
            Tensor::from_vec(vec![3], vec![1i64, 1, 18]).unwrap(),
        ));
        let (m, rec) = FuseBias.run(model(nodes3, inits3, "y")).unwrap();
        assert!(rec.changes.is_empty());
        assert_eq!(m.graph.nodes[1].op_type, "MatMul");
    }

    #[test]
    fn leaves_shared_or_spatial_adds() {
        // The Conv output is read twice: fusing would change the other reader.
        let two_uses = model(
            vec![
                Node::new("Conv", "c", &["x", "w"], &["c_out"]),
                Node::new("Add", "a", &["c_out", "b"], &["s"]),
                Node::new("Mul", "m", &["c_out", "s"], &["y"]),
            ],
            vec![
                ("w", t(&[4, 2, 1, 1], vec![0.5; 8])),
                ("b", t(&[4, 1, 1], vec![1.0; 4])),
            ],
            "y",
        );
        // A per-pixel constant is not a bias.
        let spatial = model(
            vec![
                Node::new("Conv", "c", &["x", "w"], &["c_out"]),
                Node::new("Add", "a", &["c_out", "b"], &["y"]),
            ],
            vec![
                ("w", t(&[4, 2, 1, 1], vec![0.5; 8])),
                ("b", t(&[1, 3, 3], vec![1.0; 9])),
            ],
            "y",
        );
        for m in [two_uses, spatial] {
            let (m, rec) = FuseBias.run(m).unwrap();
            assert!(rec.changes.is_empty());
            assert_eq!(m.graph.nodes[1].op_type, "Add");
        }
    }
}
