//! Reverse-mode gradients over the graph: what fine-tuning needs from the engine.
//!
//! The forward pass is the ordinary [`Session`](crate::Session) run with the values backward
//! needs captured; [`backward`] then walks the nodes in reverse order and calls each op's
//! gradient function, which maps the gradients of a node's outputs to those of its inputs.
//! Gradient functions live by family next to this file, one registry like the forward ops'.
//! Every one is checked against finite differences in `tests/grad.rs`.

mod elementwise;
mod layout;
mod nn;
mod quant;
mod reduce;

use crate::ops::OpCtx;
use smelt_ir::Model;
use smelt_tensor::{bail, Result, Tensor};
use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

/// An op's gradient: from its inputs, its outputs and the gradients of its outputs (None where
/// nothing downstream depends on one) to the gradients of its inputs (None where an input is
/// not differentiable or not needed).
pub type GradFn =
    fn(&OpCtx, &[Option<&Tensor>], &[&Tensor], &[Option<&Tensor>]) -> Result<Vec<Option<Tensor>>>;

pub type GradRegistry = HashMap<&'static str, GradFn>;

fn registry() -> &'static GradRegistry {
    static REG: OnceLock<GradRegistry> = OnceLock::new();
    REG.get_or_init(|| {
        let mut r = GradRegistry::new();
        elementwise::register(&mut r);
        layout::register(&mut r);
        nn::register(&mut r);
        quant::register(&mut r);
        reduce::register(&mut r);
        r
    })
}

/// Op types with a gradient, sorted.
pub fn differentiable_ops() -> Vec<&'static str> {
    let mut v: Vec<_> = registry().keys().copied().collect();
    v.sort_unstable();
    v
}

/// Gradients of a scalar objective with respect to the values `wrt` (usually weights).
///
/// `values` holds the values of one forward run (inputs, intermediates and outputs; the
/// model's initializers are read from `model`, so a training loop need not copy its weights);
/// `seeds` the objective's gradient with respect to some of them (for a loss
/// computed outside the graph: d loss / d output). Nodes that no `wrt` value flows into are
/// skipped, so frozen parts of the model cost nothing.
pub fn backward(
    model: &Model,
    values: &HashMap<String, Tensor>,
    seeds: &[(String, Tensor)],
    wrt: &[String],
) -> Result<HashMap<String, Tensor>> {
    let g = &model.graph;
    let order = g.topo_order()?;
    let opset = model.onnx_opset();
    // Values that depend on a wrt value: only their gradients are needed.
    let mut live: HashSet<&str> = wrt.iter().map(String::as_str).collect();
    for &i in &order {
        let n = &g.nodes[i];
        if n.inputs.iter().any(|x| live.contains(x.as_str())) {
            live.extend(n.outputs.iter().map(String::as_str));
        }
    }
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in seeds {
        accumulate(&mut grads, name, t.clone())?;
    }
    let reg = registry();
    for &i in order.iter().rev() {
        let n = &g.nodes[i];
        if !n.outputs.iter().any(|o| grads.contains_key(o)) {
            continue;
        }
        if !n.inputs.iter().any(|x| live.contains(x.as_str())) {
            continue;
        }
        let Some(f) = reg.get(n.op_type.as_str()).filter(|_| n.domain.is_empty()) else {
            bail!(
                Unsupported,
                "{}: no gradient for op {} (differentiable ops: {})",
                n.label(),
                n.op_type,
                differentiable_ops().join(", ")
            );
        };
        let get = |name: &str| -> Result<&Tensor> {
            values
                .get(name)
                .or_else(|| g.initializers.get(name))
                .ok_or_else(|| {
                    smelt_tensor::Error::Invalid(format!(
                        "{}: value '{name}' was not kept by the forward run",
                        n.label()
                    ))
                })
        };
        let inputs: Vec<Option<&Tensor>> = n
            .inputs
            .iter()
            .map(|x| {
                if x.is_empty() {
                    Ok(None)
                } else {
                    get(x).map(Some)
                }
            })
            .collect::<Result<_>>()?;
        let outputs: Vec<&Tensor> = n.outputs.iter().map(|o| get(o)).collect::<Result<_>>()?;
        let dy: Vec<Option<&Tensor>> = n.outputs.iter().map(|o| grads.get(o)).collect();
        let ctx = OpCtx::new(n, opset);
        let dx = f(&ctx, &inputs, &outputs, &dy).map_err(|e| e.context(n.label()))?;
        for (x, d) in n.inputs.iter().zip(dx) {
            if let Some(d) = d {
                if live.contains(x.as_str()) {
                    accumulate(&mut grads, x, d)?;
                }
            }
        }
        // Free what no earlier node needs: gradients of this node's outputs.
        for o in &n.outputs {
            if !wrt.contains(o) {
                grads.remove(o);
            }
        }
    }
    Ok(wrt
        .iter()
        .filter_map(|w| grads.remove(w).map(|t| (w.clone(), t)))
        .collect())
}

/// The values a forward run must keep for [`backward`] to differentiate with respect to
/// `wrt`: the inputs and outputs of every node a `wrt` value flows through (initializers
/// aside, which backward reads from the model). Capturing only these, rather than every
/// value, is what keeps training's memory to what backward needs.
pub fn needed_values(model: &Model, wrt: &[String]) -> Result<Vec<String>> {
    let g = &model.graph;
    let mut live: HashSet<&str> = wrt.iter().map(String::as_str).collect();
    let mut needed: Vec<String> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for i in g.topo_order()? {
        let n = &g.nodes[i];
        if !n.inputs.iter().any(|x| live.contains(x.as_str())) {
            continue;
        }
        live.extend(n.outputs.iter().map(String::as_str));
        for v in n.inputs.iter().chain(&n.outputs) {
            if !v.is_empty() && !g.initializers.contains_key(v) && seen.insert(v) {
                needed.push(v.clone());
            }
        }
    }
    Ok(needed)
}

fn accumulate(grads: &mut HashMap<String, Tensor>, name: &str, d: Tensor) -> Result<()> {
    match grads.get_mut(name) {
        Some(acc) => {
            if acc.shape() != d.shape() {
                bail!(
                    Shape,
                    "gradients of '{name}' disagree in shape: {:?} vs {:?}",
                    acc.shape(),
                    d.shape()
                );
            }
            let a = acc.as_mut_slice::<f32>()?;
            for (x, y) in a.iter_mut().zip(d.as_slice::<f32>()?) {
                *x += y;
            }
        }
        None => {
            grads.insert(name.to_string(), d);
        }
    }
    Ok(())
}

/// `d` (shaped like a broadcast result) summed down to `shape`: the gradient of an operand
/// that was broadcast.
pub(crate) fn reduce_to(d: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if d.shape() == shape {
        return Ok(d.clone());
    }
    let out_shape = d.shape();
    let strides = smelt_tensor::broadcast_strides(shape, out_shape);
    let n: usize = shape.iter().product();
    let mut acc = vec![0f32; n];
    let src = d.as_slice::<f32>()?;
    let rank = out_shape.len();
    let mut idx = vec![0usize; rank];
    for &v in src {
        let mut off = 0;
        for k in 0..rank {
            off += idx[k] * strides[k];
        }
        acc[off] += v;
        for k in (0..rank).rev() {
            idx[k] += 1;
            if idx[k] < out_shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Tensor::from_vec(shape.to_vec(), acc)
}

/// The f32 data of a required tensor.
pub(crate) fn f32s(t: &Tensor) -> Result<&[f32]> {
    t.as_slice::<f32>().map_err(|_| {
        smelt_tensor::Error::Unsupported(format!(
            "gradients need float32 tensors, got {}",
            t.dtype()
        ))
    })
}
