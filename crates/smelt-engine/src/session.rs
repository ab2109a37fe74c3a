use crate::buffers::Buffers;
use crate::ops::{self, OpCtx, OpFn, Prepared};
use crate::passes::FoldConstants;
use smelt_ir::Pass;
use smelt_ir::{Dim, Graph, Model, Node};
use smelt_tensor::{bail, Error, Result, Tensor};
/// Maps keyed by value names, looked up several times per node on every run: a fast fixed hash
/// (SipHash was 3% of MNIST-8's batch-1 run; fixed, so iteration order does not vary).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::FixedState>;

/// Graph outputs by name, in declaration order.
pub type Outputs = Vec<(String, Tensor)>;
/// Intermediate values handed back on request, by name.
pub type Captured = std::collections::HashMap<String, Tensor>;

/// What to return besides the graph outputs.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Intermediate values to hand back by name (activations for calibration, pruning, ...).
    pub capture: Vec<String>,
    /// Hand back every value the run computed.
    pub capture_all: bool,
    /// Measure each node's wall time (see [`Session::take_profile`]).
    pub profile: bool,
}

/// A model prepared for execution: nodes in dependency order, each bound to its op.
pub struct Session {
    model: Model,
    plan: Vec<(usize, OpFn)>,
    /// Per entry of `plan`: what its op derived once from its constant inputs.
    prepared: Vec<Prepared>,
    /// For each value: the position in `plan` of its last reader, so memory is freed early.
    last_use: HashMap<String, usize>,
    opset: i64,
    /// Float buffers freed by one run, for the ops of the next (or of the same) to reuse.
    buffers: Buffers,
    /// Accumulated (op type -> seconds, calls) from profiled runs.
    profile: std::sync::Mutex<HashMap<String, (f64, usize)>>,
}

impl Session {
    /// Checks the graph (ordering, every op known) and plans the run. Constant subgraphs
    /// (e.g. int8 weights cast and scaled to f32) are evaluated once here, not on every run.
    /// QDQ patterns run on integer kernels (see [`crate::passes::FuseQdq`]), a written-out
    /// GELU as one op ([`crate::passes::FuseGelu`]), attention's masked softmax as one
    /// ([`crate::passes::FuseSoftmax`]), a float Conv takes its bias Add and ReLU
    /// ([`crate::passes::FuseConvRelu`]), a float MatMul its bias Add
    /// ([`crate::passes::FuseMatMulBias`]), and a LayerNorm snaps its own output onto a grid
    /// ([`crate::passes::SnapLayerNorm`]).
    pub fn new(model: Model) -> Result<Session> {
        Session::build(model, true, true)
    }

    /// Like [`Session::new`], but QDQ models run as the ONNX reference defines them, in float:
    /// every value of the graph exists (to capture it) and every node keeps its op.
    pub fn reference(model: Model) -> Result<Session> {
        Session::build(model, true, false)
    }

    /// A session whose every initializer stays one: nothing is folded, so a training loop
    /// can update weights that feed computation (a weight behind fake quantization).
    pub fn unfolded(model: Model) -> Result<Session> {
        Session::build(model, false, false)
    }

    fn build(model: Model, fold: bool, fuse: bool) -> Result<Session> {
        let opset = model.onnx_opset();
        model.graph.topo_order()?;
        check_ops(&model.graph)?;
        if let Some(n) = model.graph.nodes.iter().find(|n| n.domain == "ai.smelt") {
            bail!(
                Unsupported,
                "{}: the ai.smelt domain is internal to smelt's engine; no model file may use it",
                n.label()
            );
        }
        // Before folding, which would turn the int8 weights into float ones.
        let model = if fuse {
            let model = crate::passes::FuseGelu.run(model)?.0;
            let model = crate::passes::FuseQdq::default().run(model)?.0;
            let model = crate::passes::FuseSoftmax.run(model)?.0;
            let model = crate::passes::FuseConvRelu.run(model)?.0;
            let model = crate::passes::FuseMatMulBias.run(model)?.0;
            crate::passes::SnapLayerNorm.run(model)?.0
        } else {
            model
        };
        let model = if fold {
            // In memory only, so large folded tensors (a dequantized embedding table) are fine.
            FoldConstants {
                max_elements: 1 << 26,
            }
            .run(model)?
            .0
        } else {
            model
        };
        let order = model.graph.topo_order()?;
        let mut plan = Vec::with_capacity(order.len());
        let mut last_use = HashMap::default();
        for (pos, &i) in order.iter().enumerate() {
            let n = &model.graph.nodes[i];
            let f = ops::lookup(&n.domain, &n.op_type).unwrap_or(placeholder);
            plan.push((i, f));
            for inp in n.inputs.iter().filter(|s| !s.is_empty()) {
                last_use.insert(inp.clone(), pos);
            }
            // Values a subgraph captures from this scope are read by this node too.
            for g in smelt_ir::subgraphs(n) {
                for v in g.free_values() {
                    last_use.insert(v, pos);
                }
            }
        }
        let prepared = prepared_slots(&model.graph, &plan);
        Ok(Session {
            model,
            plan,
            prepared,
            last_use,
            opset,
            buffers: Buffers::default(),
            profile: Default::default(),
        })
    }

    /// Replaces a weight (an initializer) with a tensor of the same shape and type: how a
    /// training loop updates the model between steps without re-planning it.
    pub fn set_initializer(&mut self, name: &str, t: Tensor) -> Result<()> {
        let Some(old) = self.model.graph.initializers.get_mut(name) else {
            bail!(Input, "the model has no initializer '{name}'");
        };
        if old.shape() != t.shape() || old.dtype() != t.dtype() {
            bail!(
                Shape,
                "'{name}' is {:?} {}, the update {:?} {}",
                old.shape(),
                old.dtype(),
                t.shape(),
                t.dtype()
            );
        }
        *old = t;
        // State its readers derived from the old weight is stale.
        let g = &self.model.graph;
        for (p, &(i, _)) in self.prepared.iter_mut().zip(&self.plan) {
            if g.nodes[i].inputs.iter().any(|x| x == name) {
                p.clear();
            }
        }
        Ok(())
    }

    /// Time per op type over all profiled runs so far, slowest first: (op, seconds, calls).
    pub fn take_profile(&self) -> Vec<(String, f64, usize)> {
        let mut p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = p.drain().map(|(k, (t, n))| (k, t, n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn graph(&self) -> &Graph {
        &self.model.graph
    }

    /// How many layers run on integer kernels (QDQ patterns fused by `fuse-qdq`).
    pub fn integer_layers(&self) -> usize {
        self.graph()
            .nodes
            .iter()
            .filter(|n| crate::passes::is_integer_layer(n))
            .count()
    }

    /// Runs the model; returns the graph outputs in declaration order.
    pub fn run(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>> {
        let (outs, _) = self.run_with(inputs, &RunOptions::default())?;
        Ok(outs)
    }

    /// Runs the model on one batch of named inputs as the data loaders produce them.
    pub fn run_feed(&self, feed: &Feed) -> Result<Vec<(String, Tensor)>> {
        let inputs: Vec<(&str, Tensor)> =
            feed.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        self.run(&inputs)
    }

    /// Runs the model; returns the graph outputs and the captured intermediate values.
    pub fn run_with(
        &self,
        inputs: &[(&str, Tensor)],
        opts: &RunOptions,
    ) -> Result<(Outputs, Captured)> {
        let g = &self.model.graph;
        let mut fed: HashMap<String, Tensor> = HashMap::default();
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
        let mut captured = Captured::new();
        // The whole run goes to a worker of the thread pool: a parallel loop started from any
        // other thread hands its work to the pool and sleeps until a worker wakes and finishes
        // (tens of microseconds on a VM), and a small model has one such loop per layer (it
        // doubled MNIST-8's batch-1 latency on 2 threads). Started on a worker, a loop runs
        // in place and the other workers join in by stealing. With one thread the library
        // runs its loops serially and the hop would only add its own wake-up. Graphs with
        // subgraphs stay on the caller's stack (a worker's may be smaller). Callers running
        // sessions from several threads at once share the pool's workers: a worker waiting
        // in one run's loop may take up another caller's whole run first.
        let mut values = if rayon::current_num_threads() > 1
            && rayon::current_thread_index().is_none()
            && !g.has_subgraphs()
        {
            rayon::scope(|_| self.execute(g, fed, &keep, opts, &mut captured))?
        } else {
            self.execute(g, fed, &keep, opts, &mut captured)?
        };
        for c in &opts.capture {
            if let Some(t) = values.get(c).or_else(|| g.initializers.get(c)) {
                captured.insert(c.clone(), t.clone());
            } else if !captured.contains_key(c) {
                bail!(Input, "no value named '{c}' to capture");
            }
        }
        let mut outs = Vec::new();
        for (i, o) in g.outputs.iter().enumerate() {
            // Moved out unless a later output is the same value.
            let last = !g.outputs[i + 1..].iter().any(|p| p.name == o.name);
            let t = match values.get(&o.name) {
                Some(_) if last => values.remove(&o.name),
                Some(t) => Some(t.clone()),
                None => g.initializers.get(&o.name).cloned(),
            };
            let t =
                t.ok_or_else(|| Error::Invalid(format!("output '{}' was not computed", o.name)))?;
            outs.push((o.name.clone(), t));
        }
        for (_, t) in values {
            self.recycle(t);
        }
        Ok((outs, captured))
    }

    /// Hands a value's float buffer to the pool once nothing reads it.
    fn recycle(&self, t: Tensor) {
        if let smelt_tensor::Data::F32(v) = t.into_data() {
            self.buffers.give(v);
        }
    }

    /// Whether `node`'s first input is a computed value that no later node (nor the caller)
    /// reads, so the node may take it over.
    fn input_dies_here(
        &self,
        node: &Node,
        pos: usize,
        keep: &HashSet<&str>,
        values: &HashMap<String, Tensor>,
    ) -> bool {
        let Some(name) = node.inputs.first() else {
            return false;
        };
        !name.is_empty()
            && values.contains_key(name)
            && self.last_use.get(name) == Some(&pos)
            && !keep.contains(name.as_str())
            && !node.inputs[1..].contains(name)
    }

    fn execute(
        &self,
        g: &Graph,
        mut values: HashMap<String, Tensor>,
        keep: &HashSet<&str>,
        opts: &RunOptions,
        captured: &mut Captured,
    ) -> Result<HashMap<String, Tensor>> {
        let capture_all = opts.capture_all;
        // Initializers this run's feeds replace: what was prepared from them is not theirs.
        let replaced: HashSet<String> = (values.keys())
            .filter(|n| g.initializers.contains_key(*n))
            .cloned()
            .collect();
        for (pos, &(i, f)) in self.plan.iter().enumerate() {
            let node = &g.nodes[i];
            let prepared = (replaced.is_empty()
                || !node.inputs.iter().any(|n| replaced.contains(n)))
            .then(|| &self.prepared[pos]);
            let started = opts.profile.then(std::time::Instant::now);
            let view = if self.input_dies_here(node, pos, keep, &values) {
                let scope = Scope {
                    values: &values,
                    initializers: &g.initializers,
                    outer: None,
                };
                let ins = node_inputs(node, &scope)?;
                let ctx = OpCtx::new(node, self.opset);
                ops::layout::view_shape(&ctx, &ins)
                    .transpose()
                    .map_err(|e| e.context(node.label()))?
            } else {
                None
            };
            let outs = match view {
                // A reshape of a value nothing else reads: its buffer moves, no copy.
                Some(shape) => match values.remove(&node.inputs[0]) {
                    Some(t) => vec![t.reshape(shape).map_err(|e| e.context(node.label()))?],
                    None => bail!(Invalid, "value '{}' is missing", node.inputs[0]),
                },
                None => {
                    let scope = Scope {
                        values: &values,
                        initializers: &g.initializers,
                        outer: None,
                    };
                    let ctx = OpCtx {
                        prepared,
                        buffers: Some(&self.buffers),
                        ..OpCtx::new(node, self.opset)
                    };
                    run_one(&ctx, f, &scope)?
                }
            };
            if let Some(t0) = started {
                let mut p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
                let e = p.entry(node.op_type.clone()).or_default();
                e.0 += t0.elapsed().as_secs_f64();
                e.1 += 1;
            }
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
                    if let Some(t) = values.remove(inp) {
                        self.recycle(t);
                    }
                }
            }
        }
        Ok(values)
    }
}

/// Where a node finds its inputs: values computed so far, the graph's initializers, then the
/// enclosing graph's scope (subgraphs of If/Loop/Scan see their parents' values).
struct Scope<'a> {
    values: &'a HashMap<String, Tensor>,
    initializers: &'a indexmap::IndexMap<String, Tensor>,
    outer: Option<&'a Scope<'a>>,
}

impl Scope<'_> {
    fn get(&self, name: &str) -> Option<&Tensor> {
        self.values
            .get(name)
            .or_else(|| self.initializers.get(name))
            .or_else(|| self.outer.and_then(|o| o.get(name)))
    }
}

fn node_inputs<'a>(node: &Node, scope: &'a Scope) -> Result<Vec<Option<&'a Tensor>>> {
    node.inputs
        .iter()
        .map(|name| {
            if name.is_empty() {
                Ok(None)
            } else {
                scope
                    .get(name)
                    .map(Some)
                    .ok_or_else(|| Error::Invalid(format!("value '{name}' is missing")))
            }
        })
        .collect::<Result<_>>()
        .map_err(|e| e.context(node.label()))
}

/// One empty [`Prepared`] slot per planned node, marking which of its inputs are initializers.
/// IR < 4 files list every initializer as an input too (MNIST-8 does), and onnxruntime treats
/// them as constants there; smelt accepts a feed for one, and a run that has such a feed gives
/// its readers no prepared state (see [`Session::execute`]).
fn prepared_slots(g: &Graph, plan: &[(usize, OpFn)]) -> Vec<Prepared> {
    plan.iter()
        .map(|&(i, _)| Prepared::new(&g.nodes[i], |n| g.initializers.contains_key(n)))
        .collect()
}

fn run_one(ctx: &OpCtx, f: OpFn, scope: &Scope) -> Result<Vec<Tensor>> {
    let node = ctx.node;
    let ins = node_inputs(node, scope)?;
    let res = match node.op_type.as_str() {
        "If" | "Loop" | "Scan" if node.domain.is_empty() => {
            control_flow(node, ctx.opset, &ins, scope)
        }
        _ => f(ctx, &ins),
    };
    res.map_err(|e| e.context(node.label()))
}

/// Runs a subgraph with its formal inputs bound to `args`; returns its outputs in order.
fn run_subgraph(g: &Graph, opset: i64, args: Vec<Tensor>, outer: &Scope) -> Result<Vec<Tensor>> {
    let mut values = HashMap::default();
    for (v, t) in g.inputs.iter().zip(args) {
        values.insert(v.name.clone(), t);
    }
    let mut visible: std::collections::HashSet<String> = Default::default();
    let mut sc = Some(outer);
    while let Some(s) = sc {
        visible.extend(s.values.keys().cloned());
        visible.extend(s.initializers.keys().cloned());
        sc = s.outer;
    }
    let order = g.topo_order_with(&visible)?;
    for i in order {
        let node = &g.nodes[i];
        let f = ops::lookup(&node.domain, &node.op_type)
            .or_else(|| is_control_flow(node).then_some(placeholder as OpFn))
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "{}: op '{}' is not implemented",
                    node.label(),
                    node.op_type
                ))
            })?;
        let outs = {
            let scope = Scope {
                values: &values,
                initializers: &g.initializers,
                outer: Some(outer),
            };
            run_one(&OpCtx::new(node, opset), f, &scope)?
        };
        for (name, t) in node.outputs.iter().zip(outs) {
            if !name.is_empty() {
                values.insert(name.clone(), t);
            }
        }
    }
    g.outputs
        .iter()
        .map(|o| {
            values
                .get(&o.name)
                .or_else(|| g.initializers.get(&o.name))
                .or_else(|| outer.get(&o.name))
                .cloned()
                .ok_or_else(|| {
                    Error::Invalid(format!("subgraph output '{}' was not computed", o.name))
                })
        })
        .collect()
}

fn is_control_flow(n: &Node) -> bool {
    n.domain.is_empty() && matches!(n.op_type.as_str(), "If" | "Loop" | "Scan")
}

fn placeholder(_: &OpCtx, _: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    bail!(Unsupported, "control-flow op outside a session")
}

fn scalar_bool(t: &Tensor) -> Result<bool> {
    let v = t.cast(smelt_tensor::DType::Bool)?;
    match v.as_slice::<bool>()?.first() {
        Some(b) if v.numel() == 1 => Ok(*b),
        _ => bail!(
            Shape,
            "expected a single boolean, got shape {:?}",
            t.shape()
        ),
    }
}

fn control_flow(
    node: &Node,
    opset: i64,
    ins: &[Option<&Tensor>],
    scope: &Scope,
) -> Result<Vec<Tensor>> {
    let graph = |key: &str| {
        node.attr_graph(key)?
            .ok_or_else(|| Error::Invalid(format!("attribute '{key}' (a graph) is missing")))
    };
    match node.op_type.as_str() {
        "If" => {
            let cond = scalar_bool(ops::input(ins, 0)?)?;
            let g = graph(if cond { "then_branch" } else { "else_branch" })?;
            run_subgraph(g, opset, vec![], scope)
        }
        "Loop" => run_loop(node, opset, ins, scope, graph("body")?),
        "Scan" => run_scan(node, opset, ins, scope, graph("body")?),
        _ => unreachable!(),
    }
}

/// ONNX Loop: body(iter, cond, carried...) -> (cond, carried..., scan outputs...).
fn run_loop(
    _node: &Node,
    opset: i64,
    ins: &[Option<&Tensor>],
    scope: &Scope,
    body: &Graph,
) -> Result<Vec<Tensor>> {
    let max_trip = match ops::opt_input(ins, 0) {
        Some(t) => Some(t.to_i64_vec()?.first().copied().unwrap_or(0)),
        None => None,
    };
    let mut cond = match ops::opt_input(ins, 1) {
        Some(t) => scalar_bool(t)?,
        None => true,
    };
    let mut carried: Vec<Tensor> = ins
        .iter()
        .skip(2)
        .map(|t| {
            t.cloned()
                .ok_or_else(|| Error::Invalid("Loop carried value missing".into()))
        })
        .collect::<Result<_>>()?;
    let n_carried = carried.len();
    let n_scan = body.outputs.len().saturating_sub(1 + n_carried);
    let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); n_scan];
    let mut i: i64 = 0;
    const MAX_ITERS: i64 = 10_000_000;
    while cond && max_trip.is_none_or(|m| i < m) {
        if i >= MAX_ITERS {
            bail!(Limit, "Loop ran {MAX_ITERS} iterations without stopping");
        }
        let mut args = vec![Tensor::scalar(i), Tensor::scalar(cond)];
        args.extend(carried.iter().cloned());
        let outs = run_subgraph(body, opset, args, scope)?;
        if outs.len() != 1 + n_carried + n_scan {
            bail!(
                Invalid,
                "Loop body returned {} values, expected {}",
                outs.len(),
                1 + n_carried + n_scan
            );
        }
        let mut it = outs.into_iter();
        cond = scalar_bool(&it.next().unwrap())?;
        carried = it.by_ref().take(n_carried).collect();
        for (s, t) in scans.iter_mut().zip(it) {
            s.push(t);
        }
        i += 1;
    }
    let mut outs = carried;
    for (k, s) in scans.into_iter().enumerate() {
        outs.push(stack(s, body.outputs.get(1 + n_carried + k))?);
    }
    Ok(outs)
}

/// Stacks equally shaped tensors along a new leading axis.
fn stack(parts: Vec<Tensor>, decl: Option<&smelt_ir::ValueInfo>) -> Result<Tensor> {
    let Some(first) = parts.first() else {
        let dt = decl
            .and_then(|d| d.dtype)
            .unwrap_or(smelt_tensor::DType::F32);
        return Ok(Tensor::zeros(dt, vec![0]));
    };
    let mut shape = vec![parts.len()];
    shape.extend_from_slice(first.shape());
    let dt = first.dtype();
    for p in &parts {
        if p.shape() != first.shape() || p.dtype() != dt {
            bail!(
                Shape,
                "scan outputs differ in shape across iterations: {:?} vs {:?}",
                p.shape(),
                first.shape()
            );
        }
    }
    Tensor::new(shape, concat_data(&parts))
}

/// The elements of `parts` (all of one dtype) one after another.
fn concat_data(parts: &[Tensor]) -> smelt_tensor::Data {
    use smelt_tensor::Data;
    let mut out = Data::zeros(parts[0].dtype(), 0);
    macro_rules! ext {
        ($($v:ident),*) => {
            match &mut out {
                $(Data::$v(o) => for p in parts { if let Data::$v(x) = p.data() { o.extend_from_slice(x) } },)*
                Data::Str(o) => for p in parts { if let Data::Str(x) = p.data() { o.extend(x.iter().cloned()) } },
            }
        };
    }
    ext!(F32, F64, F16, BF16, I8, U8, I16, U16, I32, I64, U32, U64, Bool, I4, U4, I2, U2);
    out
}

/// Slices index `i` of `axis` out of `t` (dropping that axis).
fn take_along(t: &Tensor, axis: usize, i: usize) -> Result<Tensor> {
    let shape = t.shape();
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let len = shape[axis];
    let idx = (0..outer).flat_map(move |o| (0..inner).map(move |k| (o * len + i) * inner + k));
    let mut s = shape.to_vec();
    s.remove(axis);
    Tensor::new(s, t.data().gather(idx))
}

/// Moves the leading axis of `t` to position `axis`.
fn move_leading_axis(t: Tensor, axis: usize) -> Result<Tensor> {
    if axis == 0 {
        return Ok(t);
    }
    let shape = t.shape().to_vec();
    let n = shape[0];
    let mut out_shape = shape[1..].to_vec();
    out_shape.insert(axis, n);
    let inner: usize = shape[axis + 1..].iter().product();
    let mid: usize = shape[1..axis + 1].iter().product();
    // out[m, s, k] = in[s, m, k] for m over mid, s over n, k over inner.
    let idx = (0..mid).flat_map(move |m| {
        (0..n).flat_map(move |s| (0..inner).map(move |k| (s * mid + m) * inner + k))
    });
    let data = t.data().gather(idx);
    Tensor::new(out_shape, data)
}

/// ONNX Scan (opset 9+): state variables carried, scan inputs sliced along their axes.
fn run_scan(
    node: &Node,
    opset: i64,
    ins: &[Option<&Tensor>],
    scope: &Scope,
    body: &Graph,
) -> Result<Vec<Tensor>> {
    let n_scan_in =
        node.attr_int("num_scan_inputs")?
            .ok_or_else(|| Error::Invalid("Scan needs num_scan_inputs".into()))? as usize;
    if opset < 9 {
        bail!(Unsupported, "Scan before opset 9 (with a batch axis)");
    }
    let all: Vec<&Tensor> = ins
        .iter()
        .map(|t| t.ok_or_else(|| Error::Invalid("Scan input missing".into())))
        .collect::<Result<_>>()?;
    if n_scan_in > all.len() {
        bail!(
            Invalid,
            "Scan has {} inputs but num_scan_inputs = {n_scan_in}",
            all.len()
        );
    }
    let n_state = all.len() - n_scan_in;
    let in_axes = node
        .attr_ints("scan_input_axes")?
        .map(|v| v.to_vec())
        .unwrap_or_else(|| vec![0; n_scan_in]);
    let in_dirs = node
        .attr_ints("scan_input_directions")?
        .map(|v| v.to_vec())
        .unwrap_or_else(|| vec![0; n_scan_in]);
    let n_scan_out = body.outputs.len().saturating_sub(n_state);
    let out_axes = node
        .attr_ints("scan_output_axes")?
        .map(|v| v.to_vec())
        .unwrap_or_else(|| vec![0; n_scan_out]);
    let out_dirs = node
        .attr_ints("scan_output_directions")?
        .map(|v| v.to_vec())
        .unwrap_or_else(|| vec![0; n_scan_out]);
    let mut state: Vec<Tensor> = all[..n_state].iter().map(|t| (*t).clone()).collect();
    let scan_in = &all[n_state..];
    let axes: Vec<usize> = scan_in
        .iter()
        .enumerate()
        .map(|(k, t)| ops::norm_axis(in_axes.get(k).copied().unwrap_or(0), t.rank()))
        .collect::<Result<_>>()?;
    let Some(first) = scan_in.first() else {
        bail!(Invalid, "Scan has no scan inputs");
    };
    let len = first.shape()[axes[0]];
    let mut outs: Vec<Vec<Tensor>> = vec![Vec::new(); n_scan_out];
    for step in 0..len {
        let mut args = state.clone();
        for (k, t) in scan_in.iter().enumerate() {
            if t.shape()[axes[k]] != len {
                bail!(
                    Shape,
                    "Scan inputs have different lengths along their scan axes"
                );
            }
            let i = if in_dirs.get(k) == Some(&1) {
                len - 1 - step
            } else {
                step
            };
            args.push(take_along(t, axes[k], i)?);
        }
        let res = run_subgraph(body, opset, args, scope)?;
        let mut it = res.into_iter();
        state = it.by_ref().take(n_state).collect();
        for (o, t) in outs.iter_mut().zip(it) {
            o.push(t);
        }
    }
    let mut result = state;
    for (k, mut parts) in outs.into_iter().enumerate() {
        if out_dirs.get(k) == Some(&1) {
            parts.reverse();
        }
        let stacked = stack(parts, body.outputs.get(n_state + k))?;
        let axis = ops::norm_axis(out_axes.get(k).copied().unwrap_or(0), stacked.rank())?;
        result.push(move_leading_axis(stacked, axis)?);
    }
    Ok(result)
}

/// Fails with the first node whose op smelt does not implement, naming it.
fn check_ops(g: &Graph) -> Result<()> {
    for n in &g.nodes {
        if ops::lookup(&n.domain, &n.op_type).is_none() && !is_control_flow(n) {
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
    f(&OpCtx::new(node, opset), inputs).map_err(|e| e.context(node.label()))
}

/// Named model inputs for one run.
pub type Feed = Vec<(String, Tensor)>;

/// Runs `model` once per feed and hands `f` the batch index and the captured `values`: the
/// one loop that every data-driven step (calibration, smoothing, GPTQ, activation-aware
/// pruning) shares.
pub fn for_each_run(
    model: &Model,
    values: &[String],
    feeds: &[Feed],
    mut f: impl FnMut(usize, Captured) -> Result<()>,
) -> Result<()> {
    let session = Session::reference(model.clone())?;
    let opts = RunOptions {
        capture: values.to_vec(),
        ..Default::default()
    };
    for (b, feed) in feeds.iter().enumerate() {
        let inputs: Vec<(&str, Tensor)> =
            feed.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let (_, captured) = session
            .run_with(&inputs, &opts)
            .map_err(|e| e.context(format!("batch {} of {}", b + 1, feeds.len())))?;
        f(b, captured)?;
    }
    Ok(())
}
