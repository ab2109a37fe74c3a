//! `fuse-qdq`: runs a QDQ model on integer kernels instead of simulating it in float.
//!
//! A Conv, MatMul or Gemm whose input is `DequantizeLinear(QuantizeLinear(x))` and whose weight
//! is `DequantizeLinear(int8 constant)` becomes one `ai.smelt.QConv` / `ai.smelt.QMatMul` that
//! quantizes `x`, multiplies 8-bit values with i32 accumulation, and scales the sum back to
//! float. The weights are converted once, here. A QuantizeLinear / DequantizeLinear pair left
//! over (around pooling, before the model's end) becomes one `ai.smelt.FakeQuant` pass.
//!
//! On CPUs whose int8 kernel adds product pairs in 16 bits with saturation (x86 without VNNI),
//! a layer is fused only when its weights lie in [-64, 64], where the sum is exact (quantize
//! with `--reduce-range` to get such weights); other layers stay on the float path.

use crate::kernels::quant::int8_may_saturate;
use smelt_ir::{Graph, Model, Node, Pass, PassRecord};
use smelt_tensor::{DType, Data, Result, Tensor};

/// A convolution whose sums have fewer terms than this (MNIST-8's first layer: one input
/// channel, 5x5, 25 terms) stays in float: the 8-bit kernels pack and pad their operands for
/// long sums, and here the float kernel was faster at every batch size.
const MIN_INT8_DEPTH: usize = 32;

/// Whether `n` is a layer this pass put on integer kernels.
pub fn is_integer_layer(n: &Node) -> bool {
    n.domain == "ai.smelt" && matches!(n.op_type.as_str(), "QConv" | "QMatMul")
}

pub struct FuseQdq {
    /// Whether the int8 kernel may saturate (see the module doc); the CPU's answer by default.
    pub may_saturate: bool,
}

impl Default for FuseQdq {
    fn default() -> Self {
        FuseQdq {
            may_saturate: int8_may_saturate(),
        }
    }
}

impl Pass for FuseQdq {
    fn name(&self) -> &'static str {
        "fuse-qdq"
    }

    fn run(&self, mut model: Model) -> Result<(Model, PassRecord)> {
        let mut rec = PassRecord::new(self.name());
        let g = &mut model.graph;
        // Renaming values would hide them from If/Loop/Scan bodies that read them.
        if g.has_subgraphs() {
            rec.note("the graph has control flow: QDQ patterns stay as written");
            return Ok((model, rec));
        }
        let lifted = views_to_float(g)?;
        g.remove_dead();
        let mut fused = 0;
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            if !n.domain.is_empty() || !matches!(n.op_type.as_str(), "Conv" | "MatMul" | "Gemm") {
                continue;
            }
            match self.fuse(g, i) {
                Ok(Some((node, inits))) => {
                    for (name, t) in inits {
                        g.initializers.insert(name, t);
                    }
                    g.nodes[i] = node;
                    fused += 1;
                }
                Ok(None) => {}
                Err(why) => rec.note(format!("{} stays in float: {why}", g.nodes[i].label())),
            }
        }
        let biases = absorb_bias_adds(g);
        g.remove_dead();
        let scaled = scalar_muls_into_fused(g);
        g.remove_dead();
        let hoisted = pairs_above_views(g)?;
        let snapped = absorb_output_pairs(g);
        g.remove_dead();
        let mapped = input_maps_into_fused(g);
        g.remove_dead();
        let mut pairs = 0;
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            if n.domain.is_empty() && n.op_type == "DequantizeLinear" && n.outputs.len() == 1 {
                if let Some(act) = activation_pair(g, &n.outputs[0]) {
                    let out = n.outputs[0].clone();
                    let name = n.name.clone();
                    let mut inputs = vec![act.x.as_str(), act.scale.as_str()];
                    inputs.extend(act.zero_point.as_deref());
                    let mut fq = Node::new("FakeQuant", &name, &inputs, &[out.as_str()]);
                    fq.domain = "ai.smelt".into();
                    g.nodes[i] = fq;
                    pairs += 1;
                }
            }
        }
        g.remove_dead();
        if lifted > 0 {
            rec.note(format!(
                "{lifted} chains of pooling or reshaping on 8-bit codes run in float before \
                 their quantization"
            ));
        }
        if fused + pairs > 0 {
            rec.note(format!(
                "{fused} layers run on integer kernels ({}, {biases} bias Adds and {snapped} \
                 output quantize-dequantize pairs absorbed, {hoisted} of them moved above \
                 reshapes, {scaled} scalar Muls and {mapped} channel scalings folded), \
                 {pairs} other pairs in one pass",
                crate::kernels::quant::int8_kernel_name()
            ));
        }
        Ok((model, rec))
    }
}

/// A bias Add right after a fused MatMul (`Add(QMatMul(x), b)` with a constant 1-D `b`, how
/// transformers write a linear layer) becomes the QMatMul's bias: one pass over the output
/// instead of two, with the same f32 operations (`acc * scale`, then `+ b`).
fn absorb_bias_adds(g: &mut Graph) -> usize {
    let outputs: std::collections::HashSet<String> =
        g.outputs.iter().map(|o| o.name.clone()).collect();
    let (mut absorbed, mut dead) = (0, Vec::new());
    for i in 0..g.nodes.len() {
        let n = &g.nodes[i];
        if n.domain != "ai.smelt"
            || n.op_type != "QMatMul"
            || n.inputs.get(6).is_some_and(|b| !b.is_empty())
        {
            continue;
        }
        let (Some(out), Some(scale)) = (n.outputs.first().cloned(), n.inputs.get(5)) else {
            continue;
        };
        let n_cols = g.initializers.get(scale).map(Tensor::numel);
        let users = g.consumers(&out);
        let [u] = users[..] else { continue };
        let add = &g.nodes[u];
        if !add.domain.is_empty()
            || add.op_type != "Add"
            || add.outputs.len() != 1
            || outputs.contains(&out)
        {
            continue;
        }
        let Some(other) = add.inputs.iter().find(|x| **x != out) else {
            continue;
        };
        let fits = g
            .initializers
            .get(other)
            .is_some_and(|b| b.dtype() == DType::F32 && b.rank() == 1 && Some(b.numel()) == n_cols);
        if !fits {
            continue;
        }
        let (bias, add_out) = (other.clone(), add.outputs[0].clone());
        let node = &mut g.nodes[i];
        node.inputs.resize(6, String::new());
        node.inputs.push(bias);
        node.outputs[0] = add_out;
        dead.push(u);
        absorbed += 1;
    }
    remove_nodes(g, &dead);
    absorbed
}

/// A QuantizeLinear / DequantizeLinear pair right after a fused op (its output quantized for
/// the next layer) becomes that op's output grid: the op snaps its results while they are in
/// cache, and the pair's two passes go.
fn absorb_output_pairs(g: &mut Graph) -> usize {
    let outputs: std::collections::HashSet<String> =
        g.outputs.iter().map(|o| o.name.clone()).collect();
    let (mut absorbed, mut dead) = (0, Vec::new());
    for d in 0..g.nodes.len() {
        let n = &g.nodes[d];
        if !n.domain.is_empty() || n.op_type != "DequantizeLinear" || n.outputs.len() != 1 {
            continue;
        }
        let Some(act) = activation_pair(g, &n.outputs[0]) else {
            continue;
        };
        let Some(f) = g.producer(&act.x) else {
            continue;
        };
        let fused = &g.nodes[f];
        if fused.domain != "ai.smelt"
            || !matches!(fused.op_type.as_str(), "QConv" | "QMatMul")
            || fused.inputs.len() > 7
            || outputs.contains(&act.x)
        {
            continue;
        }
        // The op's output feeds only the QuantizeLinear, which feeds only this DequantizeLinear.
        let q = g.consumers(&act.x);
        if q.len() != 1
            || g.consumers(&g.nodes[q[0]].outputs[0]) != [d]
            || outputs.contains(&g.nodes[q[0]].outputs[0])
        {
            continue;
        }
        let out = n.outputs[0].clone();
        let node = &mut g.nodes[f];
        node.inputs.resize(7, String::new());
        node.inputs.push(act.scale);
        node.inputs.push(act.zero_point.unwrap_or_default());
        node.outputs[0] = out;
        dead.push(d);
        absorbed += 1;
    }
    remove_nodes(g, &dead);
    absorbed
}

/// Ops that only pick or move values: on codes or on floats, quantizing before or after them
/// gives the same codes (quantization is monotone).
const VIEWS: &[&str] = &[
    "MaxPool",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
];

/// `Q(x) -> views on codes -> DQ` (how smelt and other quantizers write pooling between
/// quantized layers) becomes `views on x -> Q -> DQ`, an activation pair the next layer fuses
/// with. Exact: the views commute with quantization. Returns the chains rewritten.
fn views_to_float(g: &mut Graph) -> Result<usize> {
    let outputs: std::collections::HashSet<String> =
        g.outputs.iter().map(|o| o.name.clone()).collect();
    let mut lifted = 0;
    for d in 0..g.nodes.len() {
        if !plain(&g.nodes[d], "DequantizeLinear") {
            continue;
        }
        // Walk up from the DequantizeLinear through single-use views to a QuantizeLinear.
        let mut chain = Vec::new();
        let mut value = g.nodes[d].inputs.first().cloned().unwrap_or_default();
        let q = loop {
            let Some(p) = g.producer(&value) else {
                break None;
            };
            let n = &g.nodes[p];
            if plain(n, "QuantizeLinear") {
                break Some(p);
            }
            let single = g.consumers(&value).len() == 1 && !outputs.contains(&value);
            if !n.domain.is_empty()
                || !VIEWS.contains(&n.op_type.as_str())
                || n.outputs.len() != 1
                || !single
            {
                break None;
            }
            chain.push(p);
            value = n.inputs.first().cloned().unwrap_or_default();
        };
        let Some(q) = q.filter(|_| !chain.is_empty()) else {
            continue;
        };
        let per_tensor = g.nodes[q]
            .inputs
            .get(1)
            .and_then(|s| g.initializers.get(s))
            .is_some_and(|s| s.numel() == 1);
        if !per_tensor {
            continue;
        }
        // The first view (last in the walk) reads the float input instead of the codes, and a
        // new QuantizeLinear after the last view gives the DequantizeLinear its codes.
        let x = g.nodes[q].inputs[0].clone();
        let first = *chain.last().unwrap();
        let now_float: Vec<String> = chain
            .iter()
            .map(|&i| g.nodes[i].outputs[0].clone())
            .collect();
        g.value_info.retain(|v| !now_float.contains(&v.name));
        g.nodes[first].inputs[0] = x;
        let last_out = g.nodes[chain[0]].outputs[0].clone();
        let codes = g.unique_name(&format!("{last_out}_codes"));
        let mut requant = g.nodes[q].clone();
        requant.name = g.unique_name(&format!("{}_requantize", g.nodes[q].name));
        requant.inputs[0] = last_out;
        requant.outputs = vec![codes.clone()];
        g.nodes[d].inputs[0] = codes;
        g.nodes.push(requant);
        lifted += 1;
    }
    if lifted > 0 {
        // The new QuantizeLinears were appended: put them before their readers.
        g.sort()?;
    }
    Ok(lifted)
}

/// How many nodes read the values of `v`: Shape ops, which read only its shape, do not count.
fn value_readers(g: &Graph, v: &str) -> usize {
    g.consumers(v)
        .iter()
        .filter(|&&c| !(g.nodes[c].domain.is_empty() && g.nodes[c].op_type == "Shape"))
        .count()
}

/// `QMatMul -> views -> Mul(constant scalar c)` (attention scaling its queries or keys by
/// 1/sqrt(d) after splitting heads) folds `c` into the QMatMul's scales and bias, and the Mul
/// goes. Equal up to f32 rounding (`(acc s + b) c` becomes `acc (s c) + b c`), like the fused
/// ops themselves. Returns the Muls folded.
fn scalar_muls_into_fused(g: &mut Graph) -> usize {
    let outputs: std::collections::HashSet<String> =
        g.outputs.iter().map(|o| o.name.clone()).collect();
    let mut dead = Vec::new();
    for m in 0..g.nodes.len() {
        let n = &g.nodes[m];
        if !n.domain.is_empty() || n.op_type != "Mul" || n.inputs.len() != 2 {
            continue;
        }
        let scalar = |x: &String| {
            let t = g.initializers.get(x)?;
            // Rank 0: a scalar that cannot change the product's shape.
            (t.dtype() == DType::F32 && t.numel() == 1 && t.rank() == 0)
                .then(|| t.as_slice::<f32>().ok().map(|v| v[0]))
                .flatten()
        };
        let (value, c) = match (scalar(&n.inputs[0]), scalar(&n.inputs[1])) {
            (None, Some(c)) => (n.inputs[0].clone(), c),
            (Some(c), None) => (n.inputs[1].clone(), c),
            _ => continue,
        };
        if !c.is_finite() {
            continue;
        }
        // Walk up through single-use views to a QMatMul whose output nothing else reads.
        let mut v = value.clone();
        let fused = loop {
            // The Mul's input is renamed away; values further up may also feed Shape ops.
            let readers = if v == value {
                g.consumers(&v).len()
            } else {
                value_readers(g, &v)
            };
            if readers != 1 || outputs.contains(&v) {
                break None;
            }
            let Some(p) = g.producer(&v) else { break None };
            let pn = &g.nodes[p];
            if pn.domain == "ai.smelt" && pn.op_type == "QMatMul" && pn.inputs.len() <= 7 {
                break Some(p);
            }
            if !pn.domain.is_empty()
                || !matches!(
                    pn.op_type.as_str(),
                    "Reshape" | "Flatten" | "Transpose" | "Squeeze" | "Unsqueeze" | "Identity"
                )
                || pn.outputs.len() != 1
            {
                break None;
            }
            v = pn.inputs.first().cloned().unwrap_or_default();
        };
        let Some(f) = fused else { continue };
        let scaled = |g: &Graph, name: &str| -> Option<Tensor> {
            let t = g.initializers.get(name)?;
            let v: Vec<f32> = t.as_slice::<f32>().ok()?.iter().map(|x| x * c).collect();
            Tensor::from_vec(t.shape().to_vec(), v).ok()
        };
        let fnode = &g.nodes[f];
        let Some(scale) = fnode.inputs.get(5).and_then(|s| scaled(g, s)) else {
            continue;
        };
        let bias = match fnode.inputs.get(6).filter(|b| !b.is_empty()) {
            Some(b) => match scaled(g, b) {
                Some(t) => Some(t),
                None => continue,
            },
            None => None,
        };
        let out0 = fnode.outputs[0].clone();
        let sname = g.unique_name(&format!("{out0}_scale_x_c"));
        g.initializers.insert(sname.clone(), scale);
        g.nodes[f].inputs[5] = sname;
        if let Some(b) = bias {
            let bname = g.unique_name(&format!("{out0}_bias_x_c"));
            g.initializers.insert(bname.clone(), b);
            g.nodes[f].inputs[6] = bname;
        }
        // The Mul's readers read the last view (or the QMatMul) directly.
        let mul_out = g.nodes[m].outputs[0].clone();
        let p = g.producer(&value).unwrap_or(f);
        g.nodes[p].outputs[0] = mul_out;
        g.nodes[m].outputs[0] = String::new();
        g.nodes[m].inputs.clear();
        g.value_info.retain(|vi| vi.name != value);
        dead.push(m);
    }
    remove_nodes(g, &dead);
    dead.len()
}

/// `fused op -> views -> Q -> DQ` (a transformer's projection, reshaped into heads, quantized
/// for the attention MatMul) becomes `fused op -> Q -> DQ -> views`, so that the pair is
/// absorbed as the fused op's output grid: snapped in its epilogue rather than in a pass of its
/// own. Exact: the views only move values. Returns the pairs moved.
fn pairs_above_views(g: &mut Graph) -> Result<usize> {
    let outputs: std::collections::HashSet<String> =
        g.outputs.iter().map(|o| o.name.clone()).collect();
    let mut moved = 0;
    for d in 0..g.nodes.len() {
        if !plain(&g.nodes[d], "DequantizeLinear") {
            continue;
        }
        let Some(act) = activation_pair(g, &g.nodes[d].outputs[0]) else {
            continue;
        };
        let Some(q) = g.producer(&g.nodes[d].inputs[0]) else {
            continue;
        };
        let codes = &g.nodes[q].outputs[0];
        if g.consumers(codes).len() != 1 || outputs.contains(codes) {
            continue;
        }
        // Walk up from the pair's input through single-use views to a fused op's output.
        let mut chain = Vec::new();
        let mut value = act.x.clone();
        let source = loop {
            let Some(p) = g.producer(&value) else {
                break None;
            };
            let n = &g.nodes[p];
            // The pair's input is renamed away; values further up may also feed Shape ops.
            let readers = if value == act.x {
                g.consumers(&value).len()
            } else {
                value_readers(g, &value)
            };
            if readers != 1 || outputs.contains(&value) {
                break None;
            }
            if n.domain == "ai.smelt" && matches!(n.op_type.as_str(), "QConv" | "QMatMul") {
                break Some((p, value.clone()));
            }
            if !n.domain.is_empty()
                || !matches!(
                    n.op_type.as_str(),
                    "Reshape" | "Flatten" | "Transpose" | "Squeeze" | "Unsqueeze" | "Identity"
                )
                || n.outputs.len() != 1
            {
                break None;
            }
            chain.push(p);
            value = n.inputs.first().cloned().unwrap_or_default();
        };
        let Some((f, source)) = source.filter(|_| !chain.is_empty()) else {
            continue;
        };
        // fused op -> raw -> Q -> DQ -> source -> first view ... last view -> the DQ's old
        // output: the fused op's value keeps its name, now snapped.
        let raw = g.unique_name(&format!("{source}_raw"));
        g.nodes[f].outputs[0] = raw.clone();
        g.nodes[q].inputs[0] = raw;
        let old_out = std::mem::replace(&mut g.nodes[d].outputs[0], source);
        g.nodes[chain[0]].outputs[0] = old_out;
        // The views' values and the codes now have other shapes: their entries would mislead.
        let mut views: Vec<String> = chain
            .iter()
            .map(|&i| g.nodes[i].outputs[0].clone())
            .collect();
        views.push(g.nodes[q].outputs[0].clone());
        g.value_info.retain(|v| !views.contains(&v.name));
        moved += 1;
    }
    if moved > 0 {
        // The pair now comes before the views: restore topological order.
        g.sort()?;
    }
    Ok(moved)
}

/// Drops the nodes at these indices.
fn remove_nodes(g: &mut Graph, dead: &[usize]) {
    let mut i = 0;
    g.nodes.retain(|_| {
        i += 1;
        !dead.contains(&(i - 1))
    });
}

/// A new node and the initializers it needs.
type Fused = (Node, Vec<(String, Tensor)>);

impl FuseQdq {
    /// The fused form of node `i`: `Ok(None)` when it is not a QDQ pattern, `Err(reason)` when
    /// it is one that cannot run on the integer kernels.
    fn fuse(&self, g: &Graph, i: usize) -> std::result::Result<Option<Fused>, String> {
        let n = &g.nodes[i];
        if n.outputs.len() != 1 {
            return Ok(None);
        }
        let Some(act) = n.inputs.first().and_then(|x| activation_pair(g, x)) else {
            return Ok(None);
        };
        let op = n.op_type.as_str();
        let Some(w) = n.inputs.get(1).and_then(|x| weight_dq(g, x)) else {
            return Ok(None);
        };
        let sx = g.initializers[&act.scale]
            .as_slice::<f32>()
            .map_err(|e| e.to_string())?[0];
        let label = n.label();
        let mut inputs = vec![
            act.x.clone(),
            act.scale.clone(),
            act.zero_point.clone().unwrap_or_default(),
        ];
        let mut inits = Vec::new();
        let mut add = |inputs: &mut Vec<String>, suffix: &str, t: Tensor| {
            let name = g.unique_name(&format!("{label}_{suffix}"));
            inputs.push(name.clone());
            inits.push((name, t));
        };
        let node = match op {
            "Conv" => {
                let shape = w.q.shape().to_vec();
                if shape.len() < 3 {
                    return Ok(None);
                }
                let m = shape[0];
                let group = n.attr_int("group").ok().flatten().unwrap_or(1);
                if shape.len() >= 3 && shape[1] == 1 && group > 1 {
                    return Ok(None); // depthwise: the float direct loop is the better kernel
                }
                if shape[1..].iter().product::<usize>() < MIN_INT8_DEPTH {
                    return Ok(None);
                }
                let (scales, zps) = w.per_channel(0, m)?;
                // Weights are the product's u8 side: shift them (and their zero points) up.
                let off = if self.may_saturate { 64 } else { 128 };
                self.check_range(&w.values, &zps)?;
                let u: Vec<u8> = w.values.iter().map(|&v| (v + off) as u8).collect();
                let zu: Vec<u8> = zps.iter().map(|&z| (z + off) as u8).collect();
                let sc: Vec<f32> = scales.iter().map(|&s| sx * s).collect();
                add(&mut inputs, "qw", tensor(shape, u)?);
                add(&mut inputs, "qw_zero_point", tensor(vec![m], zu)?);
                add(&mut inputs, "qscale", tensor(vec![m], sc)?);
                inputs.push(n.inputs.get(2).cloned().unwrap_or_default());
                let mut node = n.clone();
                node.inputs = inputs;
                node
            }
            "MatMul" | "Gemm" => {
                let &[k0, n0] = w.q.shape() else {
                    return Ok(None);
                };
                let (mut k, mut nn) = (k0, n0);
                let mut axis = 1;
                let mut values = w.values.clone();
                if op == "Gemm" {
                    let int = |key| n.attr_int(key).ok().flatten().unwrap_or(0);
                    let float = |key| n.attr_float(key).ok().flatten().unwrap_or(1.0);
                    if int("transA") != 0 || float("alpha") != 1.0 || float("beta") != 1.0 {
                        return Ok(None);
                    }
                    if int("transB") != 0 {
                        // Stored [N, K]: transpose to the [K, N] the kernel takes.
                        std::mem::swap(&mut k, &mut nn);
                        values = (0..k * nn)
                            .map(|p| w.values[(p % nn) * k + p / nn])
                            .collect();
                        axis = 0;
                    }
                    // C must add per column: [N] or [1, N] (an [N, 1] would add per row).
                    if let Some(c) = n.inputs.get(2).filter(|c| !c.is_empty()) {
                        let per_column = |s: &[usize]| match s {
                            [x] | [1, x] => *x == nn,
                            _ => false,
                        };
                        if !const_shape(g, c).is_some_and(|s| per_column(&s)) {
                            return Ok(None);
                        }
                    }
                }
                let (scales, zps) = w.per_channel(axis, nn)?;
                self.check_range(&values, &zps)?;
                let q: Vec<i8> = values.iter().map(|&v| v as i8).collect();
                let z: Vec<i8> = zps.iter().map(|&v| v as i8).collect();
                let sc: Vec<f32> = scales.iter().map(|&s| sx * s).collect();
                add(&mut inputs, "qw", tensor(vec![k, nn], q)?);
                add(&mut inputs, "qw_zero_point", tensor(vec![nn], z)?);
                add(&mut inputs, "qscale", tensor(vec![nn], sc)?);
                inputs.push(n.inputs.get(2).cloned().unwrap_or_default());
                let mut node = Node::new("QMatMul", &n.name, &[], &[]);
                node.inputs = inputs;
                node.outputs = n.outputs.clone();
                node
            }
            _ => return Ok(None),
        };
        let mut node = node;
        node.op_type = format!("Q{}", if op == "Conv" { "Conv" } else { "MatMul" });
        node.domain = "ai.smelt".into();
        Ok(Some((node, inits)))
    }

    /// Weights (as signed 8-bit values) the kernel multiplies exactly.
    fn check_range(&self, values: &[i32], zps: &[i32]) -> std::result::Result<(), String> {
        if self.may_saturate && values.iter().any(|v| !(-64..=64).contains(v)) {
            return Err(
                "weights use the full 8-bit range, which this CPU's int8 kernel \
                        (no VNNI) cannot multiply exactly; quantize with --reduce-range"
                    .into(),
            );
        }
        if zps.iter().any(|z| !(-64..=127).contains(z)) {
            return Err("a weight zero point is outside [-64, 127]".into());
        }
        Ok(())
    }
}

/// A `Mul(x, c)` by a constant per-channel vector, optionally reading a `Gather(x, idx,
/// axis=-1)` with constant indices (how `smelt quantize --smooth / --outliers` scales and
/// splits input channels), that feeds only QMatMuls becomes their input map (inputs 9 and 10):
/// the kernel multiplies each value as it quantizes it, so neither op makes a pass of its own.
fn input_maps_into_fused(g: &mut Graph) -> usize {
    let vector = |g: &Graph, v: &str, dt: &[DType]| {
        g.initializers
            .get(v)
            .filter(|t| t.rank() == 1 && dt.contains(&t.dtype()))
            .map(|t| t.numel())
    };
    let mut folded = 0;
    for i in 0..g.nodes.len() {
        let n = &g.nodes[i];
        if !n.domain.is_empty() || n.op_type != "Mul" || n.inputs.len() != 2 {
            continue;
        }
        let f32s = [DType::F32];
        let (x, c, k) = match (
            vector(g, &n.inputs[0], &f32s),
            vector(g, &n.inputs[1], &f32s),
        ) {
            (None, Some(k)) => (n.inputs[0].clone(), n.inputs[1].clone(), k),
            (Some(k), None) => (n.inputs[1].clone(), n.inputs[0].clone(), k),
            _ => continue,
        };
        let y = n.outputs[0].clone();
        let readers = g.consumers(&y);
        let reads_y = |r: usize| {
            let q = &g.nodes[r];
            is_integer_layer(q)
                && q.op_type == "QMatMul"
                && q.inputs.len() <= 9
                && q.inputs[0] == y
                && q.inputs[1..].iter().all(|v| *v != y)
                && const_shape(g, &q.inputs[3]).is_some_and(|s| s.first() == Some(&k))
        };
        if readers.is_empty()
            || g.outputs.iter().any(|o| o.name == y)
            || !readers.iter().all(|&r| reads_y(r))
        {
            continue;
        }
        let mut src = (x.clone(), None);
        if let Some(p) = g.producer(&x) {
            let gn = &g.nodes[p];
            let ints = [DType::I64, DType::I32];
            let idx_ok = vector(g, gn.inputs.get(1).map_or("", String::as_str), &ints) == Some(k)
                && g.initializers[&gn.inputs[1]]
                    .to_i64_vec()
                    .is_ok_and(|v| v.iter().all(|&j| j >= 0));
            if gn.domain.is_empty()
                && gn.op_type == "Gather"
                && gn.attr_int("axis").ok().flatten() == Some(-1)
                && idx_ok
                && g.consumers(&x).len() == 1
                && !g.outputs.iter().any(|o| o.name == x)
            {
                src = (gn.inputs[0].clone(), Some(gn.inputs[1].clone()));
            }
        }
        for r in readers {
            let q = &mut g.nodes[r];
            q.inputs.resize(9, String::new());
            q.inputs[0] = src.0.clone();
            q.inputs.push(c.clone());
            q.inputs.extend(src.1.clone());
        }
        folded += 1;
    }
    folded
}

fn tensor<T: smelt_tensor::Element>(
    shape: Vec<usize>,
    v: Vec<T>,
) -> std::result::Result<Tensor, String> {
    Tensor::from_vec(shape, v).map_err(|e| e.to_string())
}

/// The float input and the quantization parameters of a `DequantizeLinear(QuantizeLinear(x))`
/// pair producing `value`, per tensor, with the same constant scale and zero point on both.
pub(crate) struct ActPair {
    pub x: String,
    pub scale: String,
    pub zero_point: Option<String>,
}

fn plain(n: &Node, op: &str) -> bool {
    n.domain.is_empty()
        && n.op_type == op
        && n.attr_int("block_size").ok().flatten().unwrap_or(0) == 0
        && n.attr_int("output_dtype").ok().flatten().unwrap_or(0) == 0
        && n.attr_int("precision").ok().flatten().unwrap_or(0) == 0
}

pub(crate) fn activation_pair(g: &Graph, value: &str) -> Option<ActPair> {
    let d = &g.nodes[g.producer(value)?];
    if !plain(d, "DequantizeLinear") {
        return None;
    }
    let q = &g.nodes[g.producer(d.inputs.first()?)?];
    if !plain(q, "QuantizeLinear") {
        return None;
    }
    let arg = |n: &Node, i: usize| n.inputs.get(i).filter(|s| !s.is_empty()).cloned();
    let (sq, sd) = (arg(q, 1)?, arg(d, 1)?);
    let scalar_f32 = |name: &str| {
        let t = g.initializers.get(name)?;
        if t.dtype() != DType::F32 || t.numel() != 1 {
            return None;
        }
        t.as_slice::<f32>().ok().map(|v| v[0])
    };
    let s = scalar_f32(&sd)?;
    if scalar_f32(&sq)?.to_bits() != s.to_bits() || !(s.is_finite() && s > 0.0) {
        return None;
    }
    let zero = |name: Option<String>| -> Option<Option<(DType, i64)>> {
        let Some(name) = name else { return Some(None) };
        let t = g.initializers.get(&name)?;
        if t.numel() != 1 || !matches!(t.dtype(), DType::U8 | DType::I8) {
            return None;
        }
        Some(Some((t.dtype(), t.to_i64_vec().ok()?[0])))
    };
    let (zq, zd) = (zero(arg(q, 2))?, zero(arg(d, 2))?);
    let default = Some((DType::U8, 0));
    if zq.or(default) != zd.or(default) {
        return None;
    }
    Some(ActPair {
        x: q.inputs.first()?.clone(),
        scale: sd,
        zero_point: arg(d, 2),
    })
}

/// An 8-bit constant weight behind a DequantizeLinear, as signed values (u8 shifted by 128).
struct WeightDq<'a> {
    q: &'a Tensor,
    values: Vec<i32>,
    scales: Vec<f32>,
    zero_points: Vec<i32>,
    axis: usize,
}

impl WeightDq<'_> {
    /// Scale and zero point for each of the `len` indices along `axis`.
    fn per_channel(
        &self,
        axis: usize,
        len: usize,
    ) -> std::result::Result<(Vec<f32>, Vec<i32>), String> {
        let expand = |v: &[f32]| -> Option<Vec<f32>> {
            match v.len() {
                1 => Some(vec![v[0]; len]),
                l if l == len && self.axis == axis => Some(v.to_vec()),
                _ => None,
            }
        };
        let scales = expand(&self.scales).ok_or("weight scales are not per output channel")?;
        let zps: Vec<i32> = match self.zero_points.len() {
            1 => vec![self.zero_points[0]; len],
            l if l == len && self.axis == axis => self.zero_points.clone(),
            _ => return Err("weight zero points are not per output channel".into()),
        };
        Ok((scales, zps))
    }
}

fn weight_dq<'a>(g: &'a Graph, value: &str) -> Option<WeightDq<'a>> {
    let d = &g.nodes[g.producer(value)?];
    if !plain(d, "DequantizeLinear") {
        return None;
    }
    let q = g.initializers.get(d.inputs.first()?)?;
    let shift = match q.dtype() {
        DType::I8 => 0,
        DType::U8 => 128,
        _ => return None,
    };
    let s = g.initializers.get(d.inputs.get(1)?)?;
    if s.dtype() != DType::F32 || s.rank() > 1 {
        return None;
    }
    let scales = s.as_slice::<f32>().ok()?.to_vec();
    if scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return None;
    }
    let zero_points = match d.inputs.get(2).filter(|s| !s.is_empty()) {
        Some(z) => {
            let z = g.initializers.get(z)?;
            if z.dtype() != q.dtype() || z.numel() != scales.len() {
                return None;
            }
            z.to_i64_vec()
                .ok()?
                .iter()
                .map(|&v| v as i32 - shift)
                .collect()
        }
        // ONNX defaults the zero point to 0 in the stored type: -128 once u8 shifts to i8.
        None => vec![-shift],
    };
    let rank = q.rank() as i64;
    let axis = d.attr_int("axis").ok().flatten().unwrap_or(1);
    let axis = if axis < 0 { axis + rank } else { axis };
    if !(0..rank.max(1)).contains(&axis) {
        return None;
    }
    let values = match q.data() {
        Data::I8(v) => v.iter().map(|&x| x as i32).collect(),
        Data::U8(v) => v.iter().map(|&x| x as i32 - 128).collect(),
        _ => return None,
    };
    Some(WeightDq {
        q,
        values,
        scales,
        zero_points,
        axis: axis as usize,
    })
}

/// The shape of a constant: an initializer, or a DequantizeLinear of one.
fn const_shape(g: &Graph, value: &str) -> Option<Vec<usize>> {
    if let Some(t) = g.initializers.get(value) {
        return Some(t.shape().to_vec());
    }
    let d = &g.nodes[g.producer(value)?];
    if d.op_type != "DequantizeLinear" {
        return None;
    }
    g.initializers
        .get(d.inputs.first()?)
        .map(|t| t.shape().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Session;
    use smelt_ir::{Attr, Dim, ValueInfo};

    /// An opset-13 model from f32 input `x` of `shape` to output `y`.
    fn x_to_y(shape: &[usize], nodes: Vec<Node>, inits: &[(&str, Tensor)]) -> Model {
        Model::new(
            Graph {
                inputs: vec![ValueInfo::new(
                    "x",
                    DType::F32,
                    shape.iter().copied().map(Dim::Fixed).collect(),
                )],
                outputs: vec![ValueInfo::new("y", DType::F32, vec![])],
                initializers: inits
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
                nodes,
                ..Default::default()
            },
            13,
        )
    }

    /// The pass as on a CPU whose int8 kernel cannot saturate.
    fn fuse(m: &Model) -> (Model, PassRecord) {
        FuseQdq {
            may_saturate: false,
        }
        .run(m.clone())
        .unwrap()
    }

    /// Pooling written on 8-bit codes (`Q -> MaxPool -> Reshape -> DQ`) before a quantized
    /// MatMul: the views move back to floats and the MatMul still fuses.
    #[test]
    fn views_on_codes_move_to_floats_and_the_next_layer_fuses() {
        let w: Vec<i8> = (0..12).map(|i| (i * 7 % 19) as i8 - 9).collect();
        let nodes = vec![
            Node::new("QuantizeLinear", "q", &["x", "s", "z"], &["xq"]),
            Node::new("MaxPool", "pool", &["xq"], &["p"])
                .with_attr("kernel_shape", Attr::Ints(vec![2, 2]))
                .with_attr("strides", Attr::Ints(vec![2, 2])),
            Node::new("Reshape", "flat", &["p", "shape"], &["r"]),
            Node::new("DequantizeLinear", "d", &["r", "s", "z"], &["rd"]),
            Node::new("DequantizeLinear", "dw", &["wq", "ws"], &["w"])
                .with_attr("axis", Attr::Int(1)),
            Node::new("MatMul", "mm", &["rd", "w"], &["y"]),
        ];
        let inits = [
            ("s", Tensor::scalar(0.05f32)),
            ("z", Tensor::scalar(100u8)),
            ("shape", Tensor::from_vec(vec![2], vec![2i64, 4]).unwrap()),
            ("wq", Tensor::from_vec(vec![4, 3], w).unwrap()),
            (
                "ws",
                Tensor::from_vec(vec![3], vec![0.1f32, 0.2, 0.3]).unwrap(),
            ),
        ];
        let m = x_to_y(&[2, 1, 4, 4], nodes, &inits);
        let (f, rec) = fuse(&m);
        let g = &f.graph;
        let pool = &g.nodes[g.producer("p").unwrap()];
        assert_eq!(pool.inputs[0], "x", "{:?}", rec.changes);
        let mm = &g.nodes[g.producer("y").unwrap()];
        assert_eq!(
            (mm.domain.as_str(), mm.op_type.as_str()),
            ("ai.smelt", "QMatMul")
        );
        let x: Vec<f32> = (0..32)
            .map(|i| ((i * 13 % 32) as f32 - 12.0) * 0.37)
            .collect();
        let x = Tensor::from_vec(vec![2, 1, 4, 4], x).unwrap();
        assert_fused_matches_reference(m, x);
    }

    /// The session's output (fused) equals the reference evaluation's within f32 rounding.
    fn assert_fused_matches_reference(m: Model, x: Tensor) {
        let run = |s: Session| {
            s.run(&[("x", x.clone())]).unwrap()[0]
                .1
                .to_f32_vec()
                .unwrap()
        };
        let want = run(Session::reference(m.clone()).unwrap());
        let got = run(Session::new(m).unwrap());
        for (a, b) in want.iter().zip(&got) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "{want:?} vs {got:?}"
            );
        }
    }

    /// Channels scaled by a Mul (smoothing) and split into copies by a Gather (outlier
    /// splitting) in front of quantized MatMuls: both fold into the QMatMuls' input maps, and
    /// the output is the reference's (the product is rounded in f32 before quantizing, as the
    /// Mul does).
    #[test]
    fn channel_scaling_and_splitting_fold_into_the_fused_input() {
        for split in [false, true] {
            let k = if split { 6 } else { 4 };
            let mut nodes = vec![
                Node::new("Mul", "smooth", &["xs", "c"], &["xm"]),
                Node::new("QuantizeLinear", "q", &["xm", "s", "z"], &["xq"]),
                Node::new("DequantizeLinear", "d", &["xq", "s", "z"], &["xd"]),
                Node::new("DequantizeLinear", "dw", &["wq", "ws"], &["w"])
                    .with_attr("axis", Attr::Int(1)),
                Node::new("MatMul", "mm1", &["xd", "w"], &["y1"]),
                Node::new("MatMul", "mm2", &["xd", "w"], &["y2"]),
                Node::new("Add", "sum", &["y1", "y2"], &["y"]),
            ];
            if split {
                nodes.insert(
                    0,
                    Node::new("Gather", "split", &["x", "idx"], &["xs"])
                        .with_attr("axis", Attr::Int(-1)),
                );
            } else {
                nodes[0].inputs[0] = "x".into();
            }
            let w: Vec<i8> = (0..k * 3).map(|i| (i * 7 % 19) as i8 - 9).collect();
            let c: Vec<f32> = (0..k).map(|i| 0.5 + 0.37 * i as f32).collect();
            let inits = [
                ("s", Tensor::scalar(0.05f32)),
                ("z", Tensor::scalar(120u8)),
                ("c", Tensor::from_vec(vec![k], c).unwrap()),
                (
                    "idx",
                    Tensor::from_vec(vec![6], vec![0i64, 1, 2, 3, 1, 1]).unwrap(),
                ),
                ("wq", Tensor::from_vec(vec![k, 3], w).unwrap()),
                (
                    "ws",
                    Tensor::from_vec(vec![3], vec![0.1f32, 0.2, 0.3]).unwrap(),
                ),
            ];
            let m = x_to_y(&[5, 4], nodes, &inits);
            let (f, rec) = fuse(&m);
            let ops: Vec<&str> = f.graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
            assert_eq!(ops, ["QMatMul", "QMatMul", "Add"], "{:?}", rec.changes);
            let mm = &f.graph.nodes[0];
            assert_eq!(mm.inputs[0], "x");
            assert_eq!(mm.inputs.len(), if split { 11 } else { 10 });
            let x: Vec<f32> = (0..20)
                .map(|i| ((i * 13 % 20) as f32 - 9.0) * 0.41)
                .collect();
            assert_fused_matches_reference(m, Tensor::from_vec(vec![5, 4], x).unwrap());
        }
    }

    /// A projection reshaped into heads and quantized for the next (float) MatMul: the pair
    /// moves above the reshape and the QMatMul snaps its own output.
    #[test]
    fn a_pair_after_reshapes_becomes_the_fused_output_grid() {
        pair_after_reshapes(false);
    }

    /// The same with the heads scaled by a constant (attention's 1/sqrt(d)) before the pair:
    /// the scale folds into the QMatMul.
    #[test]
    fn a_scalar_mul_after_reshapes_folds_into_the_fused_op() {
        pair_after_reshapes(true);
    }

    fn pair_after_reshapes(scaled: bool) {
        let w: Vec<i8> = (0..24).map(|i| (i * 5 % 23) as i8 - 11).collect();
        let mut nodes = vec![
            Node::new("QuantizeLinear", "q", &["x", "s", "z"], &["xq"]),
            Node::new("DequantizeLinear", "d", &["xq", "s", "z"], &["xd"]),
            Node::new("DequantizeLinear", "dw", &["wq", "ws"], &["w"])
                .with_attr("axis", Attr::Int(1)),
            Node::new("MatMul", "mm", &["xd", "w"], &["h"]),
            Node::new("Reshape", "heads", &["h", "shape"], &["r"]),
            Node::new("Transpose", "t", &["r"], &["rt"])
                .with_attr("perm", Attr::Ints(vec![0, 2, 1, 3])),
            Node::new("QuantizeLinear", "q2", &["rt", "s2", "z"], &["rq"]),
            Node::new("DequantizeLinear", "d2", &["rq", "s2", "z"], &["y"]),
        ];
        if scaled {
            nodes[6].inputs[0] = "rm".into();
            nodes.insert(6, Node::new("Mul", "scale", &["c", "rt"], &["rm"]));
        }
        let inits = [
            ("c", Tensor::scalar(0.35f32)),
            ("s", Tensor::scalar(0.05f32)),
            ("s2", Tensor::scalar(if scaled { 0.01f32 } else { 0.03 })),
            ("z", Tensor::scalar(128u8)),
            (
                "shape",
                Tensor::from_vec(vec![4], vec![2i64, 3, 2, 3]).unwrap(),
            ),
            ("wq", Tensor::from_vec(vec![4, 6], w).unwrap()),
            (
                "ws",
                Tensor::from_vec(vec![6], vec![0.01f32, 0.02, 0.03, 0.02, 0.01, 0.02]).unwrap(),
            ),
        ];
        let m = x_to_y(&[2, 3, 4], nodes, &inits);
        let (f, rec) = fuse(&m);
        let g = &f.graph;
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            ["QMatMul", "Reshape", "Transpose"],
            "{:?}",
            rec.changes
        );
        assert_eq!(
            g.nodes[0].inputs.len(),
            9,
            "the output grid is the QMatMul's"
        );
        assert_eq!(g.nodes[2].outputs[0], "y");
        let x: Vec<f32> = (0..24)
            .map(|i| ((i * 11 % 24) as f32 - 10.0) * 0.21)
            .collect();
        let x = Tensor::from_vec(vec![2, 3, 4], x).unwrap();
        let run = |s: Session| {
            s.run(&[("x", x.clone())]).unwrap()[0]
                .1
                .to_f32_vec()
                .unwrap()
        };
        let want = run(Session::reference(m.clone()).unwrap());
        let got = run(Session::new(m).unwrap());
        // Integer sums are exact where the reference rounds float products: at most one step.
        let step = if scaled { 0.01 } else { 0.03 };
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() <= step + 1e-6, "{want:?} vs {got:?}");
        }
    }
}
