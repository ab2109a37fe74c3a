//! Shape inference and cost accounting. Shapes are inferred by executing the graph once on
//! synthesized inputs with concrete dimensions: exact for every op the engine runs (including
//! data-dependent Reshape/Shape chains), which a symbolic rule table could not promise.

use crate::{RunOptions, Session};
use smelt_ir::{Dim, Graph, Model, Node, ValueInfo};
use smelt_tensor::{DType, Data, Result, Tensor};
use std::collections::{BTreeMap, HashMap};

/// How to size symbolic input dimensions when synthesizing inputs.
#[derive(Clone, Debug)]
pub struct InputSpec {
    pub batch: usize,
    /// Used for a symbolic dimension other than the first (e.g. sequence length).
    pub seq_len: usize,
    pub seed: u64,
}

impl Default for InputSpec {
    fn default() -> Self {
        InputSpec {
            batch: 1,
            seq_len: 128,
            seed: 0,
        }
    }
}

/// Concrete shape for a declared input: symbolic first dim = batch, other symbolic dims = seq_len.
pub fn concrete_shape(v: &ValueInfo, spec: &InputSpec) -> Vec<usize> {
    let Some(shape) = &v.shape else {
        return vec![spec.batch];
    };
    shape
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Fixed(n) if i == 0 && *n == 1 && spec.batch != 1 => spec.batch,
            Dim::Fixed(n) => *n,
            _ if i == 0 => spec.batch,
            _ => spec.seq_len,
        })
        .collect()
}

/// Deterministic inputs for every runtime input: floats uniform in [0, 1), integer inputs named
/// like a mask are all ones, like token types (segment ids) all zeros, other integers small ids
/// in [0, 100), bools true. scripts/ort_bench.py follows the same rule.
pub fn synth_inputs(g: &Graph, spec: &InputSpec) -> Vec<(String, Tensor)> {
    let mut state = spec
        .seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    g.runtime_inputs()
        .map(|v| {
            let shape = concrete_shape(v, spec);
            let n: usize = shape.iter().product();
            let dtype = v.dtype.unwrap_or(DType::F32);
            let lower = v.name.to_ascii_lowercase();
            let mask = lower.contains("mask");
            let segment = lower.contains("type") || lower.contains("segment");
            let t = match dtype {
                DType::F32 => Tensor::from_vec(
                    shape.clone(),
                    (0..n).map(|_| next() as f32 / u32::MAX as f32).collect(),
                ),
                DType::Bool => Tensor::from_vec(shape.clone(), vec![true; n]),
                dt if dt.is_int() => {
                    let vals: Vec<i64> = (0..n)
                        .map(|_| {
                            if mask {
                                1
                            } else if segment {
                                0
                            } else {
                                (next() % 100) as i64
                            }
                        })
                        .collect();
                    Tensor::from_vec(shape.clone(), vals).and_then(|t| t.cast(dt))
                }
                dt => Tensor::from_vec(
                    shape.clone(),
                    (0..n).map(|_| next() as f32 / u32::MAX as f32).collect(),
                )
                .and_then(|t| t.cast(dt)),
            };
            (
                v.name.clone(),
                t.unwrap_or_else(|_| Tensor::zeros(dtype, shape)),
            )
        })
        .collect()
}

/// The dtype and shape of every value, found by running the model once on synthesized inputs.
pub fn infer_shapes(
    session: &Session,
    spec: &InputSpec,
) -> Result<HashMap<String, (DType, Vec<usize>)>> {
    let inputs = synth_inputs(session.graph(), spec);
    let refs: Vec<(&str, Tensor)> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let (outs, captured) = session.run_with(
        &refs,
        &RunOptions {
            capture_all: true,
            ..Default::default()
        },
    )?;
    let mut shapes: HashMap<String, (DType, Vec<usize>)> = HashMap::new();
    let g = session.graph();
    for (n, t) in inputs.iter().chain(outs.iter()) {
        shapes.insert(n.clone(), (t.dtype(), t.shape().to_vec()));
    }
    for (n, t) in &captured {
        shapes.insert(n.clone(), (t.dtype(), t.shape().to_vec()));
    }
    for (n, t) in &g.initializers {
        shapes.insert(n.clone(), (t.dtype(), t.shape().to_vec()));
    }
    Ok(shapes)
}

/// Writes inferred shapes into the graph's value_info (symbolic input dims stay symbolic only
/// for inputs; intermediate values get the concrete shapes of the probe run).
pub fn annotate_shapes(model: &mut Model, shapes: &HashMap<String, (DType, Vec<usize>)>) {
    let g = &mut model.graph;
    let declared: std::collections::HashSet<String> = g
        .inputs
        .iter()
        .chain(&g.outputs)
        .chain(&g.value_info)
        .map(|v| v.name.clone())
        .collect();
    for n in &g.nodes {
        for o in &n.outputs {
            if declared.contains(o) {
                continue;
            }
            if let Some((dt, s)) = shapes.get(o) {
                g.value_info.push(ValueInfo::new(
                    o,
                    *dt,
                    s.iter().map(|&d| Dim::Fixed(d)).collect(),
                ));
            }
        }
    }
}

/// Cost of one node for one run.
#[derive(Clone, Debug)]
pub struct NodeCost {
    pub name: String,
    pub op_type: String,
    /// Multiply-accumulates (Conv, Gemm, MatMul and friends; 0 for other ops).
    pub macs: u64,
    /// Parameters held in this node's constant inputs.
    pub params: u64,
    /// Fraction of exact zeros in those parameters.
    pub sparsity: f64,
}

/// Whole-model statistics (per sample: computed with batch 1).
#[derive(Clone, Debug, Default)]
pub struct ModelStats {
    pub params: u64,
    pub weight_bytes: u64,
    pub zero_params: u64,
    /// 2 x MACs, per sample.
    pub flops: u64,
    pub ops: BTreeMap<String, usize>,
    pub nodes: Vec<NodeCost>,
}

impl ModelStats {
    pub fn sparsity(&self) -> f64 {
        if self.params == 0 {
            0.0
        } else {
            self.zero_params as f64 / self.params as f64
        }
    }
}

fn zeros_in(t: &Tensor) -> u64 {
    match t.data() {
        Data::F32(v) => v.iter().filter(|x| **x == 0.0).count() as u64,
        Data::I8(v) => v.iter().filter(|x| **x == 0).count() as u64,
        Data::U8(v) => v.iter().filter(|x| **x == 0).count() as u64,
        _ => t
            .to_f64_vec()
            .map(|v| v.iter().filter(|x| **x == 0.0).count() as u64)
            .unwrap_or(0),
    }
}

/// Parameters, bytes, sparsity and per-node MACs, using shapes from [`infer_shapes`] at batch 1.
pub fn model_stats(model: &Model, shapes: &HashMap<String, (DType, Vec<usize>)>) -> ModelStats {
    let g = &model.graph;
    let mut s = ModelStats::default();
    for t in g.initializers.values() {
        s.params += t.numel() as u64;
        s.weight_bytes += t.dtype().packed_bytes(t.numel()).unwrap_or(0) as u64;
        s.zero_params += zeros_in(t);
    }
    for n in &g.nodes {
        *s.ops.entry(n.op_type.clone()).or_default() += 1;
        let mut params = 0u64;
        let mut zeros = 0u64;
        for i in &n.inputs {
            if let Some(t) = g.initializers.get(i) {
                if t.numel() > 1 {
                    params += t.numel() as u64;
                    zeros += zeros_in(t);
                }
            }
        }
        let macs = node_macs(n, shapes);
        s.flops += 2 * macs;
        s.nodes.push(NodeCost {
            name: n.name.clone(),
            op_type: n.op_type.clone(),
            macs,
            params,
            sparsity: if params == 0 {
                0.0
            } else {
                zeros as f64 / params as f64
            },
        });
    }
    s
}

fn node_macs(n: &Node, shapes: &HashMap<String, (DType, Vec<usize>)>) -> u64 {
    let shape = |i: usize| -> Option<&Vec<usize>> {
        n.inputs.get(i).and_then(|x| shapes.get(x)).map(|(_, s)| s)
    };
    let out = n
        .outputs
        .first()
        .and_then(|x| shapes.get(x))
        .map(|(_, s)| s);
    let prod = |s: &[usize]| s.iter().map(|&d| d as u64).product::<u64>();
    match n.op_type.as_str() {
        "Conv" | "ConvInteger" | "QLinearConv" => {
            let w = if n.op_type == "QLinearConv" {
                shape(3)
            } else {
                shape(1)
            };
            match (w, out) {
                // Each output element needs (C_in/groups) * kernel MACs = w[1] * prod(w[2..]).
                (Some(w), Some(o)) if w.len() >= 2 => prod(o) * prod(&w[1..]),
                _ => 0,
            }
        }
        "ConvTranspose" => match (shape(0), shape(1)) {
            (Some(x), Some(w)) if w.len() >= 2 => prod(x) * prod(&w[1..]),
            _ => 0,
        },
        "Gemm" | "MatMul" | "MatMulInteger" | "QLinearMatMul" | "MatMulNBits" => {
            let a = shape(0);
            match (a, out) {
                (Some(a), Some(o)) if !a.is_empty() => {
                    let k = if n.op_type == "Gemm" && n.attr_int("transA").ok().flatten() == Some(1)
                    {
                        a[0]
                    } else {
                        a[a.len() - 1]
                    };
                    prod(o) * k as u64
                }
                _ => 0,
            }
        }
        _ => 0,
    }
}

/// Peak memory of one run, in bytes, from the value sizes of `shapes` (as `infer_shapes`
/// gives them): the weights the session holds plus the most activation bytes alive at once,
/// walking the nodes in execution order and freeing each value after its last consumer. A
/// model-level figure that does not depend on the allocator or on machine noise, so the before
/// and after of a compression compare exactly.
pub fn peak_memory(session: &Session, shapes: &HashMap<String, (DType, Vec<usize>)>) -> u64 {
    let g = session.graph();
    let bytes = |name: &str| -> u64 {
        shapes.get(name).map_or(0, |(t, s)| {
            let n: usize = s.iter().product();
            t.packed_bytes(n).unwrap_or(n * t.size()) as u64
        })
    };
    let weights: u64 = g.initializers.keys().map(|n| bytes(n)).sum();
    let mut last_use: HashMap<&str, usize> = HashMap::new();
    for (i, node) in g.nodes.iter().enumerate() {
        for v in node.inputs.iter().filter(|v| !v.is_empty()) {
            last_use.insert(v.as_str(), i);
        }
    }
    let outputs: std::collections::HashSet<&str> =
        g.outputs.iter().map(|v| v.name.as_str()).collect();
    let mut live: u64 = g
        .inputs
        .iter()
        .filter(|v| !g.initializers.contains_key(&v.name))
        .map(|v| bytes(&v.name))
        .sum();
    let mut peak = live;
    for (i, node) in g.nodes.iter().enumerate() {
        live += node.outputs.iter().map(|o| bytes(o)).sum::<u64>();
        peak = peak.max(live);
        let mut freed: Vec<&str> = node
            .inputs
            .iter()
            .chain(&node.outputs)
            .map(String::as_str)
            .filter(|v| {
                !v.is_empty()
                    && !g.initializers.contains_key(*v)
                    && !outputs.contains(v)
                    && last_use.get(v).is_none_or(|&l| l <= i)
            })
            .collect();
        freed.sort_unstable();
        freed.dedup();
        live = live.saturating_sub(freed.iter().map(|v| bytes(v)).sum::<u64>());
    }
    weights + peak
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_ir::OpsetImport;

    /// x [1000] -> Relu a -> Neg b -> Abs c (output); a weight-free chain: at most two
    /// activations of 4,000 bytes are alive at once.
    #[test]
    fn peak_memory_frees_values_after_their_last_use() {
        let mut g = Graph {
            inputs: vec![ValueInfo::new("x", DType::F32, vec![Dim::Fixed(1000)])],
            outputs: vec![ValueInfo::new("c", DType::F32, vec![Dim::Fixed(1000)])],
            ..Default::default()
        };
        g.nodes.push(Node::new("Relu", "r", &["x"], &["a"]));
        g.nodes.push(Node::new("Neg", "n", &["a"], &["b"]));
        g.nodes.push(Node::new("Abs", "m", &["b"], &["c"]));
        let model = Model {
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: 17,
            }],
            graph: g,
            ..Default::default()
        };
        let s = Session::new(model.clone()).unwrap();
        let shapes = infer_shapes(&s, &InputSpec::default()).unwrap();
        assert_eq!(peak_memory(&s, &shapes), 8000);
        // A second consumer of x at the end keeps it alive throughout.
        let mut m2 = model;
        m2.graph
            .nodes
            .push(Node::new("Add", "s", &["c", "x"], &["d"]));
        m2.graph.outputs[0].name = "d".into();
        let s = Session::new(m2).unwrap();
        let shapes = infer_shapes(&s, &InputSpec::default()).unwrap();
        assert_eq!(peak_memory(&s, &shapes), 12000);
    }
}
