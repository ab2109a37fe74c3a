use crate::{Dim, Model, Pass, PassRecord};
use smelt_tensor::{bail, Result, Tensor};
use std::collections::HashSet;

/// Makes a model exported with a fixed batch of 1 accept any batch size: the leading dimension
/// of inputs and outputs becomes symbolic, and every Reshape of activations whose constant
/// target shape starts with 1 copies the batch instead (ONNX's `0` = "take the input's dim").
/// Reshapes of weights are left alone. Refuses graphs where the rewrite would be unsafe.
pub struct DynamicBatch {
    pub dim_name: String,
}

impl Default for DynamicBatch {
    fn default() -> Self {
        DynamicBatch {
            dim_name: "batch".into(),
        }
    }
}

impl Pass for DynamicBatch {
    fn name(&self) -> &'static str {
        "dynamic-batch"
    }

    fn run(&self, mut model: Model) -> Result<(Model, PassRecord)> {
        let mut rec = PassRecord::new(self.name());
        let g = &mut model.graph;
        let order = g.topo_order()?;
        // Values computed from runtime inputs carry the batch dimension.
        let runtime: Vec<String> = g.runtime_inputs().map(|v| v.name.clone()).collect();
        let mut dynamic: HashSet<String> = runtime.iter().cloned().collect();
        for &i in &order {
            let n = &g.nodes[i];
            if n.inputs.iter().any(|x| dynamic.contains(x)) {
                dynamic.extend(n.outputs.iter().cloned());
            }
        }
        let mut rewrites = Vec::new();
        for &i in &order {
            let n = &g.nodes[i];
            if n.op_type != "Reshape" || !dynamic.contains(&n.inputs[0]) {
                continue;
            }
            let Some(shape_name) = n.inputs.get(1) else {
                bail!(
                    Unsupported,
                    "{}: Reshape with a shape attribute (opset < 5)",
                    n.label()
                );
            };
            let Some(shape) = g.initializers.get(shape_name) else {
                // A computed shape follows the batch already (Shape -> Gather -> Concat chains).
                continue;
            };
            let dims = shape.to_i64_vec()?;
            if dims.first() == Some(&1) {
                rewrites.push((i, shape_name.clone(), dims));
            }
        }
        for (i, shape_name, mut dims) in rewrites {
            dims[0] = 0;
            // The shape tensor may be shared with a weight Reshape: give this node its own.
            let new_name = g.unique_name(&format!("{shape_name}_batch"));
            g.initializers
                .insert(new_name.clone(), Tensor::from_vec(vec![dims.len()], dims)?);
            g.nodes[i].inputs[1] = new_name;
            rec.note(format!(
                "{} now copies the batch dimension",
                g.nodes[i].label()
            ));
        }
        let sym = Dim::Sym(self.dim_name.clone());
        for v in g.inputs.iter_mut().filter(|v| runtime.contains(&v.name)) {
            if let Some(s) = v.shape.as_mut().filter(|s| !s.is_empty()) {
                if s[0] == Dim::Fixed(1) {
                    s[0] = sym.clone();
                    rec.note(format!("input '{}' has a dynamic batch", v.name));
                }
            }
        }
        for v in g.outputs.iter_mut().chain(g.value_info.iter_mut()) {
            if !dynamic.contains(&v.name) {
                continue;
            }
            if let Some(s) = v.shape.as_mut().filter(|s| !s.is_empty()) {
                if s[0] == Dim::Fixed(1) {
                    s[0] = sym.clone();
                }
            }
        }
        g.remove_dead();
        Ok((model, rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Graph, Node, ValueInfo};
    use smelt_tensor::DType;

    #[test]
    fn rewrites_activation_reshapes_only() {
        let mut g = Graph {
            inputs: vec![ValueInfo::new(
                "x",
                DType::F32,
                vec![Dim::Fixed(1), Dim::Fixed(4)],
            )],
            outputs: vec![ValueInfo::new(
                "y",
                DType::F32,
                vec![Dim::Fixed(1), Dim::Fixed(2)],
            )],
            ..Default::default()
        };
        let shape = Tensor::from_vec(vec![2], vec![1i64, 4]).unwrap();
        g.initializers.insert("s".into(), shape);
        g.initializers.insert(
            "w".into(),
            Tensor::from_vec(vec![4, 2], vec![0f32; 8]).unwrap(),
        );
        g.initializers.insert(
            "ws".into(),
            Tensor::from_vec(vec![2], vec![4i64, 2]).unwrap(),
        );
        g.nodes
            .push(Node::new("Reshape", "r", &["x", "s"], &["xr"]));
        g.nodes
            .push(Node::new("Reshape", "rw", &["w", "ws"], &["wr"]));
        g.nodes
            .push(Node::new("MatMul", "m", &["xr", "wr"], &["y"]));
        let m = Model {
            graph: g,
            ..Default::default()
        };
        let (m, rec) = DynamicBatch::default().run(m).unwrap();
        let g = &m.graph;
        assert_eq!(
            g.inputs[0].shape.as_ref().unwrap()[0],
            Dim::Sym("batch".into())
        );
        let r = &g.nodes[0];
        assert_eq!(
            g.initializers[&r.inputs[1]].to_i64_vec().unwrap(),
            vec![0, 4]
        );
        assert_eq!(g.nodes[1].inputs[1], "ws");
        assert_eq!(rec.changes.len(), 2);
    }
}
