//! Which weights can be pruned, and how their axes read: the output axis (one row per neuron or
//! channel) and the input-feature axis (what an activation norm or an N:M group runs along).

use serde::Serialize;
use smelt_ir::pattern::matches_node;
use smelt_ir::Graph;
use smelt_tensor::{bail, DType, Result};

/// Ops whose constant weights are pruned by default.
pub const DEFAULT_OPS: &[&str] = &["Conv", "Gemm", "MatMul"];

#[derive(Clone, Debug, Serialize)]
pub struct WeightTarget {
    /// Index of the node reading the weight.
    #[serde(skip)]
    pub node: usize,
    /// The node's name (or op and output when unnamed).
    pub layer: String,
    pub op: String,
    /// The weight initializer.
    pub weight: String,
    pub shape: Vec<usize>,
    /// Axis of output channels / neurons.
    pub out_axis: usize,
    /// Axis of input channels / features: the reduction axis.
    pub in_axis: usize,
    /// The activation the weight multiplies (for activation-aware scores).
    #[serde(skip)]
    pub input: String,
    /// Conv groups: input channel of (output row o, weight column i) is
    /// `(o / (O / groups)) * (I / groups) + i`.
    #[serde(skip)]
    pub groups: usize,
}

impl WeightTarget {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The input channel (index into the activation's feature axis) weight element `flat` reads.
    pub fn input_channel(&self, flat: usize) -> usize {
        let stride: usize = self.shape[self.in_axis + 1..].iter().product();
        let i = (flat / stride) % self.shape[self.in_axis];
        if self.groups <= 1 {
            return i;
        }
        let out_stride: usize = self.shape[self.out_axis + 1..].iter().product();
        let o = (flat / out_stride) % self.shape[self.out_axis];
        (o / (self.shape[self.out_axis] / self.groups)) * self.shape[self.in_axis] + i
    }
}

/// The prunable weights of `g`: constant float weights of `ops` nodes not matched by `exclude`
/// (each pattern must match some node, so a typo is not silently ignored).
pub fn find(g: &Graph, ops: &[String], exclude: &[String]) -> Result<Vec<WeightTarget>> {
    for p in exclude {
        if !g.nodes.iter().any(|n| matches_node(p, n)) {
            bail!(
                Input,
                "--exclude '{p}' matches no node name, op type or name pattern in the model"
            );
        }
    }
    let mut out: Vec<WeightTarget> = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if !n.domain.is_empty() || !ops.contains(&n.op_type) {
            continue;
        }
        if exclude.iter().any(|p| matches_node(p, n)) {
            continue;
        }
        let attr = |k: &str| n.attr_int(k).ok().flatten().unwrap_or(0);
        let (k, out_axis, in_axis) = match n.op_type.as_str() {
            "Conv" => (1, 0, 1),
            "Gemm" if attr("transA") == 0 => {
                if attr("transB") != 0 {
                    (1, 0, 1)
                } else {
                    (1, 1, 0)
                }
            }
            "MatMul" => (1, 1, 0),
            _ => continue,
        };
        let Some(wname) = n.inputs.get(k) else {
            continue;
        };
        let Some(w) = g.initializers.get(wname) else {
            continue;
        };
        let rank_ok = if n.op_type == "Conv" {
            w.rank() >= 3
        } else {
            w.rank() == 2
        };
        if w.dtype() != DType::F32 || !rank_ok || g.inputs.iter().any(|v| &v.name == wname) {
            continue;
        }
        if out.iter().any(|t| &t.weight == wname) {
            continue; // shared weight: pruned once, through its first reader
        }
        out.push(WeightTarget {
            node: i,
            layer: if n.name.is_empty() {
                n.label()
            } else {
                n.name.clone()
            },
            op: n.op_type.clone(),
            weight: wname.clone(),
            shape: w.shape().to_vec(),
            out_axis,
            in_axis,
            input: n.inputs[0].clone(),
            groups: if n.op_type == "Conv" {
                attr("group").max(1) as usize
            } else {
                1
            },
        });
    }
    Ok(out)
}
