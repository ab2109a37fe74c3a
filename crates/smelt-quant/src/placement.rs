//! Which nodes get quantized, which weight axis each uses, and what stays in float and why.

use crate::weights::Axes;
use serde::Serialize;
use smelt_ir::{Graph, Node};
use smelt_tensor::{bail, DType, Result};

/// Ops whose weights and inputs are quantized by default: they carry almost all the
/// arithmetic and every backend has integer kernels for them.
pub const DEFAULT_OPS: &[&str] = &["Conv", "Gemm", "MatMul", "Gather"];

/// Ops that onnxruntime and the literature agree are fragile in low precision; named in the
/// report when they stay in float.
const SENSITIVE: &[&str] = &[
    "Softmax",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "ReduceMean",
    "Sqrt",
    "Pow",
    "Div",
    "Erf",
    "Exp",
    "Log",
    "Sigmoid",
    "Tanh",
];

/// A constant weight input of a quantized node.
#[derive(Clone, Debug)]
pub struct WeightSlot {
    pub input: usize,
    pub axes: Axes,
    /// Gemm with transB=0 stores B as [K, N]; MatMulInteger always wants that layout.
    pub transposed: bool,
}

/// One node to quantize.
#[derive(Clone, Debug)]
pub struct Target {
    pub node: usize,
    pub label: String,
    pub op: String,
    pub weight: Option<WeightSlot>,
    /// Input index of a 1-D bias quantizable to int32 (Conv B, Gemm C).
    pub bias: Option<usize>,
    /// Input indices carrying activations (runtime values, float).
    pub activations: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Fallback {
    pub node: String,
    pub op: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default)]
pub struct Placement {
    pub targets: Vec<Target>,
    pub fallbacks: Vec<Fallback>,
}

/// `--exclude` entries: a node name, an op type, or a glob (`*`, `?`) over node names.
pub use smelt_ir::pattern::matches_node as excluded;

fn is_float_const(g: &Graph, name: &str) -> bool {
    g.initializers
        .get(name)
        .is_some_and(|t| t.dtype() == DType::F32)
}

fn is_runtime(g: &Graph, name: &str) -> bool {
    !name.is_empty() && !g.initializers.contains_key(name)
}

/// Decides what to quantize. `ops` lists quantizable op types, `exclude` user patterns (each
/// must match at least one node, so a typo is not silently ignored), `need_activations`
/// whether activation inputs must be float runtime values (static and dynamic modes).
pub fn plan(g: &Graph, ops: &[String], exclude: &[String]) -> Result<Placement> {
    for p in exclude {
        if !g.nodes.iter().any(|n| excluded(p, n)) {
            bail!(
                Input,
                "--exclude '{p}' matches no node name, op type or name pattern in the model"
            );
        }
    }
    let mut out = Placement::default();
    let mut sensitive_kept = std::collections::BTreeMap::<String, usize>::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if !n.domain.is_empty() && n.domain != "ai.onnx" || !ops.contains(&n.op_type) {
            if SENSITIVE.contains(&n.op_type.as_str()) {
                *sensitive_kept.entry(n.op_type.clone()).or_default() += 1;
            }
            continue;
        }
        let fallback = |reason: String| Fallback {
            node: n.label(),
            op: n.op_type.clone(),
            reason,
        };
        if let Some(p) = exclude.iter().find(|p| excluded(p, n)) {
            out.fallbacks
                .push(fallback(format!("excluded by --exclude '{p}'")));
            continue;
        }
        match target_for(g, i, n) {
            Ok(t) => out.targets.push(t),
            Err(reason) => out.fallbacks.push(fallback(reason)),
        }
    }
    for (op, count) in sensitive_kept {
        out.fallbacks.push(Fallback {
            node: format!("{count} node(s)"),
            op,
            reason: "numerically sensitive op, kept in float".into(),
        });
    }
    Ok(out)
}

/// Whether `value` is a Softmax output, possibly masked (Where) or reshaped on the way.
fn reads_softmax(g: &Graph, value: &str, depth: usize) -> bool {
    let Some(p) = g.producer(value) else {
        return false;
    };
    let n = &g.nodes[p];
    if !n.domain.is_empty() {
        return false;
    }
    match n.op_type.as_str() {
        "Softmax" => true,
        "Where" | "Cast" | "Dropout" | "Identity" | "Reshape" | "Transpose" | "Squeeze"
        | "Unsqueeze"
            if depth > 0 =>
        {
            n.inputs
                .iter()
                .any(|i| is_runtime(g, i) && reads_softmax(g, i, depth - 1))
        }
        _ => false,
    }
}

fn target_for(g: &Graph, i: usize, n: &Node) -> std::result::Result<Target, String> {
    let input = |k: usize| n.inputs.get(k).map(String::as_str).unwrap_or("");
    let rank = |name: &str| g.initializers.get(name).map(|t| t.rank());
    let attr = |k: &str| n.attr_int(k).ok().flatten().unwrap_or(0);
    let mut t = Target {
        node: i,
        label: n.label(),
        op: n.op_type.clone(),
        weight: None,
        bias: None,
        activations: vec![],
    };
    match n.op_type.as_str() {
        "Conv" => {
            if !is_float_const(g, input(1)) {
                return Err("weight is not a float constant".into());
            }
            if !is_runtime(g, input(0)) {
                return Err("input is a constant (folded instead)".into());
            }
            t.activations = vec![0];
            t.weight = Some(WeightSlot {
                input: 1,
                axes: Axes {
                    channel_axis: 0,
                    reduce_axis: 1,
                },
                transposed: false,
            });
            if is_float_const(g, input(2)) && rank(input(2)) == Some(1) {
                t.bias = Some(2);
            }
        }
        "Gemm" => {
            if attr("transA") != 0 {
                return Err("transA=1 is not supported".into());
            }
            if !is_float_const(g, input(1)) || rank(input(1)) != Some(2) {
                return Err("B is not a 2-D float constant".into());
            }
            if !is_runtime(g, input(0)) {
                return Err("A is a constant (folded instead)".into());
            }
            let trans_b = attr("transB") != 0;
            t.activations = vec![0];
            t.weight = Some(WeightSlot {
                input: 1,
                axes: if trans_b {
                    Axes {
                        channel_axis: 0,
                        reduce_axis: 1,
                    }
                } else {
                    Axes {
                        channel_axis: 1,
                        reduce_axis: 0,
                    }
                },
                transposed: trans_b,
            });
            let alpha = n.attr_float("alpha").ok().flatten().unwrap_or(1.0);
            let beta = n.attr_float("beta").ok().flatten().unwrap_or(1.0);
            if is_float_const(g, input(2))
                && rank(input(2)) == Some(1)
                && alpha == 1.0
                && beta == 1.0
            {
                t.bias = Some(2);
            }
        }
        "MatMul" => {
            let (a, b) = (input(0), input(1));
            match (is_runtime(g, a), is_float_const(g, b), is_runtime(g, b)) {
                (true, true, _) => {
                    let r = rank(b).unwrap_or(0);
                    if r < 2 {
                        return Err("B is a 1-D constant (a dot product, left in float)".into());
                    }
                    t.activations = vec![0];
                    t.weight = Some(WeightSlot {
                        input: 1,
                        axes: Axes {
                            channel_axis: r - 1,
                            reduce_axis: r - 2,
                        },
                        transposed: false,
                    });
                }
                (true, false, true) => {
                    if let Some(v) = [a, b].into_iter().find(|v| reads_softmax(g, v, 4)) {
                        return Err(format!(
                            "'{v}' holds Softmax probabilities: 8-bit steps of 1/255 drop the \
                             small attention weights (1.6% of the mass in MiniLM), so the \
                             product stays float"
                        ));
                    }
                    t.activations = vec![0, 1]
                }
                _ => return Err("operands are neither activations nor a float constant B".into()),
            }
        }
        "Gather" => {
            if attr("axis") != 0 || !is_float_const(g, input(0)) || rank(input(0)) != Some(2) {
                return Err("only axis-0 lookups into a 2-D float table are quantized".into());
            }
            // An embedding table: one scale per row (block-wise: blocks along the row).
            t.weight = Some(WeightSlot {
                input: 0,
                axes: Axes {
                    channel_axis: 0,
                    reduce_axis: 1,
                },
                transposed: false,
            });
        }
        op => return Err(format!("{op} is not a quantizable op")),
    }
    for &k in &t.activations {
        if let Some(v) = g.value_info(input(k)) {
            if v.dtype.is_some_and(|d| d != DType::F32) {
                return Err(format!("input '{}' is {:?}, not float", input(k), v.dtype));
            }
        }
    }
    Ok(t)
}
