use crate::ops::{self, OpCtx, OpFn};
use smelt_ir::{Dim, Graph, Model, Node};
use smelt_tensor::{bail, Error, Result, Tensor};
use std::collections::{HashMap, HashSet};

/// What to return besides the graph outputs.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Intermediate values to hand back by name (activations for calibration, pruning, ...).
    pub capture: Vec<String>,
    /// Hand back every value the run computed.
    pub capture_all: bool,
}

/// A model prepared for execution: nodes in dependency order, each bound to its op.
pub struct Session {
    model: Model,
    plan: Vec<(usize, OpFn)>,
    /// For each value: the position in `plan` of its last reader, so memory is freed early.
    last_use: HashMap<String, usize>,
    opset: i64,
}

impl Session {
    /// Checks the graph (ordering, every op known) and plans the run.
    pub fn new(model: Model) -> Result<Session> {
        let opset = model.onnx_opset();
        let order = model.graph.topo_order()?;
        check_ops(&model.graph)?;
        let mut plan = Vec::with_capacity(order.len());
        let mut last_use = HashMap::new();
        for (pos, &i) in order.iter().enumerate() {
            let n = &model.graph.nodes[i];
            let f = ops::lookup(&n.domain, &n.op_type).expect("checked above");
            plan.push((i, f));
            for inp in n.inputs.iter().filter(|s| !s.is_empty()) {
                last_use.insert(inp.clone(), pos);
            }
        }
        Ok(Session {
            model,
            plan,
            last_use,
            opset,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn graph(&self) -> &Graph {
        &self.model.graph
    }

    /// Runs the model; returns the graph outputs in declaration order.
    pub fn run(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>> {
        let (outs, _) = self.run_with(inputs, &RunOptions::default())?;
        Ok(outs)
    }

    /// Runs the model; returns the graph outputs and the captured intermediate values.
    pub fn run_with(
        &self,
        inputs: &[(&str, Tensor)],
        opts: &RunOptions,
    ) -> Result<(Vec<(String, Tensor)>, HashMap<String, Tensor>)> {
        let g = &self.model.graph;
        let mut fed: HashMap<String, Tensor> = HashMap::new();
        for (name, t) in inputs {
            let Some(decl) = g.inputs.iter().find(|v| v.name == *name) else {
                bail!(Input, "the model has no input named '{name}'");
            };
            check_input(decl, t)?;
            fed.insert(name.to_string(), t.clone());
        }
        for v in g.runtime_inputs() {
            if !fed.contains_key(&v.name) {
                bail!(Input, "input '{}' was not given", v.name);
            }
        }
        let keep: HashSet<&str> = g
            .outputs
            .iter()
            .map(|o| o.name.as_str())
            .chain(opts.capture.iter().map(String::as_str))
            .collect();
        let mut captured = HashMap::new();
        let values = self.execute(g, fed, &keep, opts.capture_all, &mut captured)?;
        let mut outs = Vec::new();
        for o in &g.outputs {
            let t = values
                .get(&o.name)
                .or_else(|| g.initializers.get(&o.name))
                .ok_or_else(|| Error::Invalid(format!("output '{}' was not computed", o.name)))?;
            outs.push((o.name.clone(), t.clone()));
        }
        for c in &opts.capture {
            if let Some(t) = values.get(c).or_else(|| g.initializers.get(c)) {
                captured.insert(c.clone(), t.clone());
            } else if !captured.contains_key(c) {
                bail!(Input, "no value named '{c}' to capture");
            }
        }
        Ok((outs, captured))
    }

    fn execute(
        &self,
        g: &Graph,
        mut values: HashMap<String, Tensor>,
        keep: &HashSet<&str>,
        capture_all: bool,
        captured: &mut HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>> {
        for (pos, &(i, f)) in self.plan.iter().enumerate() {
            let node = &g.nodes[i];
            let outs = {
                let ins: Vec<Option<&Tensor>> = node
                    .inputs
                    .iter()
                    .map(|name| {
                        if name.is_empty() {
                            Ok(None)
                        } else {
                            values
                                .get(name)
                                .or_else(|| g.initializers.get(name))
                                .map(Some)
                                .ok_or_else(|| Error::Invalid(format!("value '{name}' is missing")))
                        }
                    })
                    .collect::<Result<_>>()
                    .map_err(|e| e.context(node.label()))?;
                let ctx = OpCtx {
                    node,
                    opset: self.opset,
                };
                f(&ctx, &ins).map_err(|e| e.context(node.label()))?
            };
            for (name, t) in node.outputs.iter().zip(outs) {
                if name.is_empty() {
                    continue;
                }
                if capture_all {
                    captured.insert(name.clone(), t.clone());
                }
                values.insert(name.clone(), t);
            }
            // Free values whose last reader has run, unless the caller wants them.
            for inp in &node.inputs {
                if self.last_use.get(inp) == Some(&pos) && !keep.contains(inp.as_str()) {
                    values.remove(inp);
                }
            }
        }
        Ok(values)
    }
}

/// Fails with the first node whose op smelt does not implement, naming it.
fn check_ops(g: &Graph) -> Result<()> {
    for n in &g.nodes {
        if ops::lookup(&n.domain, &n.op_type).is_none() {
            let dom = if n.domain.is_empty() {
                String::new()
            } else {
                format!(" (domain {})", n.domain)
            };
            bail!(
                Unsupported,
                "{}: op '{}'{dom} is not implemented",
                n.label(),
                n.op_type
            );
        }
    }
    Ok(())
}

fn check_input(decl: &smelt_ir::ValueInfo, t: &Tensor) -> Result<()> {
    if let Some(dt) = decl.dtype {
        if dt != t.dtype() {
            bail!(
                Shape,
                "input '{}' must be {}, got {}",
                decl.name,
                dt,
                t.dtype()
            );
        }
    }
    if let Some(shape) = &decl.shape {
        let ok = shape.len() == t.rank()
            && shape.iter().zip(t.shape()).all(|(d, &n)| match d {
                Dim::Fixed(f) => *f == n,
                _ => true,
            });
        if !ok {
            let want: Vec<String> = shape
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => n.to_string(),
                    Dim::Sym(s) => s.clone(),
                    Dim::Unknown => "?".into(),
                })
                .collect();
            bail!(
                Shape,
                "input '{}' must have shape [{}], got {:?}",
                decl.name,
                want.join(", "),
                t.shape()
            );
        }
    }
    Ok(())
}

/// Runs one node on given inputs (used by constant folding and tests).
pub(crate) fn run_node(node: &Node, opset: i64, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let Some(f) = ops::lookup(&node.domain, &node.op_type) else {
        bail!(Unsupported, "op '{}' is not implemented", node.op_type);
    };
    f(&OpCtx { node, opset }, inputs).map_err(|e| e.context(node.label()))
}
