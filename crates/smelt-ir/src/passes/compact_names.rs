//! `compact-names`: every internal value, initializer and node gets a short id (`0`, `1`, ...,
//! `a`, ... in base 36), in graph order; the graph's inputs and outputs keep their names, so
//! the model's interface is unchanged.
//!
//! Names are free text in ONNX and a small quantized model can spend a third of its file on
//! them (MNIST-8 in QDQ form: 3.5 of 11 kB). For shipping, where nobody reads the graph; the
//! result is harder to debug, so this is never the default.

use crate::{Model, Pass, PassRecord};
use smelt_tensor::Result;
use std::collections::{HashMap, HashSet};

pub struct CompactNames;

fn base36(mut k: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = Vec::new();
    loop {
        s.push(DIGITS[k % 36]);
        k /= 36;
        if k == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

impl Pass for CompactNames {
    fn name(&self) -> &'static str {
        "compact-names"
    }

    fn run(&self, mut model: Model) -> Result<(Model, PassRecord)> {
        let mut rec = PassRecord::new(self.name());
        let g = &mut model.graph;
        if g.has_subgraphs() {
            rec.note("the graph has control flow (its bodies read outer names): names kept");
            return Ok((model, rec));
        }
        let fixed: HashSet<String> = g
            .inputs
            .iter()
            .chain(&g.outputs)
            .map(|v| v.name.clone())
            .collect();
        let mut ids: HashMap<String, String> = HashMap::new();
        let mut next = 0;
        let mut fresh = |name: &str, ids: &mut HashMap<String, String>| -> String {
            if name.is_empty() || fixed.contains(name) {
                return name.to_string();
            }
            if let Some(id) = ids.get(name) {
                return id.clone();
            }
            // Skip ids that are an input's or output's own name.
            let id = loop {
                let id = base36(next);
                next += 1;
                if !fixed.contains(&id) {
                    break id;
                }
            };
            ids.insert(name.to_string(), id.clone());
            id
        };
        let inits: Vec<String> = g.initializers.keys().cloned().collect();
        for name in &inits {
            fresh(name, &mut ids);
        }
        for n in &g.nodes {
            for v in n.inputs.iter().chain(&n.outputs) {
                fresh(v, &mut ids);
            }
        }
        let renamed = ids.len();
        let old = std::mem::take(&mut g.initializers);
        g.initializers = old
            .into_iter()
            .map(|(k, t)| (ids.get(&k).cloned().unwrap_or(k), t))
            .collect();
        for (i, n) in g.nodes.iter_mut().enumerate() {
            n.name = base36(i);
            for v in n.inputs.iter_mut().chain(n.outputs.iter_mut()) {
                if let Some(id) = ids.get(v.as_str()) {
                    *v = id.clone();
                }
            }
        }
        // Shapes of internal values are optional and would only need renaming too.
        g.value_info.clear();
        rec.note(format!(
            "{renamed} values and {} nodes renamed to short ids",
            g.nodes.len()
        ));
        Ok((model, rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dim, Graph, Node, ValueInfo};
    use smelt_tensor::{DType, Tensor};

    #[test]
    fn renames_internals_and_keeps_the_interface() {
        let mut g = Graph::default();
        g.inputs
            .push(ValueInfo::new("x", DType::F32, vec![Dim::Fixed(2)]));
        g.outputs
            .push(ValueInfo::new("y", DType::F32, vec![Dim::Fixed(2)]));
        g.initializers.insert(
            "a_long_weight_name".into(),
            Tensor::from_vec(vec![2], vec![1f32, 2.0]).unwrap(),
        );
        g.nodes.push(Node::new(
            "Mul",
            "first_multiply",
            &["x", "a_long_weight_name"],
            &["intermediate_value"],
        ));
        g.nodes.push(Node::new(
            "Add",
            "then_add",
            &["intermediate_value", "x"],
            &["y"],
        ));
        let m = Model {
            graph: g,
            ..Default::default()
        };
        let (out, rec) = CompactNames.run(m).unwrap();
        let g = &out.graph;
        assert_eq!(g.inputs[0].name, "x");
        assert_eq!(g.outputs[0].name, "y");
        assert_eq!(g.nodes[0].inputs, ["x", "0"]);
        assert_eq!(g.nodes[0].outputs, ["1"]);
        assert_eq!(g.nodes[1].inputs, ["1", "x"]);
        assert_eq!(g.nodes[1].outputs, ["y"]);
        assert_eq!(
            g.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["0", "1"]
        );
        assert!(g.initializers.contains_key("0"));
        assert_eq!(rec.changes.len(), 1);
        assert_eq!(base36(36 * 36 + 35), "10z");
    }
}
