//! Raises a model's default-domain opset so that newer operator forms (per-axis and blocked
//! QuantizeLinear/DequantizeLinear, int4) can be added to it. Every node whose operator changed
//! meaning between the two versions is rewritten to the new form; a change the pass cannot
//! express exactly is refused with an error naming the node, never approximated.

use crate::{Attr, Dim, Graph, Model, Node, OpsetImport, Pass, PassRecord};
use indexmap::IndexMap;
use smelt_tensor::{DType, Error, Result, Tensor};
use std::collections::{HashMap, HashSet};
use std::fmt::Display;

/// The newest default-domain opset whose operator changes this pass knows.
pub const MAX_KNOWN_OPSET: i64 = 21;

/// Upgrades the default ONNX domain to opset `to` (no change when the model is already there).
/// Also raises the IR version to the one released with that opset.
pub struct UpgradeOpset {
    pub to: i64,
}

impl Pass for UpgradeOpset {
    fn name(&self) -> &'static str {
        "upgrade-opset"
    }

    fn run(&self, mut model: Model) -> Result<(Model, PassRecord)> {
        let mut rec = PassRecord::new(self.name());
        let from = model.onnx_opset();
        if from >= self.to {
            return Ok((model, rec));
        }
        if self.to > MAX_KNOWN_OPSET {
            return Err(Error::Unsupported(format!(
                "upgrade-opset knows ONNX operator changes up to opset {MAX_KNOWN_OPSET}, not {}",
                self.to
            )));
        }
        let mut names = HashSet::new();
        collect_names(&model.graph, &mut names);
        let mut cx = Cx {
            from,
            to: self.to,
            names,
            rec: &mut rec,
        };
        upgrade_graph(&mut cx, &mut model.graph, None)?;
        match model
            .opsets
            .iter_mut()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        {
            Some(o) => o.version = self.to,
            None => model.opsets.push(OpsetImport {
                domain: String::new(),
                version: self.to,
            }),
        }
        // New dtypes (int4 needs IR 10) and files readers check are tied to the IR version.
        let ir = min_ir_version(self.to);
        if model.ir_version < ir {
            rec.note(format!("IR version {} -> {ir}", model.ir_version));
            model.ir_version = ir;
        }
        rec.note(format!("default-domain opset {from} -> {}", self.to));
        Ok((model, rec))
    }
}

/// The IR version released together with each opset (onnx's version table).
fn min_ir_version(opset: i64) -> i64 {
    match opset {
        ..=8 => 3,
        9 => 4,
        10 => 5,
        11 => 6,
        12..=14 => 7,
        15..=18 => 8,
        19 | 20 => 9,
        _ => 10,
    }
}

/// The opset in which each default-domain operator (up to opset 21) first appeared. An op
/// used before that version is an experimental one whose meaning differs, and is refused.
#[rustfmt::skip]
const INTRODUCED: &[(i64, &[&str])] = &[
    (
        1,
        &[
        "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization",
        "Cast", "Ceil", "Clip", "Concat", "Constant", "Conv", "ConvTranspose",
        "DepthToSpace", "Div", "Dropout", "Elu", "Equal", "Exp", "Flatten", "Floor",
        "GRU", "Gather", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool",
        "Greater", "HardSigmoid", "Hardmax", "Identity", "If", "InstanceNormalization",
        "LRN", "LSTM", "LeakyRelu", "Less", "Log", "LogSoftmax", "Loop",
        "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "MaxRoiPool", "Mean",
        "Min", "Mul", "Neg", "Not", "Or", "PRelu", "Pad", "Pow", "RNN", "RandomNormal",
        "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Reciprocal",
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
        "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu",
        "Reshape", "Selu", "Shape", "Sigmoid", "Size", "Slice", "Softmax", "Softplus",
        "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh",
        "Tile", "TopK", "Transpose", "Unsqueeze", "Upsample", "Xor",
        ],
    ),
    (
        7,
        &[
        "Acos", "Asin", "Atan", "Cos", "Multinomial", "Sin", "Tan",
        ],
    ),
    (
        8,
        &[
        "Expand", "Scan",
        ],
    ),
    (
        9,
        &[
        "Acosh", "Asinh", "Atanh", "Compress", "ConstantOfShape", "Cosh", "Erf",
        "EyeLike", "IsNaN", "MaxUnpool", "MeanVarianceNormalization", "NonZero",
        "OneHot", "Scatter", "Shrink", "Sign", "Sinh", "TfIdfVectorizer", "Where",
        ],
    ),
    (
        10,
        &[
        "ConvInteger", "DequantizeLinear", "IsInf", "MatMulInteger", "Mod",
        "NonMaxSuppression", "QLinearConv", "QLinearMatMul", "QuantizeLinear", "Resize",
        "ReverseSequence", "RoiAlign", "StringNormalizer", "ThresholdedRelu",
        ],
    ),
    (
        11,
        &[
        "BitShift", "ConcatFromSequence", "CumSum", "Det", "DynamicQuantizeLinear",
        "GatherElements", "GatherND", "Range", "Round", "ScatterElements", "ScatterND",
        "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
        "SequenceInsert", "SequenceLength", "SplitToSequence", "Unique",
        ],
    ),
    (
        12,
        &[
        "Celu", "Einsum", "GreaterOrEqual", "LessOrEqual", "NegativeLogLikelihoodLoss",
        "SoftmaxCrossEntropyLoss",
        ],
    ),
    (
        14,
        &[
        "HardSwish", "Trilu",
        ],
    ),
    (
        15,
        &[
        "Bernoulli", "CastLike", "Optional", "OptionalGetElement", "OptionalHasElement",
        ],
    ),
    (
        16,
        &[
        "GridSample",
        ],
    ),
    (
        17,
        &[
        "BlackmanWindow", "DFT", "HammingWindow", "HannWindow", "LayerNormalization",
        "MelWeightMatrix", "STFT", "SequenceMap",
        ],
    ),
    (
        18,
        &[
        "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "CenterCropPad",
        "Col2Im", "GroupNormalization", "Mish",
        ],
    ),
    (
        19,
        &[
        "DeformConv",
        ],
    ),
    (
        20,
        &[
        "AffineGrid", "Gelu", "ImageDecoder", "RegexFullMatch", "StringConcat",
        "StringSplit",
        ],
    ),
];

fn introduced(op: &str) -> Option<i64> {
    INTRODUCED
        .iter()
        .find(|(_, ops)| ops.contains(&op))
        .map(|(v, _)| *v)
}

/// Every name used anywhere in the model (all scopes), so new names cannot shadow outer ones.
fn collect_names(g: &Graph, out: &mut HashSet<String>) {
    for v in g.inputs.iter().chain(&g.outputs).chain(&g.value_info) {
        out.insert(v.name.clone());
    }
    out.extend(g.initializers.keys().cloned());
    for n in &g.nodes {
        out.insert(n.name.clone());
        out.extend(n.inputs.iter().cloned());
        out.extend(n.outputs.iter().cloned());
        for sg in crate::subgraphs(n) {
            collect_names(sg, out);
        }
    }
}

struct Cx<'r> {
    from: i64,
    to: i64,
    names: HashSet<String>,
    rec: &'r mut PassRecord,
}

impl Cx<'_> {
    /// Whether the upgrade passes opset `v` (where some operator changed).
    fn crosses(&self, v: i64) -> bool {
        self.from < v && v <= self.to
    }

    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 1;
        while self.names.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        self.names.insert(name.clone());
        name
    }

    fn refuse(&self, n: &Node, why: impl Display) -> Error {
        Error::Unsupported(format!(
            "cannot upgrade {} from opset {} to {}: {why}",
            n.label(),
            self.from,
            self.to
        ))
    }
}

/// What is known about a value without running the model.
#[derive(Clone, Debug, Default)]
struct Info {
    dtype: Option<DType>,
    shape: Option<Vec<Dim>>,
}

impl Info {
    fn of_tensor(t: &Tensor) -> Info {
        Info {
            dtype: Some(t.dtype()),
            shape: Some(t.shape().iter().map(|&d| Dim::Fixed(d)).collect()),
        }
    }
    fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(Vec::len)
    }
    fn with_rank(dtype: Option<DType>, rank: Option<usize>) -> Info {
        Info {
            dtype,
            shape: rank.map(|r| vec![Dim::Unknown; r]),
        }
    }
}

/// Types, ranks and constant values visible from one graph (and its enclosing ones).
struct Scope<'a> {
    parent: Option<&'a Scope<'a>>,
    inits: &'a IndexMap<String, Tensor>,
    info: HashMap<String, Info>,
    /// Outputs of Constant nodes.
    consts: HashMap<String, Tensor>,
    /// Values this graph reads (node inputs, subgraph captures, graph outputs).
    used: HashSet<String>,
}

impl<'a> Scope<'a> {
    fn new(g: &'a Graph, nodes: &[Node], parent: Option<&'a Scope<'a>>) -> Scope<'a> {
        let mut info = HashMap::new();
        for v in g.inputs.iter().chain(&g.outputs).chain(&g.value_info) {
            info.insert(
                v.name.clone(),
                Info {
                    dtype: v.dtype,
                    shape: v.shape.clone(),
                },
            );
        }
        let mut used: HashSet<String> = g.outputs.iter().map(|o| o.name.clone()).collect();
        for n in nodes {
            used.extend(n.inputs.iter().filter(|i| !i.is_empty()).cloned());
            for sg in crate::subgraphs(n) {
                used.extend(sg.free_values());
            }
        }
        Scope {
            parent,
            inits: &g.initializers,
            info,
            consts: HashMap::new(),
            used,
        }
    }

    fn info(&self, name: &str) -> Info {
        if name.is_empty() {
            return Info::default();
        }
        if let Some(i) = self.info.get(name) {
            return i.clone();
        }
        if let Some(t) = self.inits.get(name) {
            return Info::of_tensor(t);
        }
        self.parent.map(|p| p.info(name)).unwrap_or_default()
    }

    fn dtype(&self, name: &str) -> Option<DType> {
        self.info(name).dtype
    }

    fn rank(&self, name: &str) -> Option<usize> {
        self.info(name).rank()
    }

    fn constant(&self, name: &str) -> Option<&Tensor> {
        if name.is_empty() {
            return None;
        }
        self.consts
            .get(name)
            .or_else(|| self.inits.get(name))
            .or_else(|| self.parent.and_then(|p| p.constant(name)))
    }

    /// Records what `n` (in its original form) tells about its outputs.
    fn learn(&mut self, n: &Node) {
        let infos = infer(n, self);
        for (o, new) in n.outputs.iter().zip(infos) {
            if o.is_empty() {
                continue;
            }
            let e = self.info.entry(o.clone()).or_default();
            if e.dtype.is_none() {
                e.dtype = new.dtype;
            }
            if e.shape.is_none() {
                e.shape = new.shape;
            }
        }
        if is_onnx(n) && n.op_type == "Constant" {
            if let (Some(o), Some(t)) = (n.outputs.first(), constant_value(n)) {
                self.consts.insert(o.clone(), t);
            }
        }
    }
}

fn is_onnx(n: &Node) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

fn constant_value(n: &Node) -> Option<Tensor> {
    match n.attrs.get_index(0)? {
        (_, Attr::Tensor(t)) => Some(t.clone()),
        (k, Attr::Float(v)) if k == "value_float" => Some(Tensor::scalar(*v)),
        (k, Attr::Int(v)) if k == "value_int" => Some(Tensor::scalar(*v)),
        (k, Attr::Floats(v)) if k == "value_floats" => {
            Tensor::from_vec(vec![v.len()], v.clone()).ok()
        }
        (k, Attr::Ints(v)) if k == "value_ints" => Tensor::from_vec(vec![v.len()], v.clone()).ok(),
        _ => None,
    }
}

/// Unary ops whose output has the input's dtype and shape.
#[rustfmt::skip]
const SAME_SHAPE: &[&str] = &[
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BatchNormalization", "Ceil",
    "Celu", "Clip", "Cos", "Cosh", "CumSum", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu",
    "GroupNormalization", "HardSigmoid", "HardSwish", "Hardmax", "Identity",
    "InstanceNormalization", "LRN", "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax",
    "LpNormalization", "MeanVarianceNormalization", "Mish", "Neg", "Reciprocal", "Relu", "Round",
    "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt",
    "Tan", "Tanh", "ThresholdedRelu",
];

/// Ops whose outputs keep the first input's dtype and rank.
#[rustfmt::skip]
const SAME_RANK: &[&str] = &[
    "AveragePool", "Concat", "Conv", "ConvTranspose", "DepthToSpace", "GlobalAveragePool",
    "GlobalLpPool", "GlobalMaxPool", "LpPool", "MaxPool", "Pad", "Resize", "ReverseSequence",
    "Scatter", "ScatterElements", "ScatterND", "Slice", "SpaceToDepth", "Split", "Tile",
    "Transpose", "Upsample",
];

#[rustfmt::skip]
const ARITH: &[&str] = &[
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Mod",
];
#[rustfmt::skip]
const COMPARE: &[&str] = &[
    "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor",
];

/// Integers from an attribute or, failing that, a constant input.
fn ints_of(n: &Node, attr: &str, input: usize, sc: &Scope) -> Option<Vec<i64>> {
    if let Some(Attr::Ints(v)) = n.attrs.get(attr) {
        return Some(v.clone());
    }
    sc.constant(n.inputs.get(input)?)?.to_i64_vec().ok()
}

fn cast_target(a: &Attr) -> Option<DType> {
    match a {
        Attr::Int(c) => DType::from_onnx(i32::try_from(*c).ok()?),
        Attr::String(s) => DType::from_onnx(legacy_type_code(&String::from_utf8_lossy(s))?),
        _ => None,
    }
}

/// Light forward type/rank inference for the outputs of `n`, enough to decide rewrites.
fn infer(n: &Node, sc: &Scope) -> Vec<Info> {
    let mut out = vec![Info::default(); n.outputs.len()];
    if out.is_empty() || !is_onnx(n) {
        return out;
    }
    let input = |i: usize| sc.info(n.inputs.get(i).map(String::as_str).unwrap_or(""));
    let x = input(0);
    let max_rank = || {
        let ranks: Option<Vec<usize>> = (0..n.inputs.len()).map(|i| input(i).rank()).collect();
        ranks.and_then(|r| r.into_iter().max())
    };
    let op = n.op_type.as_str();
    match op {
        "Constant" => {
            if let Some(t) = constant_value(n) {
                out[0] = Info::of_tensor(&t);
            }
        }
        _ if SAME_SHAPE.contains(&op) => out[0] = x,
        _ if SAME_RANK.contains(&op) => {
            let i = Info::with_rank(x.dtype, x.rank());
            out.iter_mut().for_each(|o| *o = i.clone());
        }
        _ if ARITH.contains(&op) => out[0] = Info::with_rank(x.dtype, max_rank()),
        _ if COMPARE.contains(&op) => out[0] = Info::with_rank(Some(DType::Bool), max_rank()),
        "Not" | "IsNaN" | "IsInf" => out[0] = Info::with_rank(Some(DType::Bool), x.rank()),
        "Cast" => {
            let to = n.attrs.get("to").and_then(cast_target);
            out[0] = Info::with_rank(to, x.rank());
        }
        "Shape" => out[0] = Info::with_rank(Some(DType::I64), Some(1)),
        "Size" => out[0] = Info::with_rank(Some(DType::I64), Some(0)),
        "Flatten" | "Gemm" => out[0] = Info::with_rank(x.dtype, Some(2)),
        "MatMul" => {
            let r = match (x.rank(), input(1).rank()) {
                (Some(a), Some(b)) if a >= 2 && b >= 2 => Some(a.max(b)),
                _ => None,
            };
            out[0] = Info::with_rank(x.dtype, r);
        }
        "Reshape" => {
            let r = ints_of(n, "shape", 1, sc).map(|s| s.len());
            out[0] = Info::with_rank(x.dtype, r);
        }
        "Squeeze" | "Unsqueeze" => {
            let r = match (x.rank(), ints_of(n, "axes", 1, sc)) {
                (Some(r), Some(a)) if op == "Unsqueeze" => Some(r + a.len()),
                (Some(r), Some(a)) if !a.is_empty() => r.checked_sub(a.len()),
                _ => None,
            };
            out[0] = Info::with_rank(x.dtype, r);
        }
        "Gather" => {
            let r = match (x.rank(), input(1).rank()) {
                (Some(a), Some(b)) if a >= 1 => Some(a + b - 1),
                _ => None,
            };
            out[0] = Info::with_rank(x.dtype, r);
        }
        "Where" => out[0] = Info::with_rank(input(1).dtype, max_rank()),
        _ if op.starts_with("Reduce") => {
            let keep = n.attr_int("keepdims").ok().flatten().unwrap_or(1) != 0;
            let r = if keep {
                x.rank()
            } else {
                match (x.rank(), ints_of(n, "axes", 1, sc)) {
                    (Some(r), Some(a)) if !a.is_empty() => r.checked_sub(a.len()),
                    _ => None,
                }
            };
            out[0] = Info::with_rank(x.dtype, r);
        }
        _ => {}
    }
    out
}

/// The names of TensorProto.DataType, which Cast-1 took as a string.
fn legacy_type_code(s: &str) -> Option<i32> {
    Some(match s.to_ascii_uppercase().as_str() {
        "FLOAT" => 1,
        "UINT8" => 2,
        "INT8" => 3,
        "UINT16" => 4,
        "INT16" => 5,
        "INT32" => 6,
        "INT64" => 7,
        "STRING" => 8,
        "BOOL" => 9,
        "FLOAT16" => 10,
        "DOUBLE" => 11,
        "UINT32" => 12,
        "UINT64" => 13,
        "BFLOAT16" => 16,
        _ => return None,
    })
}

fn upgrade_graph(cx: &mut Cx, g: &mut Graph, parent: Option<&Scope>) -> Result<()> {
    let nodes = std::mem::take(&mut g.nodes);
    let mut new_nodes = Vec::with_capacity(nodes.len());
    let mut new_inits = Vec::new();
    {
        let mut sc = Scope::new(g, &nodes, parent);
        for mut n in nodes {
            for a in n.attrs.values_mut() {
                match a {
                    Attr::Graph(sg) => upgrade_graph(cx, sg, Some(&sc))?,
                    Attr::Graphs(gs) => {
                        for sg in gs.iter_mut() {
                            upgrade_graph(cx, sg, Some(&sc))?;
                        }
                    }
                    _ => {}
                }
            }
            sc.learn(&n);
            if !is_onnx(&n) {
                new_nodes.push(n);
                continue;
            }
            let mut ed = Edit::default();
            let n = upgrade_node(cx, n, &sc, &mut ed)?;
            new_nodes.extend(ed.pre);
            new_nodes.push(n);
            new_nodes.extend(ed.post);
            new_inits.extend(ed.inits);
        }
    }
    g.nodes = new_nodes;
    g.initializers.extend(new_inits);
    Ok(())
}

/// Nodes to place around the rewritten node, and constants it now reads.
#[derive(Default)]
struct Edit {
    pre: Vec<Node>,
    post: Vec<Node>,
    inits: Vec<(String, Tensor)>,
}

fn base(n: &Node) -> String {
    if !n.name.is_empty() {
        n.name.clone()
    } else {
        n.outputs
            .first()
            .filter(|o| !o.is_empty())
            .cloned()
            .unwrap_or_else(|| n.op_type.clone())
    }
}

fn set_input(n: &mut Node, i: usize, name: String) {
    while n.inputs.len() <= i {
        n.inputs.push(String::new());
    }
    n.inputs[i] = name;
}

/// Adds `t` as a new initializer named after `n` and `what`; returns its name.
fn add_const(cx: &mut Cx, ed: &mut Edit, n: &Node, what: &str, t: Tensor) -> String {
    let name = cx.fresh(&format!("{}_{what}", base(n)));
    ed.inits.push((name.clone(), t));
    name
}

fn i64s(v: Vec<i64>) -> Result<Tensor> {
    Tensor::from_vec(vec![v.len()], v)
}

fn take_ints(n: &mut Node, key: &str) -> Result<Option<Vec<i64>>> {
    let v = n.attr_ints(key)?.map(<[i64]>::to_vec);
    n.attrs.shift_remove(key);
    Ok(v)
}

fn take_float(n: &mut Node, key: &str) -> Result<Option<f32>> {
    let v = n.attr_float(key)?;
    n.attrs.shift_remove(key);
    Ok(v)
}

fn take_int(n: &mut Node, key: &str) -> Result<Option<i64>> {
    let v = n.attr_int(key)?;
    n.attrs.shift_remove(key);
    Ok(v)
}

fn set_string(n: &mut Node, key: &str, v: &str) {
    n.attrs
        .insert(key.to_string(), Attr::String(v.as_bytes().to_vec()));
}

/// Moves an ints attribute to input `idx` as an int64 initializer; an empty or absent list
/// stays absent (the new input's absence means the same as the old default).
fn ints_attr_to_input(
    cx: &mut Cx,
    ed: &mut Edit,
    n: &mut Node,
    key: &str,
    idx: usize,
    notes: &mut Vec<String>,
) -> Result<bool> {
    match take_ints(n, key)? {
        Some(v) if !v.is_empty() => {
            let name = add_const(cx, ed, n, key, i64s(v)?);
            set_input(n, idx, name);
            notes.push(format!("{key} attribute -> input"));
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Rewrites one default-domain node for the target opset, noting each change in the record.
/// A version whose change is not handled below only added types or optional attributes with
/// backward-compatible defaults (checked against onnx's schema history up to opset 21).
fn upgrade_node(cx: &mut Cx, mut n: Node, sc: &Scope, ed: &mut Edit) -> Result<Node> {
    let Some(first) = introduced(&n.op_type) else {
        return Err(cx.refuse(
            &n,
            format!(
                "'{}' is not an ONNX operator known up to opset {MAX_KNOWN_OPSET}",
                n.op_type
            ),
        ));
    };
    if first > cx.from {
        return Err(cx.refuse(
            &n,
            format!(
                "'{}' only exists from opset {first}; this one is an older experimental op",
                n.op_type
            ),
        ));
    }
    let label = n.label();
    let mut notes: Vec<String> = Vec::new();
    if cx.crosses(6) && n.attrs.shift_remove("consumed_inputs").is_some() {
        notes.push("dropped legacy consumed_inputs".into());
    }
    let op = n.op_type.clone();
    match op.as_str() {
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "And" | "Or" | "Xor" | "Equal" | "Greater"
        | "Less"
            if cx.crosses(7) =>
        {
            legacy_broadcast(cx, &mut n, sc, ed, &mut notes)?
        }
        "Gemm" if cx.crosses(7) && n.attrs.contains_key("broadcast") => {
            n.attrs.shift_remove("broadcast");
            notes.push("dropped legacy broadcast (C broadcasts by default)".into());
        }
        "PRelu" if cx.crosses(7) => legacy_prelu(cx, &n, sc)?,
        "Concat" if cx.crosses(4) && !n.attrs.contains_key("axis") => {
            n.attrs.insert("axis".into(), Attr::Int(1));
            notes.push("made the old default axis=1 explicit".into());
        }
        "Reshape" if cx.crosses(5) => {
            let moved = ints_attr_to_input(cx, ed, &mut n, "shape", 1, &mut notes)?;
            if !moved && n.inputs.get(1).is_none_or(String::is_empty) {
                return Err(cx.refuse(&n, "it has no target shape"));
            }
        }
        "Cast" if cx.crosses(6) => {
            if let Some(Attr::String(s)) = n.attrs.get("to") {
                let s = String::from_utf8_lossy(s).into_owned();
                let Some(code) = legacy_type_code(&s) else {
                    return Err(cx.refuse(&n, format!("unknown target type '{s}'")));
                };
                n.attrs.insert("to".into(), Attr::Int(code as i64));
                notes.push(format!("to='{s}' -> {code}"));
            }
        }
        "Selu" if cx.crosses(6) => {
            // Opset 6 changed the defaults to more precise constants; keep the old ones.
            for (k, v) in [("alpha", 1.6732f32), ("gamma", 1.0507f32)] {
                if !n.attrs.contains_key(k) {
                    n.attrs.insert(k.into(), Attr::Float(v));
                    notes.push(format!("kept the opset-1 default {k}={v}"));
                }
            }
        }
        "BatchNormalization" => batch_norm(cx, &mut n, sc, &mut notes)?,
        "Dropout" => dropout(cx, &mut n, sc, ed, &mut notes)?,
        "Clip" if cx.crosses(11) => clip(cx, &mut n, sc, ed, &mut notes)?,
        "Pad" => pad(cx, &mut n, sc, ed, &mut notes)?,
        "Slice" if cx.crosses(10) => {
            let (Some(starts), Some(ends)) =
                (take_ints(&mut n, "starts")?, take_ints(&mut n, "ends")?)
            else {
                return Err(cx.refuse(&n, "starts/ends attributes are missing"));
            };
            let axes = take_ints(&mut n, "axes")?;
            let s = add_const(cx, ed, &n, "starts", i64s(starts)?);
            let e = add_const(cx, ed, &n, "ends", i64s(ends)?);
            set_input(&mut n, 1, s);
            set_input(&mut n, 2, e);
            if let Some(a) = axes {
                let a = add_const(cx, ed, &n, "axes", i64s(a)?);
                set_input(&mut n, 3, a);
            }
            notes.push("starts/ends/axes attributes -> inputs".into());
        }
        "TopK" if cx.crosses(10) => {
            let Some(k) = take_int(&mut n, "k")? else {
                return Err(cx.refuse(&n, "attribute k is missing"));
            };
            let kn = add_const(cx, ed, &n, "k", i64s(vec![k])?);
            set_input(&mut n, 1, kn);
            notes.push("k attribute -> input".into());
        }
        "Upsample" if cx.crosses(7) || cx.crosses(9) || cx.to >= 10 => {
            upsample(cx, &mut n, sc, ed, &mut notes)?
        }
        "Resize" => resize(cx, &mut n, sc, ed, &mut notes)?,
        "Scatter" if cx.to >= 11 => {
            n.op_type = "ScatterElements".into();
            notes.push("deprecated Scatter -> ScatterElements (same semantics)".into());
        }
        "Squeeze" | "Unsqueeze" if cx.crosses(13) => {
            let moved = ints_attr_to_input(cx, ed, &mut n, "axes", 1, &mut notes)?;
            if !moved && op == "Unsqueeze" && n.inputs.get(1).is_none_or(String::is_empty) {
                return Err(cx.refuse(&n, "it has no axes"));
            }
        }
        "Split" => split(cx, &mut n, sc, ed, &mut notes)?,
        "ReduceSum" if cx.crosses(13) => {
            ints_attr_to_input(cx, ed, &mut n, "axes", 1, &mut notes)?;
        }
        "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1" | "ReduceL2"
        | "ReduceLogSum" | "ReduceLogSumExp" | "ReduceSumSquare"
            if cx.crosses(18) =>
        {
            ints_attr_to_input(cx, ed, &mut n, "axes", 1, &mut notes)?;
        }
        "Softmax" | "LogSoftmax" | "Hardmax" if cx.crosses(13) => {
            softmax(cx, &mut n, sc, ed, &mut notes)?
        }
        "LpPool" | "GlobalLpPool" if cx.crosses(2) => {
            if let Some(Attr::Float(p)) = n.attrs.get("p") {
                let p = *p;
                if p.fract() != 0.0 || !p.is_finite() {
                    return Err(cx.refuse(
                        &n,
                        format!("p={p} is not an integer (required from opset 2)"),
                    ));
                }
                n.attrs.insert("p".into(), Attr::Int(p as i64));
                notes.push("p float -> int".into());
            }
        }
        "GRU" | "LSTM" | "RNN" if cx.crosses(7) && n.attrs.contains_key("output_sequence") => {
            n.attrs.shift_remove("output_sequence");
            notes.push("dropped output_sequence (outputs are optional instead)".into());
        }
        "Tile" if cx.crosses(6) => {
            return Err(cx.refuse(
                &n,
                "Tile-1 (tiles and axis inputs) has no direct later form",
            ));
        }
        "Scan" if cx.crosses(9) => {
            return Err(cx.refuse(&n, "Scan-8 (batch axis, sequence_lens) differs from Scan-9"));
        }
        "RoiAlign" if cx.crosses(16) && !n.attrs.contains_key("coordinate_transformation_mode") => {
            set_string(
                &mut n,
                "coordinate_transformation_mode",
                "output_half_pixel",
            );
            notes.push("kept the opset-10 coordinate mode output_half_pixel".into());
        }
        "DFT" if cx.crosses(20) => {
            let axis = take_int(&mut n, "axis")?.unwrap_or(1);
            let a = add_const(cx, ed, &n, "axis", Tensor::scalar(axis));
            set_input(&mut n, 2, a);
            notes.push(format!("axis={axis} attribute -> input"));
        }
        "GridSample" if cx.crosses(20) => {
            let mode = n.attr_string("mode")?;
            let new = match mode.as_deref() {
                Some("bilinear") => Some("linear"),
                Some("bicubic") => Some("cubic"),
                _ => None,
            };
            if let Some(m) = new {
                set_string(&mut n, "mode", m);
                notes.push(format!("mode renamed to '{m}'"));
            }
        }
        "GroupNormalization" if cx.crosses(21) => group_norm(cx, &mut n, sc, ed, &mut notes)?,
        _ => {}
    }
    if !notes.is_empty() {
        cx.rec.note(format!("{label}: {}", notes.join("; ")));
    }
    Ok(n)
}

/// An Unsqueeze of `value` in the target opset's form, placed before the node; returns its output.
fn unsqueeze(cx: &mut Cx, ed: &mut Edit, n: &Node, value: &str, axes: Vec<i64>) -> Result<String> {
    let out = cx.fresh(&format!("{value}_unsqueezed"));
    let name = cx.fresh(&format!("{}_unsqueeze", base(n)));
    let mut u = Node::new("Unsqueeze", &name, &[value], &[&out]);
    if cx.to >= 13 {
        let a = add_const(cx, ed, n, "unsqueeze_axes", i64s(axes)?);
        u.inputs.push(a);
    } else {
        u.attrs.insert("axes".into(), Attr::Ints(axes));
    }
    ed.pre.push(u);
    Ok(out)
}

/// Before opset 7, binary ops broadcast B onto A only with broadcast=1, aligned at `axis`
/// (default: the trailing dimensions). Numpy broadcasting aligns trailing dimensions, so an
/// explicit axis needs B padded with trailing 1s.
fn legacy_broadcast(
    cx: &mut Cx,
    n: &mut Node,
    sc: &Scope,
    ed: &mut Edit,
    notes: &mut Vec<String>,
) -> Result<()> {
    let bc = take_int(n, "broadcast")?;
    let axis = take_int(n, "axis")?;
    if bc.is_some() || axis.is_some() {
        notes.push("dropped legacy broadcast attributes".into());
    }
    let (Some(1..), Some(axis)) = (bc, axis) else {
        return Ok(());
    };
    let (a, b) = match (n.inputs.first(), n.inputs.get(1)) {
        (Some(a), Some(b)) => (a.clone(), b.clone()),
        _ => return Err(cx.refuse(n, "it needs two inputs")),
    };
    let (Some(ra), Some(rb)) = (sc.rank(&a), sc.rank(&b)) else {
        return Err(cx.refuse(
            n,
            format!(
                "broadcast at axis {axis} needs the ranks of '{a}' and '{b}', which are unknown"
            ),
        ));
    };
    let (ra, rb) = (ra as i64, rb as i64);
    let ax = if axis < 0 { axis + ra } else { axis };
    let trailing = ra - ax - rb;
    if ax < 0 || trailing < 0 {
        return Err(cx.refuse(
            n,
            format!("broadcast axis {axis} does not fit ranks {ra} and {rb}"),
        ));
    }
    if trailing > 0 {
        let u = unsqueeze(cx, ed, n, &b, (rb..rb + trailing).collect())?;
        n.inputs[1] = u;
        notes.push(format!("'{b}' unsqueezed to align at axis {ax}"));
    }
    Ok(())
}

/// PRelu before opset 7 did not define numpy broadcasting of the slope; accept only slopes
/// whose meaning is the same either way.
fn legacy_prelu(cx: &Cx, n: &Node, sc: &Scope) -> Result<()> {
    let slope = n.inputs.get(1).map(String::as_str).unwrap_or("");
    let single = sc.constant(slope).is_some_and(|t| t.numel() == 1)
        || sc
            .info(slope)
            .shape
            .is_some_and(|s| s.iter().all(|d| *d == Dim::Fixed(1)));
    let ranks_match =
        matches!((sc.rank(slope), sc.rank(&n.inputs[0])), (Some(a), Some(b)) if a == b || a >= 2);
    if single || ranks_match {
        Ok(())
    } else {
        Err(cx.refuse(
            n,
            format!("slope '{slope}' may broadcast differently before and after opset 7"),
        ))
    }
}

fn output_used(n: &Node, i: usize, sc: &Scope) -> bool {
    n.outputs
        .get(i)
        .is_some_and(|o| !o.is_empty() && sc.used.contains(o))
}

fn batch_norm(cx: &mut Cx, n: &mut Node, sc: &Scope, notes: &mut Vec<String>) -> Result<()> {
    if cx.crosses(7) && n.attrs.shift_remove("is_test").is_some() {
        notes.push("dropped is_test (inference semantics)".into());
    }
    if cx.crosses(9) && take_int(n, "spatial")? == Some(0) {
        return Err(cx.refuse(
            n,
            "spatial=0 (per-activation statistics) has no form from opset 9",
        ));
    }
    if cx.crosses(14) && n.outputs.len() > 1 {
        if (1..n.outputs.len()).any(|i| output_used(n, i, sc)) {
            return Err(cx.refuse(
                n,
                "its training-mode statistics outputs are used; their meaning changed in opset 14",
            ));
        }
        n.outputs.truncate(1);
        notes.push("dropped unused training-mode outputs".into());
    }
    Ok(())
}

fn dropout(
    cx: &mut Cx,
    n: &mut Node,
    sc: &Scope,
    ed: &mut Edit,
    notes: &mut Vec<String>,
) -> Result<()> {
    if cx.crosses(7) && n.attrs.shift_remove("is_test").is_some() {
        notes.push("dropped is_test (inference semantics)".into());
    }
    if cx.crosses(10) && n.outputs.len() > 1 && !n.outputs[1].is_empty() {
        // Before 10 the mask had the data's type and no defined inference value (runtimes
        // return ones or zeros); from 10 it is bool and all true.
        if output_used(n, 1, sc) {
            return Err(cx.refuse(
                n,
                "its mask output is read, and the mask's value and type changed in opset 10",
            ));
        }
        n.outputs.truncate(1);
        notes.push("dropped the unused mask output".into());
    }
    if cx.crosses(12) {
        if let Some(r) = take_float(n, "ratio")? {
            let name = add_const(cx, ed, n, "ratio", Tensor::scalar(r));
            set_input(n, 1, name);
            notes.push("ratio attribute -> input".into());
        }
    }
    Ok(())
}

fn clip(
    cx: &mut Cx,
    n: &mut Node,
    sc: &Scope,
    ed: &mut Edit,
    notes: &mut Vec<String>,
) -> Result<()> {
    let lo = take_float(n, "min")?;
    let hi = take_float(n, "max")?;
    // Opsets 6-10 default to the float range (so infinities are clamped); opset 1 had no bound.
    let (lo, hi) = if cx.from >= 6 {
        (lo.or(Some(-f32::MAX)), hi.or(Some(f32::MAX)))
    } else {
        (lo, hi)
    };
    if lo.is_none() && hi.is_none() {
        return Ok(());
    }
    let Some(dt) = sc.dtype(&n.inputs[0]) else {
        return Err(cx.refuse(
            n,
            format!(
                "the element type of '{}' is unknown, so min/max cannot become inputs",
                n.inputs[0]
            ),
        ));
    };
    for (i, v, what) in [(1, lo, "min"), (2, hi, "max")] {
        if let Some(v) = v {
            let name = add_const(cx, ed, n, what, Tensor::scalar(v).cast(dt)?);
            set_input(n, i, name);
        }
    }
    notes.push("min/max attributes -> inputs".into());
    Ok(())
}

fn pad(
    cx: &mut Cx,
    n: &mut Node,
    sc: &Scope,
    ed: &mut Edit,
    notes: &mut Vec<String>,
) -> Result<()> {
    if cx.crosses(2) {
        if let Some(p) = n.attrs.shift_remove("paddings") {
            n.attrs.insert("pads".into(), p);
            notes.push("paddings renamed pads".into());
        }
    }
    if !cx.crosses(11) {
        return Ok(());
    }
    let Some(pads) = take_ints(n, "pads")? else {
        return Err(cx.refuse(n, "attribute pads is missing"));
    };
    let p = add_const(cx, ed, n, "pads", i64s(pads)?);
    set_input(n, 1, p);
    let value = take_float(n, "value")?;
    let constant = n.attr_string("mode")?.is_none_or(|m| m == "constant");
    if let Some(v) = value.filter(|v| *v != 0.0 && constant) {
        let Some(dt) = sc.dtype(&n.inputs[0]) else {
            return Err(cx.refuse(
                n,
                format!(
                    "the element type of '{}' is unknown, so value cannot become an input",
                    n.inputs[0]
                ),
            ));
        };
        let c = add_const(cx, ed, n, "value", Tensor::scalar(v).cast(dt)?);
        set_input(n, 2, c);
    }
    notes.push("pads/value attributes -> inputs".into());
    Ok(())
}

enum Scales {
    Known(Vec<f32>),
    Input(String),
}

fn upsample(
    cx: &mut Cx,
    n: &mut Node,
    sc: &Scope,
    ed: &mut Edit,
    notes: &mut Vec<String>,
) -> Result<()> {
    let mode = match n
        .attr_string("mode")?
        .unwrap_or_else(|| "nearest".into())
        .as_str()
    {
        "nearest" => "nearest",
        "linear" | "bilinear" => "linear",
        m => return Err(cx.refuse(n, format!("unknown mode '{m}'"))),
    };
    let scales = if let Some(h) = take_float(n, "height_scale")? {
        let Some(w) = take_float(n, "width_scale")? else {
            return Err(cx.refuse(n, "height_scale without width_scale"));
        };
        Scales::Known(vec![1.0, 1.0, h, w])
    } else if let Some(s) = n.attr_floats("scales")? {
        Scales::Known(s.to_vec())
    } else {
        match n.inputs.get(1).filter(|s| !s.is_empty()) {
            Some(s) => match sc.constant(s) {
                Some(t) => Scales::Known(t.to_f32_vec()?),
                None => Scales::Input(s.clone()),
            },
            None => return Err(cx.refuse(n, "it has no scales")),
        }
    };
    n.attrs.shift_remove("scales");
    n.attrs.shift_remove("width_scale");
    let x = n.inputs[0].clone();
    if cx.to < 9 {
        let Scales::Known(s) = scales else {
            return Err(cx.refuse(n, "computed scales cannot become an attribute"));
        };
        n.attrs.insert("scales".into(), Attr::Floats(s));
        n.inputs.truncate(1);
        set_string(n, "mode", mode);
        notes.push("scales as an attribute".into());
        return Ok(());
    }
    let scales = match scales {
        Scales::Known(s) => {
            if cx.to == 10 && s.iter().any(|&v| v < 1.0) {
                return Err(cx.refuse(n, "scales below 1 round differently in Resize-10"));
            }
            add_const(cx, ed, n, "scales", Tensor::from_vec(vec![s.len()], s)?)
        }
        Scales::Input(s) => s,
    };
    set_string(n, "mode", mode);
    if cx.to < 10 {
        n.inputs = vec![x, scales];
        notes.push("scales attribute -> input".into());
        return Ok(());
    }
    n.op_type = "Resize".into();
    if cx.to == 10 {
        n.inputs = vec![x, scales];
    } else {
        let roi = if cx.to >= 13 {
            String::new()
        } else {
            add_const(cx, ed, n, "roi", Tensor::from_vec::<f32>(vec![0], vec![])?)
        };
        n.inputs = vec![x, roi, scales];
        set_string(n, "coordinate_transformation_mode", "asymmetric");
        if mode == "nearest" {
            set_string(n, "nearest_mode", "floor");
        }
    }
    notes.push("deprecated Upsample -> Resize (asymmetric coordinates, floor rounding)".into());
    Ok(())
}

fn resize(
    cx: &mut Cx,
    n: &mut Node,
    sc: &Scope,
    ed: &mut Edit,
    notes: &mut Vec<String>,
) -> Result<()> {
    if cx.crosses(11) {
        let Some(scales) = n.inputs.get(1).filter(|s| !s.is_empty()).cloned() else {
            return Err(cx.refuse(n, "it has no scales"));
        };
        let mode = n.attr_string("mode")?.unwrap_or_else(|| "nearest".into());
        if mode == "nearest" {
            // Resize-10 rounds down when enlarging and up when shrinking, per axis.
            let Some(s) = sc.constant(&scales).and_then(|t| t.to_f32_vec().ok()) else {
                return Err(cx.refuse(
                    n,
                    "Resize-10 nearest rounding depends on scales only known at run time",
                ));
            };
            let rounding = if s.iter().all(|&v| v >= 1.0) {
                "floor"
            } else if s.iter().all(|&v| v <= 1.0) {
                "ceil"
            } else {
                return Err(cx.refuse(
                    n,
                    format!("scales {s:?} both enlarge and shrink, which needs two rounding modes"),
                ));
            };
            set_string(n, "nearest_mode", rounding);
        }
        let roi = if cx.to >= 13 {
            String::new()
        } else {
            add_const(cx, ed, n, "roi", Tensor::from_vec::<f32>(vec![0], vec![])?)
        };
        n.inputs = vec![n.inputs[0].clone(), roi, scales];
        set_string(n, "coordinate_transformation_mode", "asymmetric");
        notes.push("Resize-10 -> roi input, asymmetric coordinates".into());
    }
    if cx.crosses(13)
        && n.attr_string("coordinate_transformation_mode")?.as_deref()
            == Some("tf_half_pixel_for_nn")
    {
        return Err(cx.refuse(
            n,
            "coordinate mode tf_half_pixel_for_nn was removed in opset 13",
        ));
    }
    Ok(())
}

fn split(
    cx: &mut Cx,
    n: &mut Node,
    sc: &Scope,
    ed: &mut Edit,
    notes: &mut Vec<String>,
) -> Result<()> {
    let has_input = |n: &Node| n.inputs.get(1).is_some_and(|s| !s.is_empty());
    // Split-1 could take the lengths as a second input of the data's (float) type; opsets
    // 2-12 take them only as an attribute, 13 on as an int64 input.
    if cx.crosses(2) && has_input(n) {
        let lens = n.inputs[1].clone();
        let known = sc.constant(&lens).and_then(|t| {
            let f = t.to_f64_vec().ok()?;
            f.iter()
                .all(|v| v.fract() == 0.0 && *v >= 0.0)
                .then(|| f.iter().map(|&v| v as i64).collect::<Vec<i64>>())
        });
        match (known, cx.to >= 13) {
            (Some(v), false) => {
                n.attrs.insert("split".into(), Attr::Ints(v));
                n.inputs.truncate(1);
                notes.push("split input -> attribute".into());
            }
            (Some(v), true) => {
                let name = add_const(cx, ed, n, "split", i64s(v)?);
                n.inputs[1] = name;
                notes.push("split lengths -> int64".into());
            }
            (None, true) => {
                let out = cx.fresh(&format!("{lens}_int64"));
                let cast = cx.fresh(&format!("{}_split_cast", base(n)));
                ed.pre.push(
                    Node::new("Cast", &cast, &[&lens], &[&out]).with_attr("to", Attr::Int(7)),
                );
                n.inputs[1] = out;
                notes.push("split lengths cast to int64".into());
            }
            (None, false) => {
                return Err(cx.refuse(
                    n,
                    "computed split lengths cannot become an attribute before opset 13",
                ))
            }
        }
    }
    if cx.crosses(13) {
        ints_attr_to_input(cx, ed, n, "split", 1, notes)?;
    }
    if cx.crosses(18) && !has_input(n) && !n.attrs.contains_key("num_outputs") {
        let k = n.outputs.len() as i64;
        n.attrs.insert("num_outputs".into(), Attr::Int(k));
        notes.push(format!("equal split made explicit (num_outputs={k})"));
    }
    Ok(())
}

/// Before opset 13 the softmax family flattened the input to 2-D at `axis` and normalised
/// each row; from 13 it normalises along one axis. Same thing when `axis` is the last axis;
/// otherwise the old computation is spelled out: Flatten, op on axis 1, Reshape back.
fn softmax(
    cx: &mut Cx,
    n: &mut Node,
    sc: &Scope,
    ed: &mut Edit,
    notes: &mut Vec<String>,
) -> Result<()> {
    let axis = n.attr_int("axis")?.unwrap_or(1);
    let x = n.inputs.first().cloned().unwrap_or_default();
    let rank = sc.rank(&x);
    if axis == -1 || rank.is_some_and(|r| r >= 1 && axis == r as i64 - 1) {
        n.attrs.insert("axis".into(), Attr::Int(-1));
        notes.push("axis is the last one: same meaning".into());
        return Ok(());
    }
    let Some(y) = n.outputs.first().cloned() else {
        return Err(cx.refuse(n, "it has no output"));
    };
    if rank == Some(0) {
        return Err(cx.refuse(n, "a scalar input has no axis to normalise along"));
    }
    let b = base(n);
    let shape = cx.fresh(&format!("{b}_in_shape"));
    let flat = cx.fresh(&format!("{b}_2d"));
    let flat_out = cx.fresh(&format!("{b}_2d_out"));
    let shape_node = cx.fresh(&format!("{b}_shape"));
    let flatten_node = cx.fresh(&format!("{b}_flatten"));
    let reshape_node = cx.fresh(&format!("{b}_reshape"));
    ed.pre
        .push(Node::new("Shape", &shape_node, &[&x], &[&shape]));
    ed.pre.push(
        Node::new("Flatten", &flatten_node, &[&x], &[&flat]).with_attr("axis", Attr::Int(axis)),
    );
    n.inputs[0] = flat;
    n.outputs[0] = flat_out.clone();
    n.attrs.insert("axis".into(), Attr::Int(1));
    let mut r = Node::new("Reshape", &reshape_node, &[&flat_out, &shape], &[&y]);
    if cx.to >= 14 {
        // The target shape is exact: a 0 in it is an empty dimension, not "copy".
        r = r.with_attr("allowzero", Attr::Int(1));
    }
    ed.post.push(r);
    notes.push(format!(
        "2-D semantics at axis {axis} kept via Flatten + Reshape"
    ));
    Ok(())
}

/// GroupNormalization-18 took one scale/bias per group; 21 takes one per channel.
fn group_norm(
    cx: &mut Cx,
    n: &mut Node,
    sc: &Scope,
    ed: &mut Edit,
    notes: &mut Vec<String>,
) -> Result<()> {
    let Some(g) = n.attr_int("num_groups")? else {
        return Err(cx.refuse(n, "attribute num_groups is missing"));
    };
    let c = match sc.info(&n.inputs[0]).shape.as_deref() {
        Some([_, Dim::Fixed(c), ..]) => Some(*c as i64),
        _ => None,
    };
    if c == Some(g) {
        return Ok(());
    }
    let Some(c) = c.filter(|&c| g > 0 && c % g == 0) else {
        return Err(cx.refuse(
            n,
            "per-group scale/bias need the channel count, which is unknown",
        ));
    };
    let per = (c / g) as usize;
    for i in [1usize, 2] {
        let name = n.inputs.get(i).cloned().unwrap_or_default();
        let Some(t) = sc.constant(&name) else {
            return Err(cx.refuse(n, format!("per-group '{name}' is not a constant")));
        };
        if t.numel() as i64 != g {
            return Err(cx.refuse(
                n,
                format!("'{name}' has {} values for {g} groups", t.numel()),
            ));
        }
        let data = t.data().gather((0..c as usize).map(|ch| ch / per));
        let wide = Tensor::new(vec![c as usize], data)?;
        let what = if i == 1 {
            "scale_per_channel"
        } else {
            "bias_per_channel"
        };
        let new = add_const(cx, ed, n, what, wide);
        n.inputs[i] = new;
    }
    notes.push(format!(
        "scale/bias repeated from {g} groups to {c} channels"
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ValueInfo;

    fn model(opset: i64, nodes: Vec<Node>, inputs: Vec<ValueInfo>) -> Model {
        let outputs = nodes
            .last()
            .map(|n| {
                n.outputs
                    .iter()
                    .map(|o| ValueInfo {
                        name: o.clone(),
                        ..Default::default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        Model {
            ir_version: 3,
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: opset,
            }],
            graph: Graph {
                inputs,
                outputs,
                nodes,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn f32_input(name: &str, dims: &[usize]) -> ValueInfo {
        ValueInfo::new(
            name,
            DType::F32,
            dims.iter().map(|&d| Dim::Fixed(d)).collect(),
        )
    }

    fn up(m: Model, to: i64) -> Result<(Model, PassRecord)> {
        UpgradeOpset { to }.run(m)
    }

    fn init_i64(m: &Model, name: &str) -> Vec<i64> {
        m.graph.initializers[name].to_i64_vec().unwrap()
    }

    #[test]
    fn moves_axes_to_a_uniquely_named_input_and_sets_versions() {
        let sq = Node::new("Squeeze", "n", &["x"], &["y"]).with_attr("axes", Attr::Ints(vec![1]));
        let mut m = model(11, vec![sq], vec![f32_input("x", &[2, 1])]);
        // "n_axes" is taken, in a nested scope even: the new name must avoid it.
        m.graph.value_info.push(ValueInfo {
            name: "n_axes".into(),
            ..Default::default()
        });
        m.opsets = vec![];
        let (m, rec) = up(m, 21).unwrap();
        assert_eq!(m.onnx_opset(), 21);
        assert_eq!(m.ir_version, 10);
        let n = &m.graph.nodes[0];
        assert!(n.attrs.is_empty());
        assert_eq!(n.inputs, ["x", "n_axes_1"]);
        assert_eq!(init_i64(&m, "n_axes_1"), [1]);
        assert_eq!(m.graph.initializers["n_axes_1"].shape(), [1]);
        assert!(rec.changes[0].contains("Squeeze node 'n'"), "{rec:?}");
        // Already at the target: nothing changes.
        let (same, rec) = up(m.clone(), 13).unwrap();
        assert_eq!(same, m);
        assert!(rec.changes.is_empty());
    }

    #[test]
    fn softmax_last_axis_keeps_the_node_other_axes_get_flatten_and_reshape() {
        let sm = |axis: i64| {
            Node::new("Softmax", "s", &["x"], &["y"]).with_attr("axis", Attr::Int(axis))
        };
        let (m, _) = up(model(11, vec![sm(2)], vec![f32_input("x", &[2, 3, 4])]), 13).unwrap();
        assert_eq!(m.graph.nodes.len(), 1);
        assert_eq!(m.graph.nodes[0].attr_int("axis").unwrap(), Some(-1));

        for (to, allowzero) in [(13, None), (14, Some(1))] {
            let (m, _) = up(model(11, vec![sm(1)], vec![f32_input("x", &[2, 3, 4])]), to).unwrap();
            let ops: Vec<&str> = m.graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
            assert_eq!(ops, ["Shape", "Flatten", "Softmax", "Reshape"]);
            let [shape, flat, soft, reshape] = &m.graph.nodes[..] else {
                unreachable!()
            };
            assert_eq!(flat.attr_int("axis").unwrap(), Some(1));
            assert_eq!(soft.inputs, flat.outputs);
            assert_eq!(soft.attr_int("axis").unwrap(), Some(1));
            assert_eq!(
                reshape.inputs,
                [soft.outputs[0].clone(), shape.outputs[0].clone()]
            );
            assert_eq!(reshape.outputs, ["y"]);
            assert_eq!(reshape.attr_int("allowzero").unwrap(), allowzero);
            m.graph.topo_order().unwrap();
        }
    }

    #[test]
    fn legacy_broadcast_needs_ranks() {
        let add = Node::new("Add", "a", &["x", "b"], &["y"])
            .with_attr("broadcast", Attr::Int(1))
            .with_attr("axis", Attr::Int(1));
        let e = up(model(6, vec![add.clone()], vec![]), 21).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)));
        assert!(
            e.to_string()
                .contains("cannot upgrade Add node 'a' from opset 6 to 21"),
            "{e}"
        );
        let ins = vec![f32_input("x", &[2, 3, 4, 5]), f32_input("b", &[3])];
        let (m, _) = up(model(6, vec![add], ins), 21).unwrap();
        let [u, a] = &m.graph.nodes[..] else {
            panic!("{:?}", m.graph.nodes)
        };
        assert_eq!(u.op_type, "Unsqueeze");
        assert_eq!(init_i64(&m, &u.inputs[1]), [1, 2]);
        assert_eq!(a.inputs, ["x".to_string(), u.outputs[0].clone()]);
        assert!(a.attrs.is_empty());
        // Before 13 the Unsqueeze takes its axes as an attribute.
        let ins = vec![f32_input("x", &[2, 3, 4, 5]), f32_input("b", &[3])];
        let add = Node::new("Mul", "a", &["x", "b"], &["y"])
            .with_attr("broadcast", Attr::Int(1))
            .with_attr("axis", Attr::Int(-3));
        let (m, _) = up(model(6, vec![add], ins), 11).unwrap();
        assert_eq!(
            m.graph.nodes[0].attr_ints("axes").unwrap(),
            Some(&[1i64, 2][..])
        );
    }

    #[test]
    fn clip_bounds_take_the_data_type_and_old_defaults() {
        let clip = Node::new("Clip", "c", &["x"], &["y"]).with_attr("min", Attr::Float(-1.5));
        let e = up(model(10, vec![clip.clone()], vec![]), 21)
            .unwrap_err()
            .to_string();
        assert!(e.contains("element type of 'x' is unknown"), "{e}");
        let x = ValueInfo::new("x", DType::F16, vec![Dim::Fixed(2)]);
        let (m, _) = up(model(10, vec![clip.clone()], vec![x.clone()]), 21).unwrap();
        let n = &m.graph.nodes[0];
        let lo = &m.graph.initializers[&n.inputs[1]];
        let hi = &m.graph.initializers[&n.inputs[2]];
        assert_eq!((lo.dtype(), lo.shape()), (DType::F16, &[][..]));
        assert_eq!(lo.to_f64_vec().unwrap(), [-1.5]);
        // Opset 6-10 default max is FLT_MAX, which overflows to +inf in f16.
        assert_eq!(hi.to_f64_vec().unwrap(), [f64::INFINITY]);
        // Opset 1 had no default bound.
        let (m, _) = up(model(1, vec![clip], vec![x]), 21).unwrap();
        assert_eq!(m.graph.nodes[0].inputs.len(), 2);
    }

    #[test]
    fn small_legacy_fixes() {
        let selu = Node::new("Selu", "s", &["x"], &["y"])
            .with_attr("consumed_inputs", Attr::Ints(vec![0]));
        let (m, _) = up(model(1, vec![selu], vec![]), 21).unwrap();
        let n = &m.graph.nodes[0];
        assert_eq!(n.attr_float("alpha").unwrap(), Some(1.6732));
        assert_eq!(n.attr_float("gamma").unwrap(), Some(1.0507));
        assert!(!n.attrs.contains_key("consumed_inputs"));

        let cast =
            Node::new("Cast", "c", &["x"], &["y"]).with_attr("to", Attr::String(b"INT64".to_vec()));
        let (m, _) = up(model(5, vec![cast], vec![]), 21).unwrap();
        assert_eq!(m.graph.nodes[0].attr_int("to").unwrap(), Some(7));

        let split = || Node::new("Split", "p", &["x"], &["a", "b"]);
        let (m, _) = up(model(11, vec![split()], vec![]), 17).unwrap();
        assert!(!m.graph.nodes[0].attrs.contains_key("num_outputs"));
        let (m, _) = up(model(11, vec![split()], vec![]), 18).unwrap();
        assert_eq!(m.graph.nodes[0].attr_int("num_outputs").unwrap(), Some(2));

        let roi = Node::new("RoiAlign", "r", &["x", "b", "i"], &["y"]);
        let (m, _) = up(model(10, vec![roi], vec![]), 21).unwrap();
        let ctm = m.graph.nodes[0]
            .attr_string("coordinate_transformation_mode")
            .unwrap();
        assert_eq!(ctm.as_deref(), Some("output_half_pixel"));
    }

    #[test]
    fn batch_norm_training_outputs() {
        let bn =
            |outs: &[&str]| Node::new("BatchNormalization", "bn", &["x", "s", "b", "m", "v"], outs);
        let mut m = model(8, vec![bn(&["y", "mean", "var"])], vec![]);
        m.graph.outputs.truncate(1);
        let (m, rec) = up(m, 21).unwrap();
        assert_eq!(m.graph.nodes[0].outputs, ["y"]);
        assert!(rec.changes[0].contains("unused training-mode outputs"));
        let e = up(model(8, vec![bn(&["y", "mean"])], vec![]), 21)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("BatchNormalization node 'bn'") && e.contains("training"),
            "{e}"
        );
        let spatial = bn(&["y"]).with_attr("spatial", Attr::Int(0));
        assert!(up(model(8, vec![spatial], vec![]), 21).is_err());
        // Opset 9 already dropped spatial: a later upgrade does not look at it.
        let spatial = bn(&["y"]).with_attr("spatial", Attr::Int(0));
        assert!(up(model(9, vec![spatial], vec![]), 21).is_ok());
    }

    #[test]
    fn resize10_rounding_and_refusals() {
        let scales = |v: Vec<f32>| {
            let mut c = Node::new("Constant", "k", &[], &["s"]);
            c.attrs.insert(
                "value".into(),
                Attr::Tensor(Tensor::from_vec(vec![4], v).unwrap()),
            );
            c
        };
        let rs = Node::new("Resize", "r", &["x", "s"], &["y"]);
        for (v, want) in [
            (vec![1.0, 1.0, 2.0, 3.0], "floor"),
            (vec![1.0, 1.0, 0.5, 0.7], "ceil"),
        ] {
            let (m, _) = up(model(10, vec![scales(v), rs.clone()], vec![]), 21).unwrap();
            let n = &m.graph.nodes[1];
            assert_eq!(n.inputs, ["x", "", "s"]);
            assert_eq!(
                n.attr_string("nearest_mode").unwrap().as_deref(),
                Some(want)
            );
            assert_eq!(
                n.attr_string("coordinate_transformation_mode")
                    .unwrap()
                    .as_deref(),
                Some("asymmetric")
            );
        }
        // Resize-11/12 need an roi input; an empty one is given.
        let (m, _) = up(
            model(10, vec![scales(vec![1.0; 4]), rs.clone()], vec![]),
            12,
        )
        .unwrap();
        let roi = &m.graph.initializers[&m.graph.nodes[1].inputs[1]];
        assert_eq!(roi.shape(), [0]);
        let e = up(
            model(
                10,
                vec![scales(vec![1.0, 1.0, 2.0, 0.5]), rs.clone()],
                vec![],
            ),
            21,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("both enlarge and shrink"), "{e}");
        let tf = Node::new("Resize", "r", &["x", "roi", "s"], &["y"]).with_attr(
            "coordinate_transformation_mode",
            Attr::String(b"tf_half_pixel_for_nn".to_vec()),
        );
        assert!(up(model(11, vec![tf.clone()], vec![]), 21).is_err());
        assert!(up(model(11, vec![tf], vec![]), 12).is_ok());
    }

    #[test]
    fn loop_bodies_get_their_own_constants() {
        let body = Graph {
            inputs: vec![
                f32_input("i", &[]),
                f32_input("c", &[]),
                f32_input("acc", &[2, 3]),
            ],
            outputs: ["c", "r"]
                .iter()
                .map(|o| ValueInfo {
                    name: o.to_string(),
                    ..Default::default()
                })
                .collect(),
            nodes: vec![Node::new("ReduceSum", "rs", &["acc"], &["r"])
                .with_attr("axes", Attr::Ints(vec![0]))
                .with_attr("keepdims", Attr::Int(0))],
            ..Default::default()
        };
        let lp = Node::new("Loop", "loop", &["n", "", "x"], &["out"])
            .with_attr("body", Attr::Graph(Box::new(body)));
        let (m, rec) = up(model(11, vec![lp], vec![]), 13).unwrap();
        let Some(Attr::Graph(g)) = m.graph.nodes[0].attrs.get("body") else {
            panic!("body lost")
        };
        assert_eq!(g.nodes[0].inputs, ["acc", "rs_axes"]);
        assert_eq!(g.initializers["rs_axes"].to_i64_vec().unwrap(), [0]);
        assert!(m.graph.initializers.is_empty());
        assert!(rec
            .changes
            .iter()
            .any(|c| c.contains("ReduceSum node 'rs'")));
    }

    #[test]
    fn group_norm_needs_channels_and_constants() {
        let gn = Node::new("GroupNormalization", "g", &["x", "s", "b"], &["y"])
            .with_attr("num_groups", Attr::Int(2));
        let mut m = model(18, vec![gn.clone()], vec![f32_input("x", &[1, 4, 3])]);
        m.graph.initializers.insert(
            "s".into(),
            Tensor::from_vec(vec![2], vec![1.0f32, 2.0]).unwrap(),
        );
        m.graph.initializers.insert(
            "b".into(),
            Tensor::from_vec(vec![2], vec![3.0f32, 4.0]).unwrap(),
        );
        let (u, _) = up(m.clone(), 21).unwrap();
        let n = &u.graph.nodes[0];
        assert_eq!(
            u.graph.initializers[&n.inputs[1]].to_f32_vec().unwrap(),
            [1.0, 1.0, 2.0, 2.0]
        );
        assert_eq!(
            u.graph.initializers[&n.inputs[2]].to_f32_vec().unwrap(),
            [3.0, 3.0, 4.0, 4.0]
        );
        // The originals stay (another node may share them).
        assert_eq!(u.graph.initializers["s"].numel(), 2);
        m.graph.inputs[0].shape = None;
        let e = up(m, 21).unwrap_err().to_string();
        assert!(e.contains("channel count"), "{e}");
    }

    #[test]
    fn unknown_and_experimental_ops_are_refused() {
        let e = up(
            model(7, vec![Node::new("Crop", "c", &["x"], &["y"])], vec![]),
            13,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("Crop node 'c'") && e.contains("not an ONNX operator"),
            "{e}"
        );
        let thr = Node::new("ThresholdedRelu", "t", &["x"], &["y"]);
        assert!(up(model(9, vec![thr.clone()], vec![]), 13).is_err());
        assert!(up(model(10, vec![thr], vec![]), 13).is_ok());
        // Other domains are left alone.
        let mut ms = Node::new("FusedMatMul", "f", &["x"], &["y"]);
        ms.domain = "com.microsoft".into();
        assert!(up(model(7, vec![ms], vec![]), 13).is_ok());
        assert!(up(model(7, vec![], vec![]), 22).is_err());
    }
}
