//! Structured pruning: whole channels, neurons and attention heads leave the graph.
//!
//! A channel cut from one layer must disappear everywhere it flows: from the BatchNorm after
//! it, both operands of a residual Add, the matching slice of a Concat, a depthwise conv's
//! groups, the rows a Flatten feeds into a Gemm, every consumer's input weights. As in DepGraph
//! (Fang et al., 2023), the coupled dimensions are found from the graph itself: starting at a
//! layer's output channels, [`build_group`] walks producers and consumers op by op, tracking
//! where the channels sit in each tensor, until the set is closed. An op whose rule is not
//! known, or that mixes channels (LayerNorm over them, a Softmax along them, a graph output),
//! refuses the group, naming the node. Slicing then shrinks every member, and the result is
//! checked by running it.

use crate::importance::{random_score, Criterion};
use serde::Serialize;
use smelt_ir::{Attr, Graph, Model, Node};
use smelt_tensor::{DType, Result, Tensor};
use std::collections::{HashMap, HashSet, VecDeque};

/// Where the group's channel `c` lies along one axis of a tensor: at indices
/// `offset + (o * channels + c) * unit + u` for `o < outer`, `u < unit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Map {
    pub offset: usize,
    pub outer: usize,
    pub unit: usize,
}

impl Map {
    fn indices(&self, channels: usize, c: usize) -> impl Iterator<Item = usize> + '_ {
        let m = *self;
        (0..m.outer).flat_map(move |o| {
            let start = m.offset + (o * channels + c) * m.unit;
            start..start + m.unit
        })
    }
}

/// One coupled dimension: `axis` of a runtime value, or of a constant that gets sliced.
#[derive(Clone, Debug, Serialize)]
pub struct Member {
    pub name: String,
    pub axis: usize,
    pub map: Map,
    pub constant: bool,
}

/// A closed set of coupled dimensions that lose the same channels.
#[derive(Clone, Debug, Serialize)]
pub struct Group {
    /// The layer whose output channels started the search.
    pub root: String,
    #[serde(skip)]
    pub root_node: usize,
    pub channels: usize,
    /// Elements per channel at the root (1, or the head size for attention heads).
    pub unit: usize,
    pub members: Vec<Member>,
    /// Depthwise Convs whose `group` attribute counts these channels, with their input's map.
    #[serde(skip)]
    depthwise: Vec<(usize, Map)>,
    /// Reshapes whose constant target shape holds a coupled dimension: (node, axis, map).
    #[serde(skip)]
    reshapes: Vec<(usize, usize, Map)>,
}

/// Why a group cannot be pruned: the node that stops it, and what a retry could use.
#[derive(Clone, Debug, Serialize)]
pub struct Refusal {
    pub root: String,
    pub node: String,
    pub reason: String,
    /// A Reshape split the channels into [n, d]: pruning in units of d (heads) may work.
    #[serde(skip)]
    pub unit_hint: Option<usize>,
}

type Shapes = HashMap<String, (DType, Vec<usize>)>;

struct Walk<'a> {
    g: &'a Graph,
    shapes: &'a Shapes,
    root: String,
    channels: usize,
    values: HashMap<(String, usize), Map>,
    params: HashMap<(String, usize), Map>,
    queue: VecDeque<(String, usize, Map)>,
    nodes_seen: HashSet<usize>,
    depthwise: Vec<(usize, Map)>,
    reshapes: Vec<(usize, usize, Map)>,
    graph_outputs: HashSet<&'a str>,
    opset: i64,
}

const UNARY: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "Clip",
    "Erf",
    "Gelu",
    "Elu",
    "Selu",
    "Softplus",
    "Softsign",
    "Mish",
    "Neg",
    "Abs",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Identity",
    "Dropout",
    "Cast",
    "IsNaN",
    "IsInf",
    "Not",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
];
const ELEMENTWISE: &[&str] = &[
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "And", "Or", "Equal",
    "Less", "Greater",
];
const POOLS: &[&str] = &[
    "MaxPool",
    "AveragePool",
    "LpPool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "GlobalLpPool",
];
const RESHAPES: &[&str] = &["Reshape", "Flatten", "Squeeze", "Unsqueeze"];

impl<'a> Walk<'a> {
    fn refuse(&self, ni: usize, reason: impl Into<String>) -> Refusal {
        Refusal {
            root: self.root.clone(),
            node: self.g.nodes[ni].label(),
            reason: reason.into(),
            unit_hint: None,
        }
    }

    fn shape(&self, ni: usize, v: &str) -> std::result::Result<&'a [usize], Refusal> {
        self.shapes
            .get(v)
            .map(|s| s.1.as_slice())
            .ok_or_else(|| self.refuse(ni, format!("no shape known for '{v}'")))
    }

    fn is_const(&self, v: &str) -> bool {
        self.g.initializers.contains_key(v)
    }

    /// Adds a coupled dimension of `v` (a value, or a constant to slice).
    fn push(
        &mut self,
        ni: usize,
        v: &str,
        axis: usize,
        map: Map,
    ) -> std::result::Result<(), Refusal> {
        if v.is_empty() {
            return Ok(());
        }
        let key = (v.to_string(), axis);
        let table = if self.is_const(v) {
            &mut self.params
        } else {
            &mut self.values
        };
        match table.get(&key) {
            Some(m) if *m == map => return Ok(()),
            Some(_) => {
                return Err(self.refuse(
                    ni,
                    format!("'{v}' axis {axis} is reached twice with different channel layouts"),
                ))
            }
            None => {}
        }
        table.insert(key, map);
        if !self.is_const(v) {
            if self.graph_outputs.contains(v) {
                return Err(self.refuse(
                    ni,
                    format!(
                        "the channels reach the model output '{v}', whose shape must not change"
                    ),
                ));
            }
            if self.g.inputs.iter().any(|i| i.name == v) {
                return Err(self.refuse(
                    ni,
                    format!(
                        "the channels reach the model input '{v}', whose shape must not change"
                    ),
                ));
            }
            self.queue.push_back((v.to_string(), axis, map));
        }
        Ok(())
    }

    fn run(&mut self) -> std::result::Result<(), Refusal> {
        while let Some((v, axis, map)) = self.queue.pop_front() {
            let mut nodes: Vec<usize> = self.g.producer(&v).into_iter().collect();
            nodes.extend(self.g.consumers(&v));
            for ni in nodes {
                self.nodes_seen.insert(ni);
                self.rule(ni, &v, axis, map)?;
            }
        }
        // A sliced constant must not be read by a node the channels never reach.
        for (name, _) in self.params.keys() {
            for c in self.g.consumers(name) {
                if !self.nodes_seen.contains(&c) {
                    return Err(self.refuse(
                        c,
                        format!("it shares the constant '{name}' with the pruned layers"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn rule(
        &mut self,
        ni: usize,
        v: &str,
        axis: usize,
        map: Map,
    ) -> std::result::Result<(), Refusal> {
        let n: &'a Node = &self.g.nodes[ni];
        if !n.domain.is_empty() && n.domain != "ai.onnx" {
            return Err(self.refuse(
                ni,
                format!("op {}::{} has no pruning rule", n.domain, n.op_type),
            ));
        }
        let op = n.op_type.as_str();
        let input = |k: usize| n.inputs.get(k).map(String::as_str).unwrap_or("");
        let out0 = n.outputs[0].as_str();
        let attr = |k: &str, d: i64| n.attr_int(k).ok().flatten().unwrap_or(d);
        match op {
            "Conv" => {
                let (x, w, b) = (input(0), input(1), input(2));
                if axis != 1 {
                    return Err(
                        self.refuse(ni, "the channels reach a spatial or batch axis of a Conv")
                    );
                }
                if !self.is_const(w) || (!b.is_empty() && !self.is_const(b)) {
                    return Err(self.refuse(ni, "its weight or bias is not a constant"));
                }
                let group = attr("group", 1) as usize;
                let (cin, cout) = (self.shape(ni, x)?[1], self.shape(ni, out0)?[1]);
                let depthwise = group > 1 && group == cin && cout == cin;
                if group > 1 && !depthwise {
                    return Err(self.refuse(
                        ni,
                        format!("grouped convolution (group {group}) other than depthwise"),
                    ));
                }
                if depthwise {
                    if !self.depthwise.iter().any(|d| d.0 == ni) {
                        self.depthwise.push((ni, map));
                    }
                    self.push(ni, x, 1, map)?;
                    self.push(ni, out0, 1, map)?;
                    self.push(ni, w, 0, map)?;
                    self.push(ni, b, 0, map)?;
                } else if v == x {
                    self.push(ni, w, 1, map)?;
                } else {
                    self.push(ni, w, 0, map)?;
                    self.push(ni, b, 0, map)?;
                }
            }
            "BatchNormalization" => {
                if axis != 1 {
                    return Err(
                        self.refuse(ni, "the channels reach a non-channel axis of BatchNorm")
                    );
                }
                self.push(ni, input(0), 1, map)?;
                self.push(ni, out0, 1, map)?;
                for k in 1..5 {
                    if !self.is_const(input(k)) {
                        return Err(self.refuse(ni, "its statistics are not constants"));
                    }
                    self.push(ni, input(k), 0, map)?;
                }
            }
            _ if UNARY.contains(&op) => {
                if v == input(0) {
                    self.push(ni, out0, axis, map)?;
                    if op == "PRelu" {
                        return self.broadcast_operands(ni, out0, axis, map);
                    }
                } else if v == out0 {
                    self.push(ni, input(0), axis, map)?;
                } else {
                    return Err(self.refuse(ni, "the channels reach a parameter input"));
                }
            }
            _ if ELEMENTWISE.contains(&op) => {
                let r_out = self.shape(ni, out0)?.len();
                let r_v = self.shape(ni, v)?.len();
                let a = if v == out0 { axis } else { axis + r_out - r_v };
                self.push(ni, out0, a, map)?;
                self.broadcast_operands(ni, out0, a, map)?;
            }
            _ if POOLS.contains(&op) => {
                if axis != 1 {
                    return Err(self.refuse(ni, "the channels reach a pooled axis"));
                }
                self.push(ni, input(0), 1, map)?;
                self.push(ni, out0, 1, map)?;
            }
            "Transpose" => {
                let r = self.shape(ni, input(0))?.len();
                let perm: Vec<usize> = match n.attr_ints("perm").ok().flatten() {
                    Some(p) => p.iter().map(|&p| p as usize).collect(),
                    None => (0..r).rev().collect(),
                };
                if v == input(0) {
                    let i = perm.iter().position(|&p| p == axis).unwrap_or(0);
                    self.push(ni, out0, i, map)?;
                } else {
                    self.push(ni, input(0), perm[axis], map)?;
                }
            }
            _ if RESHAPES.contains(&op) => {
                let (a, b) = (input(0), out0);
                let from_input = v == a;
                if !from_input && v != b {
                    return Err(self.refuse(ni, "the channels reach a shape input"));
                }
                let (src, dst) = if from_input { (a, b) } else { (b, a) };
                let (s_src, s_dst) = (self.shape(ni, src)?, self.shape(ni, dst)?);
                let (d_axis, d_map) = self.regroup(ni, s_src, s_dst, axis, map)?;
                self.push(ni, dst, d_axis, d_map)?;
                if op == "Reshape" {
                    let (out_axis, out_map) = if from_input {
                        (d_axis, d_map)
                    } else {
                        (axis, map)
                    };
                    self.reshapes.push((ni, out_axis, out_map));
                }
            }
            "Concat" => {
                let r = self.shape(ni, out0)?.len() as i64;
                let cat = attr("axis", 0).rem_euclid(r.max(1)) as usize;
                if axis != cat {
                    for k in 0..n.inputs.len() {
                        self.push(ni, input(k), axis, map)?;
                    }
                    self.push(ni, out0, axis, map)?;
                } else {
                    let mut off = 0;
                    let mut spans = Vec::new();
                    for k in 0..n.inputs.len() {
                        let d = self.shape(ni, input(k))?[cat];
                        spans.push((input(k), off, d));
                        off += d;
                    }
                    let width = map.outer * self.channels * map.unit;
                    if v == out0 {
                        let Some(&(x, o, _)) = spans
                            .iter()
                            .find(|(_, o, d)| map.offset >= *o && map.offset + width <= o + d)
                        else {
                            return Err(self.refuse(ni, "the channels span two inputs of a Concat"));
                        };
                        self.push(
                            ni,
                            x,
                            cat,
                            Map {
                                offset: map.offset - o,
                                ..map
                            },
                        )?;
                    } else {
                        if map.outer != 1 {
                            return Err(self.refuse(ni, "interleaved channels meet a Concat"));
                        }
                        let k = n.inputs.iter().position(|x| x == v).unwrap_or(0);
                        let o = spans[k].1;
                        self.push(
                            ni,
                            out0,
                            cat,
                            Map {
                                offset: map.offset + o,
                                ..map
                            },
                        )?;
                    }
                }
            }
            "Gemm" => {
                if attr("transA", 0) != 0 {
                    return Err(self.refuse(ni, "Gemm with transA=1"));
                }
                let t = attr("transB", 0) != 0;
                let (a, b, c) = (input(0), input(1), input(2));
                if !self.is_const(b) {
                    return Err(self.refuse(ni, "its B operand is not a constant"));
                }
                if axis != 1 {
                    return Err(self.refuse(ni, "the channels reach the batch axis of a Gemm"));
                }
                if v == a {
                    self.push(ni, b, usize::from(t), map)?;
                } else {
                    self.push(ni, b, usize::from(!t), map)?;
                    if !c.is_empty() {
                        let sc = self.shape(ni, c)?;
                        let n_out = self.shape(ni, out0)?[1];
                        if sc.last() == Some(&n_out) && n_out != 1 {
                            self.push(ni, c, sc.len() - 1, map)?;
                        }
                    }
                }
            }
            "MatMul" => self.matmul(ni, v, axis, map)?,
            "Softmax" | "LogSoftmax" => {
                let r = self.shape(ni, out0)?.len() as i64;
                let default = if self.opset >= 13 { -1 } else { 1 };
                let ax = attr("axis", default).rem_euclid(r.max(1)) as usize;
                if self.opset < 13 && ax != r as usize - 1 {
                    return Err(self.refuse(ni, "Softmax before opset 13 flattens its axes"));
                }
                if axis == ax {
                    return Err(self.refuse(ni, "it normalizes along the pruned channels"));
                }
                let other = if v == out0 { input(0) } else { out0 };
                self.push(ni, other, axis, map)?;
            }
            "LayerNormalization" => {
                let r = self.shape(ni, input(0))?.len() as i64;
                let ax = attr("axis", -1).rem_euclid(r.max(1)) as usize;
                if axis >= ax {
                    return Err(self.refuse(ni, "it normalizes over the pruned channels"));
                }
                let other = if v == out0 { input(0) } else { out0 };
                self.push(ni, other, axis, map)?;
            }
            // A shape read from a pruned tensor follows it: dynamic reshapes adapt by themselves,
            // and the result is verified by running the pruned model.
            "Shape" | "Size" => {}
            _ => {
                return Err(self.refuse(ni, format!("{op} has no channel-pruning rule")));
            }
        }
        Ok(())
    }

    /// Couples the operands of a broadcasting op with its output's axis `a`.
    fn broadcast_operands(
        &mut self,
        ni: usize,
        out: &str,
        a: usize,
        map: Map,
    ) -> std::result::Result<(), Refusal> {
        let n: &'a Node = &self.g.nodes[ni];
        let s_out = self.shape(ni, out)?;
        let full = s_out[a];
        for x in &n.inputs {
            if x.is_empty() {
                continue;
            }
            let s = self.shape(ni, x)?;
            let lead = s_out.len().saturating_sub(s.len());
            if a < lead {
                continue;
            }
            let d = s[a - lead];
            if d == full {
                self.push(ni, x, a - lead, map)?;
            } else if d != 1 {
                return Err(self.refuse(
                    ni,
                    format!("operand '{x}' does not broadcast along the channels"),
                ));
            }
        }
        Ok(())
    }

    fn matmul(
        &mut self,
        ni: usize,
        v: &str,
        axis: usize,
        map: Map,
    ) -> std::result::Result<(), Refusal> {
        let n: &'a Node = &self.g.nodes[ni];
        let (a, b, y) = (
            n.inputs[0].as_str(),
            n.inputs[1].as_str(),
            n.outputs[0].as_str(),
        );
        let (sa, sb, sy) = (self.shape(ni, a)?, self.shape(ni, b)?, self.shape(ni, y)?);
        let (ra, rb, r) = (sa.len(), sb.len(), sy.len());
        if ra < 2 || rb < 2 {
            return Err(self.refuse(ni, "MatMul with a 1-D operand"));
        }
        // Each operand axis in output coordinates (None: the contraction axis).
        let a_out = |k: usize| (k != ra - 1).then(|| k + r - ra);
        let b_out = |k: usize| {
            if k == rb - 2 {
                None
            } else if k == rb - 1 {
                Some(r - 1)
            } else {
                Some(k + r - rb)
            }
        };
        let out_axis = if v == y {
            Some(axis)
        } else if v == a {
            a_out(axis)
        } else {
            b_out(axis)
        };
        let Some(o) = out_axis else {
            // The contraction: A's last axis pairs with B's second to last.
            let (other, k) = if v == a { (b, rb - 2) } else { (a, ra - 1) };
            return self.push(ni, other, k, map);
        };
        self.push(ni, y, o, map)?;
        // Batch axes couple both operands (unless broadcast); rows belong to A, columns to B.
        if o == r - 1 {
            self.push(ni, b, rb - 1, map)?;
        } else if o == r - 2 {
            self.push(ni, a, ra - 2, map)?;
        } else {
            for (x, sx, rx) in [(a, sa, ra), (b, sb, rb)] {
                if o + rx >= r && sx[o + rx - r] == sy[o] {
                    self.push(ni, x, o + rx - r, map)?;
                }
            }
        }
        Ok(())
    }

    /// Where channels at `axis` of a tensor shaped `src` land after reshaping it to `dst`.
    fn regroup(
        &self,
        ni: usize,
        src: &[usize],
        dst: &[usize],
        axis: usize,
        map: Map,
    ) -> std::result::Result<(usize, Map), Refusal> {
        if map.offset != 0 {
            return Err(self.refuse(ni, "concatenated channels meet a reshape"));
        }
        let inner = |s: &[usize], k: usize| s[k + 1..].iter().product::<usize>();
        // In the flattened tensor the channel digit has stride `step` and `channels` values.
        let step = map.unit * inner(src, axis);
        for (b, &d) in dst.iter().enumerate() {
            let ib = inner(dst, b);
            if ib == 0 || !step.is_multiple_of(ib) {
                continue;
            }
            let unit = step / ib;
            if d % (unit * self.channels) == 0 {
                return Ok((
                    b,
                    Map {
                        offset: 0,
                        outer: d / (unit * self.channels),
                        unit,
                    },
                ));
            }
        }
        // The channels were split across axes, e.g. [.., heads * dim] -> [.., heads, dim].
        let mut refusal = self.refuse(
            ni,
            format!("it splits the channels across axes ({src:?} -> {dst:?})"),
        );
        if map.unit == 1 && map.outer == 1 && dst.len() > src.len() {
            let last = dst[dst.len() - 1];
            if last > 1 && self.channels.is_multiple_of(last) {
                refusal.unit_hint = Some(last);
            }
        }
        Err(refusal)
    }
}

/// The channel group rooted at the output of node `root` (a Conv, Gemm or MatMul), with
/// channels in units of `unit` elements.
pub fn build_group(
    model: &Model,
    shapes: &Shapes,
    root: usize,
    unit: usize,
) -> std::result::Result<Group, Refusal> {
    let g = &model.graph;
    let n = &g.nodes[root];
    let out = n.outputs[0].as_str();
    let label = n.label();
    let refusal = |reason: String| Refusal {
        root: label.clone(),
        node: label.clone(),
        reason,
        unit_hint: None,
    };
    let Some((_, s)) = shapes.get(out) else {
        return Err(refusal(format!("no shape known for '{out}'")));
    };
    let axis = if n.op_type == "Conv" {
        1
    } else {
        s.len().saturating_sub(1)
    };
    let width = s.get(axis).copied().unwrap_or(0);
    if unit == 0 || width % unit != 0 || width / unit < 2 {
        return Err(refusal(format!(
            "{width} output channels cannot be pruned in units of {unit}"
        )));
    }
    let mut w = Walk {
        g,
        shapes,
        root: label.clone(),
        channels: width / unit,
        values: HashMap::new(),
        params: HashMap::new(),
        queue: VecDeque::new(),
        nodes_seen: HashSet::new(),
        depthwise: Vec::new(),
        reshapes: Vec::new(),
        graph_outputs: g.outputs.iter().map(|o| o.name.as_str()).collect(),
        opset: model.onnx_opset(),
    };
    let map = Map {
        offset: 0,
        outer: 1,
        unit,
    };
    w.push(root, out, axis, map)?;
    w.run()?;
    let mut members: Vec<Member> = w
        .values
        .iter()
        .map(|((name, axis), map)| (name, *axis, *map, false))
        .chain(
            w.params
                .iter()
                .map(|((name, axis), map)| (name, *axis, *map, true)),
        )
        .map(|(name, axis, map, constant)| Member {
            name: name.clone(),
            axis,
            map,
            constant,
        })
        .collect();
    members.sort_by(|a, b| (a.constant, &a.name, a.axis).cmp(&(b.constant, &b.name, b.axis)));
    w.reshapes.sort();
    w.reshapes.dedup();
    Ok(Group {
        root: label,
        root_node: root,
        channels: w.channels,
        unit,
        members,
        depthwise: w.depthwise,
        reshapes: w.reshapes,
    })
}

/// Every prunable group of the model, and the refusals: one search per Conv/Gemm/MatMul with
/// a constant weight whose output is not already in a group. A search stopped by a Reshape
/// that splits channels into [n, d] is retried in units of d (attention heads).
pub fn find_groups(model: &Model, shapes: &Shapes) -> (Vec<Group>, Vec<Refusal>) {
    let g = &model.graph;
    let mut groups: Vec<Group> = Vec::new();
    let mut refusals = Vec::new();
    let mut covered: HashSet<String> = HashSet::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let weight_const = n
            .inputs
            .get(1)
            .is_some_and(|w| g.initializers.contains_key(w));
        if !matches!(n.op_type.as_str(), "Conv" | "Gemm" | "MatMul") || !weight_const {
            continue;
        }
        if covered.contains(&n.outputs[0]) {
            continue;
        }
        let mut result = build_group(model, shapes, i, 1);
        if let Err(Refusal {
            unit_hint: Some(u), ..
        }) = result
        {
            result = build_group(model, shapes, i, u);
        }
        match result {
            Ok(grp) => {
                // Two groups may share a constant along one axis only at disjoint indices.
                let clash = grp.members.iter().any(|m| {
                    m.constant
                        && groups.iter().any(|o| {
                            o.members.iter().any(|x| {
                                x.constant
                                    && x.name == m.name
                                    && x.axis == m.axis
                                    && overlap(x, o.channels, m, grp.channels)
                            })
                        })
                });
                if clash {
                    refusals.push(Refusal {
                        root: grp.root.clone(),
                        node: grp.root.clone(),
                        reason: "its weights are already sliced by another group".into(),
                        unit_hint: None,
                    });
                    continue;
                }
                covered.extend(
                    grp.members
                        .iter()
                        .filter(|m| !m.constant)
                        .map(|m| m.name.clone()),
                );
                groups.push(grp);
            }
            Err(r) => refusals.push(r),
        }
    }
    (groups, refusals)
}

fn overlap(a: &Member, ca: usize, b: &Member, cb: usize) -> bool {
    let ia: HashSet<usize> = (0..ca).flat_map(|c| a.map.indices(ca, c)).collect();
    (0..cb).any(|c| b.map.indices(cb, c).any(|i| ia.contains(&i)))
}

/// Channel importance within a group: the norm of every weight slice the channel owns,
/// summed over the group's weights (rank >= 2 constants; biases and norms excluded).
pub fn channel_scores(
    g: &Graph,
    grp: &Group,
    c: Criterion,
    given: Option<&crate::importance::Scores>,
) -> Result<Vec<f32>> {
    let mut scores = vec![0f64; grp.channels];
    if let Criterion::Random { seed } = c {
        return Ok((0..grp.channels)
            .map(|k| random_score(seed, &grp.root, k))
            .collect());
    }
    if c == Criterion::Wanda {
        smelt_tensor::bail!(
            Input,
            "activation-aware channel scores need the input norms: use activation_scores"
        );
    }
    for m in grp.members.iter().filter(|m| m.constant) {
        let t = &g.initializers[&m.name];
        if t.rank() < 2 || t.dtype() != DType::F32 {
            continue;
        }
        let w = match c {
            Criterion::Taylor => crate::importance::given_scores(given, &m.name, t.numel())?,
            _ => t.as_slice::<f32>()?,
        };
        let (d, inner) = (
            t.shape()[m.axis],
            t.shape()[m.axis + 1..].iter().product::<usize>(),
        );
        let mut per_index = vec![0f64; d];
        for (i, x) in w.iter().enumerate() {
            let x = *x as f64;
            per_index[(i / inner) % d] += if c == Criterion::L2 { x * x } else { x.abs() };
        }
        for (k, s) in scores.iter_mut().enumerate() {
            *s += m
                .map
                .indices(grp.channels, k)
                .map(|i| per_index[i])
                .sum::<f64>();
        }
    }
    Ok(scores
        .into_iter()
        .map(|s| {
            if c == Criterion::L2 {
                s.sqrt() as f32
            } else {
                s as f32
            }
        })
        .collect())
}

/// The `k` lowest-scored channels (ties broken by index).
pub fn lowest(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut out: Vec<usize> = idx.into_iter().take(k).collect();
    out.sort_unstable();
    out
}

/// Removes, for every `(group, cut)`, channels `cut` of the group from `model` (the graph the
/// groups were found in). All cuts along one axis of one tensor are applied together, since
/// groups may share a tensor at different offsets (the inputs of a Concat feeding one Conv).
pub fn remove_channels(model: &mut Model, cuts: &[(&Group, Vec<usize>)]) -> Result<()> {
    let g = &mut model.graph;
    let mut drops: HashMap<(String, usize), HashSet<usize>> = HashMap::new();
    let mut depthwise: HashMap<usize, usize> = HashMap::new();
    let mut reshapes: HashMap<(usize, usize), usize> = HashMap::new();
    let mut stale: HashSet<String> = HashSet::new();
    for (grp, cut) in cuts {
        if cut.len() >= grp.channels {
            smelt_tensor::bail!(Input, "{}: cannot remove every channel", grp.root);
        }
        for m in &grp.members {
            stale.insert(m.name.clone());
            if m.constant {
                let d = drops.entry((m.name.clone(), m.axis)).or_default();
                d.extend(cut.iter().flat_map(|&c| m.map.indices(grp.channels, c)));
            }
        }
        for &(ni, map) in &grp.depthwise {
            *depthwise.entry(ni).or_default() += cut.len() * map.outer * map.unit;
        }
        for &(ni, axis, map) in &grp.reshapes {
            *reshapes.entry((ni, axis)).or_default() += cut.len() * map.outer * map.unit;
        }
    }
    let mut keys: Vec<&(String, usize)> = drops.keys().collect();
    keys.sort();
    for key in keys {
        let t = &g.initializers[&key.0];
        let sliced = drop_indices(t, key.1, &drops[key])?;
        g.initializers.insert(key.0.clone(), sliced);
    }
    for (&ni, &removed) in &depthwise {
        let n = &mut g.nodes[ni];
        let groups = n.attr_int("group")?.unwrap_or(1) as usize;
        n.attrs
            .insert("group".into(), Attr::Int((groups - removed) as i64));
    }
    let mut rs: Vec<(&(usize, usize), &usize)> = reshapes.iter().collect();
    rs.sort();
    for (&(ni, axis), &removed) in rs {
        let Some(shape_name) = g.nodes[ni].inputs.get(1).cloned() else {
            continue;
        };
        let Some(t) = g.initializers.get(&shape_name) else {
            continue; // computed at run time: checked when the pruned model is verified
        };
        let mut dims = t.to_i64_vec()?;
        if axis >= dims.len() || dims[axis] <= 0 {
            continue; // -1 (inferred) or 0 (copied) follow the input by themselves
        }
        dims[axis] -= removed as i64;
        // The shape tensor may be shared: this Reshape gets its own.
        let name = g.unique_name(&format!("{shape_name}_pruned"));
        g.initializers
            .insert(name.clone(), Tensor::from_vec(vec![dims.len()], dims)?);
        g.nodes[ni].inputs[1] = name;
    }
    // Declared shapes of everything that shrank are stale (runtimes check them).
    g.value_info.retain(|v| !stale.contains(&v.name));
    g.remove_dead();
    Ok(())
}

/// `t` without indices `drop` along `axis`.
fn drop_indices(t: &Tensor, axis: usize, drop: &HashSet<usize>) -> Result<Tensor> {
    let d = t.shape()[axis];
    let keep_axis: Vec<usize> = (0..d).filter(|i| !drop.contains(i)).collect();
    let inner: usize = t.shape()[axis + 1..].iter().product();
    let outer: usize = t.shape()[..axis].iter().product();
    let idx = (0..outer).flat_map(|o| {
        keep_axis
            .iter()
            .flat_map(move |&i| ((o * d + i) * inner)..((o * d + i + 1) * inner))
    });
    let data = t.data().gather(idx);
    let mut shape = t.shape().to_vec();
    shape[axis] = keep_axis.len();
    Tensor::new(shape, data)
}

/// Where a group's channels are multiplied by a weight: the activation `value` (its channels on
/// `axis`) entering a Conv/Gemm/MatMul whose constant weight loses input slices `weight_axis`.
#[derive(Clone, Debug)]
pub struct Consumer {
    pub value: String,
    pub axis: usize,
    pub map: Map,
    pub weight: String,
    pub weight_axis: usize,
}

/// The consumers of a group's channels (depthwise convs excluded: they do not mix channels).
pub fn consumers(g: &Graph, grp: &Group) -> Vec<Consumer> {
    let mut out = Vec::new();
    for m in grp.members.iter().filter(|m| !m.constant) {
        for ni in g.consumers(&m.name) {
            let n = &g.nodes[ni];
            if n.inputs.first() != Some(&m.name) || n.inputs.len() < 2 {
                continue;
            }
            let w = &n.inputs[1];
            let depthwise = grp.depthwise.iter().any(|d| d.0 == ni);
            let weight_axis = match n.op_type.as_str() {
                "Conv" if !depthwise => 1,
                "Gemm" if n.attr_int("transB").ok().flatten().unwrap_or(0) != 0 => 1,
                "Gemm" | "MatMul" => 0,
                _ => continue,
            };
            let in_group = grp
                .members
                .iter()
                .any(|x| x.constant && &x.name == w && x.axis == weight_axis);
            if in_group {
                out.push(Consumer {
                    value: m.name.clone(),
                    axis: m.axis,
                    map: m.map,
                    weight: w.clone(),
                    weight_axis,
                });
            }
        }
    }
    out
}

/// Activation-aware channel importance (structured Wanda): for every place the channel is
/// multiplied by a weight, the L2 norm of the channel's activations over the calibration data
/// times the L2 norm of the weights it meets, summed. `norms` holds per-index activation norms
/// along each consumer's axis, keyed by value name.
pub fn activation_scores(
    g: &Graph,
    grp: &Group,
    cons: &[Consumer],
    norms: &HashMap<String, Vec<f32>>,
) -> Result<Vec<f32>> {
    let mut scores = vec![0f64; grp.channels];
    for c in cons {
        let Some(xn) = norms.get(&c.value) else {
            continue;
        };
        let t = &g.initializers[&c.weight];
        let w = t.as_slice::<f32>()?;
        let (d, inner) = (
            t.shape()[c.weight_axis],
            t.shape()[c.weight_axis + 1..].iter().product::<usize>(),
        );
        let mut wn = vec![0f64; d];
        for (i, x) in w.iter().enumerate() {
            wn[(i / inner) % d] += (*x as f64) * (*x as f64);
        }
        for (k, s) in scores.iter_mut().enumerate() {
            for i in c.map.indices(grp.channels, k) {
                let x = xn.get(i).copied().unwrap_or(0.0) as f64;
                *s += x * wn.get(i).copied().unwrap_or(0.0).sqrt();
            }
        }
    }
    Ok(scores.into_iter().map(|s| s as f32).collect())
}
