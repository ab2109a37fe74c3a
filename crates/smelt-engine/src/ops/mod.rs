//! Op implementations, one file per family. Each file has a `register` function adding its ops
//! to the registry; a new op goes next to its relatives and into that file's `register`.
//!
//! Every op is a plain function: it reads its node's attributes and its inputs and returns its
//! outputs. Errors name nothing themselves; the session adds the node's label.

pub mod attention;
pub mod elementwise;
pub mod fused;
pub mod layout;
pub mod misc;
pub mod nn;
pub mod quant;
pub mod reduce;
pub mod rnn;

use smelt_ir::Node;
use smelt_tensor::{bail, Result, Tensor};
use std::collections::HashMap;
use std::sync::OnceLock;

/// What an op sees besides its inputs.
pub struct OpCtx<'a> {
    pub node: &'a Node,
    /// The model's default-domain opset (op semantics change across versions).
    pub opset: i64,
}

impl OpCtx<'_> {
    pub fn int(&self, key: &str, default: i64) -> Result<i64> {
        Ok(self.node.attr_int(key)?.unwrap_or(default))
    }
    pub fn float(&self, key: &str, default: f32) -> Result<f32> {
        Ok(self.node.attr_float(key)?.unwrap_or(default))
    }
    pub fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        Ok(self.node.attr_ints(key)?.map(|v| v.to_vec()))
    }
    pub fn string(&self, key: &str, default: &str) -> Result<String> {
        Ok(self
            .node
            .attr_string(key)?
            .unwrap_or_else(|| default.to_string()))
    }
}

/// An op's forward function: inputs (None for omitted optional inputs) to outputs.
pub type OpFn = fn(&OpCtx, &[Option<&Tensor>]) -> Result<Vec<Tensor>>;

pub type Registry = HashMap<&'static str, OpFn>;

fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| {
        let mut r = Registry::new();
        attention::register(&mut r);
        elementwise::register(&mut r);
        fused::register(&mut r);
        layout::register(&mut r);
        misc::register(&mut r);
        nn::register(&mut r);
        quant::register(&mut r);
        reduce::register(&mut r);
        rnn::register(&mut r);
        r
    })
}

/// The implementation of `op_type` in `domain`, if smelt has one.
pub fn lookup(domain: &str, op_type: &str) -> Option<OpFn> {
    match domain {
        "" | "ai.onnx" => registry().get(op_type).copied(),
        "com.microsoft" | "ai.smelt" => registry()
            .get(format!("{domain}.{op_type}").as_str())
            .copied(),
        _ => None,
    }
}

/// Every registered op name (sorted), for `smelt inspect` and docs.
pub fn supported_ops() -> Vec<&'static str> {
    // The engine's own ops (`ai.smelt.*`) exist only inside sessions.
    let mut v: Vec<_> = registry()
        .keys()
        .copied()
        .filter(|k| !k.starts_with("ai.smelt."))
        .collect();
    v.sort_unstable();
    v
}

/// The `i`-th input, which the op requires.
pub fn input<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor> {
    match inputs.get(i).copied().flatten() {
        Some(t) => Ok(t),
        None => bail!(Invalid, "required input {i} is missing"),
    }
}

/// The `i`-th input if present.
pub fn opt_input<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
    inputs.get(i).copied().flatten()
}

/// Normalises a possibly negative axis against `rank`.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        bail!(Shape, "axis {axis} is out of range for rank {rank}");
    }
    Ok(a as usize)
}
