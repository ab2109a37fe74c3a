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
    /// This node's slot for state derived from its constant inputs, kept across runs; only
    /// a session gives one.
    pub prepared: Option<&'a Prepared>,
    /// Recycled float buffers for outputs every element of which the op writes; only a
    /// session gives them.
    pub buffers: Option<&'a crate::buffers::Buffers>,
}

/// State an op derives once from inputs that cannot change between runs (weights packed for
/// a kernel), so each run skips that work. A session keeps one per node, knows which of the
/// node's inputs are its own initializers (not overridable by a feed), and empties every
/// slot when an initializer is replaced.
#[derive(Default)]
pub struct Prepared {
    /// Bit `i`: input `i` is a constant of the session.
    constant: u64,
    slot: OnceLock<Box<dyn std::any::Any + Send + Sync>>,
}

impl Prepared {
    pub fn new(node: &Node, is_constant: impl Fn(&str) -> bool) -> Prepared {
        let constant = node
            .inputs
            .iter()
            .take(64)
            .enumerate()
            .filter(|(_, n)| !n.is_empty() && is_constant(n))
            .fold(0u64, |m, (i, _)| m | 1 << i);
        Prepared {
            constant,
            slot: OnceLock::new(),
        }
    }

    /// Drops the derived state (an input it came from was replaced); the next run remakes it.
    pub fn clear(&mut self) {
        self.slot = OnceLock::new();
    }
}

impl<'a> OpCtx<'a> {
    pub fn new(node: &'a Node, opset: i64) -> OpCtx<'a> {
        OpCtx {
            node,
            opset,
            prepared: None,
            buffers: None,
        }
    }

    /// `n` floats for an output the op overwrites entirely: a recycled buffer when the
    /// session has one of that length (not cleared), else zeros.
    pub fn output_f32(&self, n: usize) -> Vec<f32> {
        match self.buffers {
            Some(b) => b.take(n),
            None => vec![0.0; n],
        }
    }

    /// The state `make` derives from inputs `from`, made on the first run and kept: `None`
    /// outside a session, when one of `from` is not a constant of the session, or when the
    /// slot already holds another type.
    pub fn prepared<T: std::any::Any + Send + Sync>(
        &self,
        from: &[usize],
        make: impl FnOnce() -> Result<T>,
    ) -> Result<Option<&'a T>> {
        let Some(p) = self.prepared else {
            return Ok(None);
        };
        if from.iter().any(|&i| i >= 64 || p.constant & (1 << i) == 0) {
            return Ok(None);
        }
        if p.slot.get().is_none() {
            let made: Box<dyn std::any::Any + Send + Sync> = Box::new(make()?);
            // Two threads may race to fill it; both made the same thing.
            let _ = p.slot.set(made);
        }
        Ok(p.slot.get().and_then(|b| b.downcast_ref::<T>()))
    }
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
