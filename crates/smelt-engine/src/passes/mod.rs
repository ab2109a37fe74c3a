//! Graph passes that need the engine: folding constants evaluates ops, `qdq` rewrites
//! QDQ patterns into the engine's own integer ops, `gelu` collapses a written-out GELU into
//! one op, `conv_act` fuses a float Conv's bias and ReLU into it, `matmul_bias` a float
//! MatMul's bias, and `softmax` and `snap` fold what surrounds a softmax or a LayerNorm into it.

mod conv_act;
mod gelu;
mod matmul_bias;
mod qdq;
mod snap;
mod softmax;
pub use conv_act::FuseConvRelu;
pub use gelu::FuseGelu;
pub use matmul_bias::FuseMatMulBias;
pub use qdq::{is_integer_layer, FuseQdq};
pub use snap::SnapLayerNorm;
pub use softmax::FuseSoftmax;

use crate::session::run_node;
use smelt_ir::{Graph, Model, Node, Pass, PassRecord};
use smelt_tensor::{Result, Tensor};

/// Ops whose output is not a pure function of their inputs: never folded.
const NONDETERMINISTIC: &[&str] = &[
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
];

/// Replaces every node whose inputs are all constants by initializers holding its outputs
/// (Shape of a known-shape value is not folded here: shapes may be symbolic).
pub struct FoldConstants {
    /// Outputs larger than this many elements stay as computation (folding must not bloat
    /// the file, e.g. a ConstantOfShape producing a huge tensor).
    pub max_elements: usize,
}

impl Default for FoldConstants {
    fn default() -> Self {
        FoldConstants {
            max_elements: 1 << 20,
        }
    }
}

impl Pass for FoldConstants {
    fn name(&self) -> &'static str {
        "fold-constants"
    }

    fn run(&self, mut model: Model) -> Result<(Model, PassRecord)> {
        let mut rec = PassRecord::new(self.name());
        let opset = model.onnx_opset();
        model.graph.sort()?;
        let g = &mut model.graph;
        let graph_outputs: std::collections::HashSet<String> =
            g.outputs.iter().map(|o| o.name.clone()).collect();
        let mut i = 0;
        while i < g.nodes.len() {
            let n = &g.nodes[i];
            let foldable = !NONDETERMINISTIC.contains(&n.op_type.as_str())
                && !n
                    .attrs
                    .values()
                    .any(|a| matches!(a, smelt_ir::Attr::Graph(_) | smelt_ir::Attr::Graphs(_)))
                && n.inputs
                    .iter()
                    .all(|x| x.is_empty() || g.initializers.contains_key(x))
                && !n.outputs.iter().any(|o| graph_outputs.contains(o))
                && n.inputs
                    .iter()
                    .all(|x| !g.inputs.iter().any(|v| &v.name == x));
            if foldable {
                let ins: Vec<Option<&Tensor>> = n
                    .inputs
                    .iter()
                    .map(|x| {
                        if x.is_empty() {
                            None
                        } else {
                            g.initializers.get(x)
                        }
                    })
                    .collect();
                if let Ok(outs) = run_node(n, opset, &ins) {
                    if outs.iter().all(|t| t.numel() <= self.max_elements) {
                        let n = g.nodes.remove(i);
                        rec.note(format!("folded {} into constants", n.label()));
                        for (name, t) in n.outputs.iter().zip(outs) {
                            if !name.is_empty() {
                                g.initializers.insert(name.clone(), t);
                            }
                        }
                        continue;
                    }
                }
            }
            i += 1;
        }
        let (nodes, inits) = g.remove_dead();
        if nodes + inits > 0 {
            rec.note(format!(
                "removed {nodes} dead nodes and {inits} unused initializers"
            ));
        }
        Ok((model, rec))
    }
}

/// The single-element f32 constant behind `value`, if it is one.
pub(crate) fn scalar(g: &Graph, value: &str) -> Option<f32> {
    let t = match g.initializers.get(value) {
        Some(t) => t,
        None => {
            let n = &g.nodes[g.producer(value)?];
            if n.op_type != "Constant" || !n.domain.is_empty() {
                return None;
            }
            n.attr_tensor("value").ok()??
        }
    };
    // Rank 0 or [1] only: a [1, 1, 1] constant would broadcast x to a higher rank.
    match t.as_slice::<f32>() {
        Ok([v]) if t.rank() <= 1 => Some(*v),
        _ => None,
    }
}

/// The node producing `value` if it is a default-domain `op` that only `reader` consumes
/// and the graph does not return.
pub(crate) fn private<'a>(g: &'a Graph, value: &str, op: &str, reader: usize) -> Option<&'a Node> {
    let p = &g.nodes[g.producer(value)?];
    let only = g.consumers(value) == [reader] && !g.outputs.iter().any(|o| o.name == value);
    (p.domain.is_empty() && p.op_type == op && p.outputs.len() == 1 && only).then_some(p)
}

/// Whether a fusion pass must leave the model alone: renaming or replacing values would hide
/// them from If/Loop/Scan bodies that read them. Says so in the record.
pub(crate) fn left_as_written(model: &Model, rec: &mut PassRecord) -> bool {
    let control_flow = model.graph.has_subgraphs();
    if control_flow {
        rec.note("the graph has control flow: left as written");
    }
    control_flow
}
