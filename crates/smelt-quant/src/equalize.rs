//! Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight
//! Equalization and Bias Correction").
//!
//! Per-tensor int8 weights lose the small output channels of a layer whose channel ranges differ
//! widely. When layer P's output channel i reaches layer C's input channel i only through
//! positive-homogeneous ops (`f(s·x) = s·f(x)` for `s > 0`: Relu, pools, per-channel bias adds,
//! ...), dividing P's channel i by `s_i` and multiplying C's input channel i by `s_i` leaves the
//! function unchanged. With `s_i = sqrt(r1_i / r2_i)` both sides end with range
//! `sqrt(r1_i · r2_i)`, which evens out the channel ranges of both weights.

use smelt_engine::analysis::{infer_shapes, InputSpec};
use smelt_engine::Session;
use smelt_ir::{subgraphs, Dim, Graph, Model, Node, Pass, PassRecord};
use smelt_tensor::{DType, Result, Tensor};
use std::collections::HashMap;

/// Equalizes the weight ranges of consecutive layers (Conv, Gemm, MatMul with a constant
/// right operand). `iterations` sweeps over all pairs let chains (conv1 -> conv2 -> conv3),
/// where a middle layer belongs to two pairs, settle.
#[derive(Clone, Debug)]
pub struct Equalize {
    pub iterations: usize,
}

impl Default for Equalize {
    fn default() -> Self {
        Equalize { iterations: 4 }
    }
}

/// Which equalized channel each element of a weight or bias initializer belongs to.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ChanMap {
    /// The channel is the index along one axis: `(flat / stride) % dim`.
    Axis { stride: usize, dim: usize },
    /// An input channel of a (possibly grouped) Conv weight `[O, I/g, k...]`: output channel
    /// `o` of group `o / out_per_group` sees input channels `group * in_per_group + [0, in_per_group)`.
    ConvIn {
        in_per_group: usize,
        out_per_group: usize,
        ksize: usize,
    },
}

impl ChanMap {
    fn index(self, flat: usize) -> usize {
        match self {
            ChanMap::Axis { stride, dim } => (flat / stride) % dim,
            ChanMap::ConvIn {
                in_per_group,
                out_per_group,
                ksize,
            } => {
                let o = flat / (in_per_group * ksize);
                let ii = (flat / ksize) % in_per_group;
                (o / out_per_group) * in_per_group + ii
            }
        }
    }
}

/// An initializer whose elements are scaled per equalized channel. `block` > 1 after a
/// Flatten/Reshape: feature `f` belongs to channel `f / block`.
#[derive(Clone, Debug)]
struct Slot {
    init: String,
    map: ChanMap,
    block: usize,
}

impl Slot {
    fn channel(&self, flat: usize) -> usize {
        self.map.index(flat) / self.block
    }
}

/// One producer/consumer pair ready to equalize.
#[derive(Clone, Debug)]
struct Pair {
    label: String,
    channels: usize,
    /// P's weight: output channel i is divided by s_i.
    out_w: Slot,
    /// P's bias and the biases added on the way: divided by s_i as well.
    biases: Vec<Slot>,
    /// C's weight: input channel i is multiplied by s_i.
    in_w: Slot,
}

/// A layer that may start a pair.
struct Producer {
    weight: Slot,
    channels: usize,
    bias: Option<String>,
    /// Rank of the output when known, and its channel axis counted from the end.
    rank: Option<usize>,
    axis_from_end: usize,
    /// Values and initializers that no other node may read.
    private: Vec<String>,
}

/// What looking for a consumer from one producer found.
enum Found {
    Nothing,
    Pair(Pair),
    Skip(String),
}

impl Pass for Equalize {
    fn name(&self) -> &'static str {
        "equalize"
    }

    fn run(&self, mut model: Model) -> Result<(Model, PassRecord)> {
        let mut rec = PassRecord::new(self.name());
        let pairs = {
            let mut shapes = Shapes {
                model: &model,
                probed: None,
            };
            find_pairs(&model.graph, &mut shapes, &mut rec)?
        };
        if pairs.is_empty() || self.iterations == 0 {
            return Ok((model, rec));
        }
        let g = &mut model.graph;
        let mut data: HashMap<String, Vec<f32>> = HashMap::new();
        for p in &pairs {
            for s in std::iter::once(&p.out_w)
                .chain(&p.biases)
                .chain(std::iter::once(&p.in_w))
            {
                if !data.contains_key(&s.init) {
                    // find_pairs checked that every slot names an f32 initializer.
                    if let Some(t) = g.initializers.get(&s.init) {
                        data.insert(s.init.clone(), t.to_f32_vec()?);
                    }
                }
            }
        }
        let mut before = Vec::with_capacity(pairs.len());
        for it in 0..self.iterations {
            for p in &pairs {
                let spread = equalize_pair(&mut data, p);
                if it == 0 {
                    before.push(spread);
                }
            }
        }
        for (p, (out0, in0)) in pairs.iter().zip(before) {
            let (out1, in1) = pair_spread(&data, p);
            rec.note(format!(
                "{}: {} channels; channel range spread (max/min) of P's outputs {:.3} -> {:.3}, \
                 of C's inputs {:.3} -> {:.3}",
                p.label, p.channels, out0, out1, in0, in1
            ));
        }
        for (name, v) in data {
            if let Some(t) = g.initializers.get_mut(&name) {
                *t = Tensor::from_vec(t.shape().to_vec(), v)?;
            }
        }
        Ok((model, rec))
    }
}

/// Per-channel max |w| of a slot's elements.
fn channel_ranges(data: &HashMap<String, Vec<f32>>, slot: &Slot, channels: usize) -> Vec<f32> {
    let mut r = vec![0f32; channels];
    if let Some(v) = data.get(&slot.init) {
        for (i, x) in v.iter().enumerate() {
            if let Some(m) = r.get_mut(slot.channel(i)) {
                *m = m.max(x.abs());
            }
        }
    }
    r
}

/// max/min over the channels that are not all zero (1 when none are).
fn spread(r: &[f32]) -> f64 {
    let live = r.iter().filter(|&&x| x > 0.0 && x.is_finite());
    let (lo, hi) = live.fold((f64::INFINITY, 0f64), |(lo, hi), &x| {
        (lo.min(x as f64), hi.max(x as f64))
    });
    if hi > 0.0 {
        hi / lo
    } else {
        1.0
    }
}

fn pair_spread(data: &HashMap<String, Vec<f32>>, p: &Pair) -> (f64, f64) {
    (
        spread(&channel_ranges(data, &p.out_w, p.channels)),
        spread(&channel_ranges(data, &p.in_w, p.channels)),
    )
}

/// One equalization step for a pair; returns the (P out, C in) spreads it started from.
fn equalize_pair(data: &mut HashMap<String, Vec<f32>>, p: &Pair) -> (f64, f64) {
    let r1 = channel_ranges(data, &p.out_w, p.channels);
    let r2 = channel_ranges(data, &p.in_w, p.channels);
    let s: Vec<f32> = r1
        .iter()
        .zip(&r2)
        .map(|(&a, &b)| {
            let s = (a as f64 / b as f64).sqrt();
            // A dead channel on either side has nothing to balance.
            if a > 0.0 && b > 0.0 && s.is_finite() && s > 0.0 {
                s as f32
            } else {
                1.0
            }
        })
        .collect();
    let scale = |data: &mut HashMap<String, Vec<f32>>, slot: &Slot, divide: bool| {
        if let Some(v) = data.get_mut(&slot.init) {
            for (i, x) in v.iter_mut().enumerate() {
                if let Some(&f) = s.get(slot.channel(i)) {
                    if divide {
                        *x /= f;
                    } else {
                        *x *= f;
                    }
                }
            }
        }
    };
    scale(data, &p.out_w, true);
    for b in &p.biases {
        scale(data, b, true);
    }
    scale(data, &p.in_w, false);
    (spread(&r1), spread(&r2))
}

/// Declared shapes, falling back to one probe run of the model when a value has none.
struct Shapes<'a> {
    model: &'a Model,
    probed: Option<Option<ShapeMap>>,
}

type ShapeMap = HashMap<String, (DType, Vec<usize>)>;

/// A weight's initializer, the shape its node sees, and the names no other node may read.
type ConstWeight = (String, Vec<usize>, Vec<String>);

impl Shapes<'_> {
    /// The dimensions after the batch dimension, if they are known and fixed.
    fn sample_dims(&mut self, name: &str) -> Option<Vec<usize>> {
        if let Some(dims) = self
            .model
            .graph
            .value_info(name)
            .and_then(|v| v.shape.as_ref())
        {
            let fixed: Option<Vec<usize>> = dims
                .iter()
                .skip(1)
                .map(|d| match d {
                    Dim::Fixed(n) => Some(*n),
                    _ => None,
                })
                .collect();
            if let Some(f) = fixed.filter(|_| !dims.is_empty()) {
                return Some(f);
            }
        }
        let model = self.model;
        let probed = self.probed.get_or_insert_with(|| {
            let session = Session::reference(model.clone()).ok()?;
            infer_shapes(&session, &InputSpec::default()).ok()
        });
        let (_, shape) = probed.as_ref()?.get(name)?;
        shape.get(1..).map(<[usize]>::to_vec)
    }
}

/// How many times each value is read: node inputs, subgraph captures and graph outputs.
fn reader_counts(g: &Graph) -> HashMap<String, usize> {
    let mut c: HashMap<String, usize> = HashMap::new();
    for n in &g.nodes {
        for i in n.inputs.iter().filter(|i| !i.is_empty()) {
            *c.entry(i.clone()).or_default() += 1;
        }
        for sg in subgraphs(n) {
            for v in sg.free_values() {
                *c.entry(v).or_default() += 1;
            }
        }
    }
    for o in &g.outputs {
        *c.entry(o.name.clone()).or_default() += 1;
    }
    c
}

fn default_domain(n: &Node) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// A constant weight: an initializer, or a Reshape of an initializer to a constant shape (as
/// CNTK wrote MNIST-8's MatMul weight).
fn const_weight(g: &Graph, name: &str) -> Result<Option<ConstWeight>> {
    if let Some(t) = g.initializers.get(name) {
        return Ok(Some((
            name.to_string(),
            t.shape().to_vec(),
            vec![name.to_string()],
        )));
    }
    let Some(pi) = g.producer(name) else {
        return Ok(None);
    };
    let n = &g.nodes[pi];
    if n.op_type != "Reshape" || !default_domain(n) || n.inputs.len() < 2 {
        return Ok(None);
    }
    let (Some(src), Some(target)) = (
        g.initializers.get(&n.inputs[0]),
        g.initializers.get(&n.inputs[1]),
    ) else {
        return Ok(None);
    };
    let Some(shape) = resolve_reshape(src.shape(), &target.to_i64_vec()?) else {
        return Ok(None);
    };
    if n.attr_int("allowzero")?.unwrap_or(0) != 0 && shape.contains(&0) {
        return Ok(None);
    }
    Ok(Some((
        n.inputs[0].clone(),
        shape,
        vec![name.to_string(), n.inputs[0].clone()],
    )))
}

/// Reshape's target with 0 (copy) and -1 (infer) resolved, if it is consistent.
fn resolve_reshape(input: &[usize], target: &[i64]) -> Option<Vec<usize>> {
    let numel: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            0 => out.push(*input.get(i)?),
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            d if d > 0 => out.push(usize::try_from(d).ok()?),
            _ => return None,
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !numel.is_multiple_of(known) {
            return None;
        }
        out[i] = numel / known;
    }
    (out.iter().product::<usize>() == numel).then_some(out)
}

/// The layer a pair can start from: output channel i is a slice of its constant weight.
fn producer(g: &Graph, n: &Node) -> Result<Option<Producer>> {
    if !default_domain(n) || n.outputs.len() != 1 || n.inputs.len() < 2 {
        return Ok(None);
    }
    let Some((init, shape, mut private)) = const_weight(g, &n.inputs[1])? else {
        return Ok(None);
    };
    let numel: usize = shape.iter().product();
    if numel == 0 {
        return Ok(None);
    }
    let (channels, map, rank, axis_from_end) = match n.op_type.as_str() {
        "Conv" if shape.len() >= 3 => {
            let o = shape[0];
            let map = ChanMap::Axis {
                stride: numel / o,
                dim: o,
            };
            (o, map, Some(shape.len()), shape.len() - 2)
        }
        "Gemm" if shape.len() == 2 => {
            if n.attr_int("transB")?.unwrap_or(0) != 0 {
                // B is [N, K]: output n is row n.
                let map = ChanMap::Axis {
                    stride: shape[1],
                    dim: shape[0],
                };
                (shape[0], map, Some(2), 0)
            } else {
                let map = ChanMap::Axis {
                    stride: 1,
                    dim: shape[1],
                };
                (shape[1], map, Some(2), 0)
            }
        }
        "MatMul" if shape.len() == 2 => {
            let map = ChanMap::Axis {
                stride: 1,
                dim: shape[1],
            };
            (shape[1], map, None, 0)
        }
        _ => return Ok(None),
    };
    let bias = match n.inputs.get(2).filter(|b| !b.is_empty()) {
        None => None,
        // A computed bias cannot be rescaled.
        Some(b) if !g.initializers.contains_key(b) => return Ok(None),
        Some(b) => Some(b.clone()),
    };
    private.extend(bias.iter().cloned());
    Ok(Some(Producer {
        weight: Slot {
            init,
            map,
            block: 1,
        },
        channels,
        bias,
        rank,
        axis_from_end,
        private,
    }))
}

/// The slot for a bias-like initializer whose channel axis sits `axis_from_end` from its last
/// axis (NumPy broadcasting aligns from the end). `Ok(None)` when the bias holds nothing to
/// scale (all zeros); `Err(reason)` when it is shared across channels.
fn bias_slot(
    t: &Tensor,
    init: &str,
    axis_from_end: usize,
    features: usize,
    block: usize,
) -> Result<std::result::Result<Option<Slot>, String>> {
    let shape = t.shape();
    let dim = if axis_from_end < shape.len() {
        shape[shape.len() - 1 - axis_from_end]
    } else {
        1
    };
    if dim == features && features > 0 {
        let stride = if axis_from_end < shape.len() {
            shape[shape.len() - axis_from_end..].iter().product()
        } else {
            1
        };
        let map = ChanMap::Axis { stride, dim };
        return Ok(Ok(Some(Slot {
            init: init.to_string(),
            map,
            block,
        })));
    }
    if dim == 1 && t.to_f32_vec()?.iter().all(|&x| x == 0.0) {
        return Ok(Ok(None));
    }
    Ok(Err(format!(
        "bias '{init}' of shape {shape:?} is not per channel"
    )))
}

/// Follows the output of producer node `pi` through positive-homogeneous ops to a consumer.
fn follow(
    g: &Graph,
    pi: usize,
    readers: &HashMap<String, usize>,
    shapes: &mut Shapes,
) -> Result<Found> {
    let pn = &g.nodes[pi];
    let Some(prod) = producer(g, pn)? else {
        return Ok(Found::Nothing);
    };
    let o = prod.channels;
    let mut rank = prod.rank;
    let mut afe = prod.axis_from_end;
    // Set once the channels were flattened into features; holds the feature count a Reshape
    // established (a Flatten leaves it to the consumer's weight).
    let mut flat: Option<Option<usize>> = None;
    // (initializer, channel axis from the end, after flattening)
    let mut adds: Vec<(String, usize, bool)> = Vec::new();
    let mut via: Vec<String> = Vec::new();
    let mut private = prod.private.clone();
    let mut v = pn.outputs[0].clone();
    let consumer = loop {
        if readers.get(&v) != Some(&1) || g.outputs.iter().any(|x| x.name == v) {
            return Ok(Found::Nothing);
        }
        let Some(ci) = g.nodes.iter().position(|n| n.inputs.contains(&v)) else {
            return Ok(Found::Nothing);
        };
        let n = &g.nodes[ci];
        let Some(pos) = n.inputs.iter().position(|i| *i == v) else {
            return Ok(Found::Nothing);
        };
        if !default_domain(n) || n.outputs.is_empty() {
            return Ok(Found::Nothing);
        }
        let other = n.inputs.get(1 - pos.min(1)).filter(|_| pos <= 1);
        let const_other = other.and_then(|x| g.initializers.get(x).map(|t| (x, t)));
        match n.op_type.as_str() {
            "Relu" | "LeakyRelu" | "PRelu" | "Identity" | "MaxPool" | "AveragePool"
            | "GlobalAveragePool" | "GlobalMaxPool"
                if pos == 0 => {}
            // With training_mode given it might drop values; without, it is the identity.
            "Dropout" if pos == 0 && n.inputs.get(2).is_none_or(|t| t.is_empty()) => {}
            "Add" | "Sub" => {
                let Some((name, t)) = const_other else {
                    return Ok(Found::Nothing);
                };
                rank = rank.map(|r| r.max(t.rank()));
                adds.push((name.clone(), afe, flat.is_some()));
                private.push(name.clone());
            }
            // Scaling by a constant commutes with the channel scaling.
            "Mul" | "Div" if const_other.is_some() && (pos == 0 || n.op_type == "Mul") => {
                if let Some((_, t)) = const_other {
                    rank = rank.map(|r| r.max(t.rank()));
                }
            }
            "Flatten" if pos == 0 && flat.is_none() => {
                let Some(r) = rank else {
                    return Ok(Found::Nothing);
                };
                let axis = n.attr_int("axis")?.unwrap_or(1);
                let axis = if axis < 0 { axis + r as i64 } else { axis };
                if axis != 1 || afe + 2 != r {
                    return Ok(Found::Nothing);
                }
                flat = Some(None);
                rank = Some(2);
                afe = 0;
            }
            "Reshape" if pos == 0 && flat.is_none() && n.inputs.len() >= 2 => {
                let Some(target) = g.initializers.get(&n.inputs[1]) else {
                    return Ok(Found::Nothing);
                };
                // One row per sample afterwards: [N, K] or [0, -1]. Checked before any probe,
                // so the 4-D reshapes of attention heads cost nothing.
                let row = match target.to_i64_vec()?.as_slice() {
                    [_, k] if *k > 0 => usize::try_from(*k).ok(),
                    [0, -1] => None,
                    _ => return Ok(Found::Nothing),
                };
                let Some(sd) = shapes.sample_dims(&v) else {
                    return Ok(Found::Skip(format!(
                        "skipped {}: the shape of '{v}' before {} is unknown",
                        pn.label(),
                        n.label()
                    )));
                };
                let per_sample: usize = sd.iter().product();
                // Channels on axis 1.
                let channel_first = sd.first() == Some(&o)
                    && afe + 2 == sd.len() + 1
                    && rank.is_none_or(|r| r == sd.len() + 1);
                if !channel_first || row.is_some_and(|k| k != per_sample) {
                    return Ok(Found::Nothing);
                }
                flat = Some(Some(per_sample));
                rank = Some(2);
                afe = 0;
            }
            "Conv" | "Gemm" | "MatMul" if pos == 0 => break ci,
            _ => return Ok(Found::Nothing),
        }
        via.push(n.op_type.clone());
        v = n.outputs[0].clone();
    };
    let cn = &g.nodes[consumer];
    if cn.inputs.len() < 2 {
        return Ok(Found::Nothing);
    }
    let Some((init, shape, c_private)) = const_weight(g, &cn.inputs[1])? else {
        return Ok(Found::Nothing);
    };
    let numel: usize = shape.iter().product();
    if numel == 0 {
        return Ok(Found::Nothing);
    }
    // (input features, element -> input feature)
    let (features, map) = match cn.op_type.as_str() {
        "Conv" if shape.len() >= 3 => {
            let group = usize::try_from(cn.attr_int("group")?.unwrap_or(1)).unwrap_or(0);
            if flat.is_some()
                || afe + 2 != shape.len()
                || rank.is_some_and(|r| r != shape.len())
                || group == 0
                || shape[0] % group != 0
            {
                return Ok(Found::Nothing);
            }
            let map = ChanMap::ConvIn {
                in_per_group: shape[1],
                out_per_group: shape[0] / group,
                ksize: shape[2..].iter().product(),
            };
            (shape[1] * group, map)
        }
        "Gemm" if shape.len() == 2 => {
            if cn.attr_int("transA")?.unwrap_or(0) != 0 || afe != 0 {
                return Ok(Found::Nothing);
            }
            if cn.attr_int("transB")?.unwrap_or(0) != 0 {
                (
                    shape[1],
                    ChanMap::Axis {
                        stride: 1,
                        dim: shape[1],
                    },
                )
            } else {
                (
                    shape[0],
                    ChanMap::Axis {
                        stride: shape[1],
                        dim: shape[0],
                    },
                )
            }
        }
        "MatMul" if shape.len() == 2 && afe == 0 => (
            shape[0],
            ChanMap::Axis {
                stride: shape[1],
                dim: shape[0],
            },
        ),
        _ => return Ok(Found::Nothing),
    };
    let block = match flat {
        None if features == o => 1,
        Some(Some(k)) if k == features && features % o == 0 => features / o,
        Some(None) if features % o == 0 && features >= o => features / o,
        _ => return Ok(Found::Nothing),
    };
    private.extend(c_private);
    let label = format!(
        "{} -> {}{}",
        pn.label(),
        cn.label(),
        if via.is_empty() {
            String::new()
        } else {
            format!(" via {}", via.join(", "))
        }
    );
    for name in &private {
        if readers.get(name).copied().unwrap_or(0) != 1 || g.outputs.iter().any(|x| x.name == *name)
        {
            return Ok(Found::Skip(format!(
                "skipped {label}: '{name}' is also read elsewhere"
            )));
        }
    }
    let mut biases = Vec::new();
    let all_adds = prod.bias.iter().map(|b| (b.clone(), 0, false)).chain(adds);
    for (name, axis_from_end, after_flat) in all_adds {
        let Some(t) = g.initializers.get(&name) else {
            return Ok(Found::Nothing);
        };
        let (features, blk) = if after_flat {
            (o * block, block)
        } else {
            (o, 1)
        };
        match bias_slot(t, &name, axis_from_end, features, blk)? {
            Ok(Some(s)) => biases.push(s),
            Ok(None) => {}
            Err(why) => return Ok(Found::Skip(format!("skipped {label}: {why}"))),
        }
    }
    let pair = Pair {
        label,
        channels: o,
        out_w: prod.weight,
        biases,
        in_w: Slot { init, map, block },
    };
    for s in std::iter::once(&pair.out_w)
        .chain(&pair.biases)
        .chain(std::iter::once(&pair.in_w))
    {
        let dt = g.initializers.get(&s.init).map(Tensor::dtype);
        if dt != Some(DType::F32) {
            return Ok(Found::Skip(format!(
                "skipped {}: '{}' is {:?}, not f32",
                pair.label, s.init, dt
            )));
        }
    }
    Ok(Found::Pair(pair))
}

/// Every equalizable pair, in graph order; pairs that match but cannot be rescaled are noted.
fn find_pairs(g: &Graph, shapes: &mut Shapes, rec: &mut PassRecord) -> Result<Vec<Pair>> {
    let readers = reader_counts(g);
    let mut pairs = Vec::new();
    for pi in g.topo_order()? {
        match follow(g, pi, &readers, shapes)? {
            Found::Nothing => {}
            Found::Pair(p) => pairs.push(p),
            Found::Skip(why) => rec.note(why),
        }
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_ir::{Attr, OpsetImport, ValueInfo};
    use std::path::PathBuf;

    struct Rng(u64);

    impl Rng {
        /// Uniform in [-1, 1).
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    /// A random tensor whose slices along `axis` are scaled by `scale(index)`.
    fn weight(rng: &mut Rng, shape: &[usize], axis: usize, scale: impl Fn(usize) -> f32) -> Tensor {
        let n: usize = shape.iter().product();
        let stride: usize = shape[axis + 1..].iter().product();
        let v = rng
            .vec(n)
            .into_iter()
            .enumerate()
            .map(|(i, x)| x * scale((i / stride) % shape[axis]))
            .collect();
        t(shape, v)
    }

    fn build(nodes: Vec<Node>, inits: Vec<(&str, Tensor)>, x: &[usize], outs: &[&str]) -> Model {
        let dims = x.iter().map(|&d| Dim::Fixed(d)).collect();
        Model {
            ir_version: 8,
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: 13,
            }],
            graph: Graph {
                inputs: vec![ValueInfo::new("x", DType::F32, dims)],
                outputs: outs
                    .iter()
                    .map(|o| ValueInfo {
                        name: o.to_string(),
                        dtype: Some(DType::F32),
                        ..Default::default()
                    })
                    .collect(),
                initializers: inits.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                nodes,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn run(m: &Model, x: &Tensor) -> Vec<Vec<f32>> {
        let s = Session::new(m.clone()).unwrap();
        s.run(&[("x", x.clone())])
            .unwrap()
            .into_iter()
            .map(|(_, t)| t.to_f32_vec().unwrap())
            .collect()
    }

    /// Outputs agree to 1e-4 of their largest magnitude.
    fn assert_same(a: &[Vec<f32>], b: &[Vec<f32>]) {
        assert_eq!(a.len(), b.len());
        for (a, b) in a.iter().zip(b) {
            assert_eq!(a.len(), b.len());
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "degenerate test output");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-4 * scale,
                    "output {i}: {x} before vs {y} after (scale {scale})"
                );
            }
        }
    }

    /// max |w| of each slice along `axis`, or of each block of `block` slices.
    fn ranges(t: &Tensor, axis: usize, block: usize) -> Vec<f32> {
        let shape = t.shape();
        let stride: usize = shape[axis + 1..].iter().product();
        let mut r = vec![0f32; shape[axis] / block];
        for (i, x) in t.to_f32_vec().unwrap().iter().enumerate() {
            let c = (i / stride) % shape[axis] / block;
            r[c] = r[c].max(x.abs());
        }
        r
    }

    fn init<'a>(m: &'a Model, name: &str) -> &'a Tensor {
        &m.graph.initializers[name]
    }

    fn close(a: f32, b: f32, rel: f32) -> bool {
        (a - b).abs() <= rel * a.abs().max(b.abs())
    }

    fn spread_of(r: &[f32]) -> f32 {
        let hi = r.iter().fold(0f32, |m, &x| m.max(x));
        let lo = r.iter().fold(f32::INFINITY, |m, &x| m.min(x));
        hi / lo
    }

    fn pads(n: Node, p: i64) -> Node {
        n.with_attr("pads", Attr::Ints(vec![p; 4]))
    }

    /// The per-channel expectation for one pair: both sides end at sqrt(r1 * r2).
    fn assert_balanced(r1: &[f32], r2: &[f32], after1: &[f32], after2: &[f32]) {
        for i in 0..r1.len() {
            let want = (r1[i] * r2[i]).sqrt();
            assert!(
                close(after1[i], want, 1e-5),
                "P channel {i}: {} vs {want}",
                after1[i]
            );
            assert!(
                close(after2[i], want, 1e-5),
                "C channel {i}: {} vs {want}",
                after2[i]
            );
        }
        let (m1, m2) = (
            after1.iter().fold(0f32, |m, &x| m.max(x)),
            after2.iter().fold(0f32, |m, &x| m.max(x)),
        );
        for i in 0..r1.len() {
            assert!(close(after1[i] / m1, after2[i] / m2, 1e-5));
        }
    }

    #[test]
    fn equalize_conv_relu_conv() {
        let mut rng = Rng(1);
        // Output channel ranges of c1 span 100x; c2's input channels vary too.
        let w1 = weight(&mut rng, &[8, 4, 3, 3], 0, |o| {
            10f32.powf(2.0 * o as f32 / 7.0)
        });
        let w2 = weight(&mut rng, &[6, 8, 3, 3], 1, |i| {
            10f32.powf(-((i * 3 % 8) as f32) / 4.0)
        });
        let b1 = t(&[8], rng.vec(8));
        let b2 = t(&[6], rng.vec(6));
        let m = build(
            vec![
                pads(Node::new("Conv", "c1", &["x", "w1", "b1"], &["y1"]), 1),
                Node::new("Relu", "r", &["y1"], &["a"]),
                pads(Node::new("Conv", "c2", &["a", "w2", "b2"], &["y"]), 1),
            ],
            vec![("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)],
            &[2, 4, 7, 7],
            &["y"],
        );
        let x = t(&[2, 4, 7, 7], rng.vec(2 * 4 * 49));
        let before = run(&m, &x);
        let (r1, r2) = (ranges(init(&m, "w1"), 0, 1), ranges(init(&m, "w2"), 1, 1));
        let (out, rec) = Equalize::default().run(m.clone()).unwrap();
        assert_same(&before, &run(&out, &x));
        assert_eq!(rec.changes.len(), 1, "{:?}", rec.changes);
        assert!(
            rec.changes[0].starts_with("Conv node 'c1' -> Conv node 'c2' via Relu: 8 channels"),
            "{}",
            rec.changes[0]
        );
        let (a1, a2) = (
            ranges(init(&out, "w1"), 0, 1),
            ranges(init(&out, "w2"), 1, 1),
        );
        assert_balanced(&r1, &r2, &a1, &a2);
        assert!(spread_of(&r1) > 50.0 && spread_of(&a1) < spread_of(&r1) / 3.0);
        // The bias follows its output channel.
        let (b0, b) = (
            init(&m, "b1").to_f32_vec().unwrap(),
            init(&out, "b1").to_f32_vec().unwrap(),
        );
        for i in 0..8 {
            let s = (r1[i] / r2[i]).sqrt();
            assert!(close(b[i], b0[i] / s, 1e-5), "bias {i}");
        }
        assert_eq!(init(&out, "b2"), init(&m, "b2"));
    }

    #[test]
    fn equalize_through_bias_add_and_maxpool() {
        let mut rng = Rng(2);
        let w1 = weight(&mut rng, &[5, 3, 3, 3], 0, |o| {
            [0.01, 1.0, 0.2, 3.0, 0.05][o]
        });
        let w2 = weight(&mut rng, &[4, 5, 2, 2], 1, |i| {
            [1.0, 0.02, 4.0, 0.5, 0.3][i]
        });
        let bias = t(&[1, 5, 1, 1], rng.vec(5));
        let m = build(
            vec![
                Node::new("Conv", "c1", &["x", "w1"], &["y1"]),
                Node::new("Add", "add", &["bias", "y1"], &["z"]),
                Node::new("MaxPool", "pool", &["z"], &["p"])
                    .with_attr("kernel_shape", Attr::Ints(vec![2, 2]))
                    .with_attr("strides", Attr::Ints(vec![2, 2])),
                Node::new("Conv", "c2", &["p", "w2"], &["y"]),
            ],
            vec![("w1", w1), ("bias", bias), ("w2", w2)],
            &[1, 3, 10, 10],
            &["y"],
        );
        let x = t(&[1, 3, 10, 10], rng.vec(300));
        let before = run(&m, &x);
        let (r1, r2) = (ranges(init(&m, "w1"), 0, 1), ranges(init(&m, "w2"), 1, 1));
        let (out, rec) = Equalize { iterations: 2 }.run(m.clone()).unwrap();
        assert_same(&before, &run(&out, &x));
        assert_eq!(rec.changes.len(), 1);
        assert!(
            rec.changes[0].contains("via Add, MaxPool"),
            "{}",
            rec.changes[0]
        );
        let (a1, a2) = (
            ranges(init(&out, "w1"), 0, 1),
            ranges(init(&out, "w2"), 1, 1),
        );
        assert_balanced(&r1, &r2, &a1, &a2);
        let (b0, b) = (
            init(&m, "bias").to_f32_vec().unwrap(),
            init(&out, "bias").to_f32_vec().unwrap(),
        );
        for i in 0..5 {
            assert!(
                close(b[i], b0[i] * (r2[i] / r1[i]).sqrt(), 1e-5),
                "bias {i}"
            );
        }
    }

    #[test]
    fn equalize_gemm_matmul_chain() {
        let mut rng = Rng(3);
        // Gemm (B is [N, K]) -> LeakyRelu -> MatMul -> Add -> Relu -> Gemm (B is [K, N]).
        let w1 = weight(&mut rng, &[10, 6], 0, |o| 10f32.powf(2.0 * o as f32 / 9.0));
        let w2 = weight(&mut rng, &[10, 7], 1, |n| 10f32.powf(-(n as f32) / 3.0));
        let w3 = weight(&mut rng, &[7, 4], 0, |k| 1.0 + k as f32);
        let m = build(
            vec![
                Node::new("Gemm", "g1", &["x", "w1", "c1"], &["h1"])
                    .with_attr("transB", Attr::Int(1)),
                Node::new("LeakyRelu", "lr", &["h1"], &["a1"]).with_attr("alpha", Attr::Float(0.1)),
                Node::new("MatMul", "m2", &["a1", "w2"], &["h2"]),
                Node::new("Add", "add", &["h2", "b2"], &["z2"]),
                Node::new("Relu", "r", &["z2"], &["a2"]),
                Node::new("Gemm", "g3", &["a2", "w3", "c3"], &["y"]),
            ],
            vec![
                ("w1", w1),
                ("c1", t(&[10], rng.vec(10))),
                ("w2", w2),
                ("b2", t(&[7], rng.vec(7))),
                ("w3", w3),
                ("c3", t(&[4], rng.vec(4))),
            ],
            &[3, 6],
            &["y"],
        );
        let x = t(&[3, 6], rng.vec(18));
        let before = run(&m, &x);
        let r1 = ranges(init(&m, "w1"), 0, 1);
        let r2 = ranges(init(&m, "w2"), 0, 1);
        let (out, rec) = Equalize { iterations: 1 }.run(m.clone()).unwrap();
        assert_same(&before, &run(&out, &x));
        assert_eq!(rec.changes.len(), 2, "{:?}", rec.changes);
        assert!(rec.changes[0].starts_with("Gemm node 'g1' -> MatMul node 'm2' via LeakyRelu:"));
        assert!(rec.changes[1].starts_with("MatMul node 'm2' -> Gemm node 'g3' via Add, Relu:"));
        // One sweep: the first pair saw the original weights; the second ends exactly balanced.
        let a1 = ranges(init(&out, "w1"), 0, 1);
        for i in 0..10 {
            assert!(close(a1[i], (r1[i] * r2[i]).sqrt(), 1e-5));
        }
        let (p2, c2) = (
            ranges(init(&out, "w2"), 1, 1),
            ranges(init(&out, "w3"), 0, 1),
        );
        for i in 0..7 {
            assert!(
                close(p2[i], c2[i], 1e-5),
                "channel {i}: {} vs {}",
                p2[i],
                c2[i]
            );
        }
        // More sweeps bring the first pair back towards balance as well.
        let (many, _) = Equalize { iterations: 30 }.run(m.clone()).unwrap();
        assert_same(&before, &run(&many, &x));
        let (o1, i2) = (
            ranges(init(&many, "w1"), 0, 1),
            ranges(init(&many, "w2"), 0, 1),
        );
        for i in 0..10 {
            assert!(
                close(o1[i], i2[i], 1e-2),
                "channel {i}: {} vs {}",
                o1[i],
                i2[i]
            );
        }
    }

    #[test]
    fn equalize_depthwise_and_flatten_to_gemm() {
        let mut rng = Rng(4);
        // Conv -> Relu -> depthwise Conv -> Relu -> MaxPool -> Flatten -> Gemm.
        let w1 = weight(&mut rng, &[6, 3, 3, 3], 0, |o| 10f32.powf(o as f32 / 2.5));
        let dw = weight(&mut rng, &[6, 1, 3, 3], 0, |o| {
            [1.0, 0.1, 5.0, 0.02, 2.0, 0.3][o]
        });
        // Gemm B is [N, K] with K = 6 channels x 2 x 2 features.
        let w3 = weight(&mut rng, &[3, 24], 1, |k| 1.0 + (k / 4) as f32 * 7.0);
        let m = build(
            vec![
                pads(Node::new("Conv", "c1", &["x", "w1", "b1"], &["y1"]), 1),
                Node::new("Relu", "r1", &["y1"], &["a1"]),
                pads(Node::new("Conv", "dw", &["a1", "dw"], &["y2"]), 1)
                    .with_attr("group", Attr::Int(6)),
                Node::new("Relu", "r2", &["y2"], &["a2"]),
                Node::new("MaxPool", "pool", &["a2"], &["p"])
                    .with_attr("kernel_shape", Attr::Ints(vec![2, 2]))
                    .with_attr("strides", Attr::Ints(vec![2, 2])),
                Node::new("Flatten", "flat", &["p"], &["f"]),
                Node::new("Add", "add", &["f", "fb"], &["g"]),
                Node::new("Gemm", "fc", &["g", "w3"], &["y"]).with_attr("transB", Attr::Int(1)),
            ],
            vec![
                ("w1", w1),
                ("b1", t(&[6], rng.vec(6))),
                ("dw", dw),
                ("fb", t(&[1, 24], rng.vec(24))),
                ("w3", w3),
            ],
            &[2, 3, 4, 4],
            &["y"],
        );
        let x = t(&[2, 3, 4, 4], rng.vec(96));
        let before = run(&m, &x);
        let (r1, r2) = (ranges(init(&m, "w1"), 0, 1), ranges(init(&m, "dw"), 0, 1));
        let (out, rec) = Equalize { iterations: 1 }.run(m.clone()).unwrap();
        assert_same(&before, &run(&out, &x));
        assert_eq!(rec.changes.len(), 2, "{:?}", rec.changes);
        assert!(
            rec.changes[1].contains("via Relu, MaxPool, Flatten, Add"),
            "{}",
            rec.changes[1]
        );
        // The first pair saw the original weights (depthwise: input i is output i).
        let a1 = ranges(init(&out, "w1"), 0, 1);
        for i in 0..6 {
            assert!(close(a1[i], (r1[i] * r2[i]).sqrt(), 1e-5), "channel {i}");
        }
        // The second ends balanced, with each channel owning a block of 4 features.
        let (p, c) = (
            ranges(init(&out, "dw"), 0, 1),
            ranges(init(&out, "w3"), 1, 4),
        );
        for i in 0..6 {
            assert!(close(p[i], c[i], 1e-5), "channel {i}: {} vs {}", p[i], c[i]);
        }
        // The bias added after Flatten moved with its channel's block of features.
        let (b0, b) = (
            init(&m, "fb").to_f32_vec().unwrap(),
            init(&out, "fb").to_f32_vec().unwrap(),
        );
        let (w0, w) = (
            init(&m, "w3").to_f32_vec().unwrap(),
            init(&out, "w3").to_f32_vec().unwrap(),
        );
        for f in 0..24 {
            // fc's input feature f grew by s_(f/4); the bias shrank by it.
            assert!(close(b[f] / b0[f], w0[f] / w[f], 1e-4), "feature {f}");
            assert!(!close(b[f], b0[f], 1e-3), "feature {f} kept its scale");
        }
    }

    #[test]
    fn equalize_through_reshape_probes_shapes() {
        let mut rng = Rng(6);
        // No declared shapes: the Reshape's input shape comes from a probe run.
        let w1 = weight(&mut rng, &[4, 2, 3, 3], 0, |o| [0.05, 2.0, 0.5, 9.0][o]);
        let w2 = weight(&mut rng, &[16, 3], 0, |k| 1.0 + (k % 5) as f32);
        let m = build(
            vec![
                Node::new("Conv", "c1", &["x", "w1"], &["y1"]),
                Node::new("Relu", "r", &["y1"], &["a"]),
                Node::new("Reshape", "flat", &["a", "shape"], &["f"]),
                Node::new("MatMul", "mm", &["f", "w2"], &["y"]),
            ],
            vec![
                ("w1", w1),
                ("shape", Tensor::from_vec(vec![2], vec![1i64, 16]).unwrap()),
                ("w2", w2),
            ],
            &[1, 2, 4, 4],
            &["y"],
        );
        let x = t(&[1, 2, 4, 4], rng.vec(32));
        let before = run(&m, &x);
        let (r1, r2) = (ranges(init(&m, "w1"), 0, 1), ranges(init(&m, "w2"), 0, 4));
        let (out, rec) = Equalize::default().run(m.clone()).unwrap();
        assert_same(&before, &run(&out, &x));
        assert_eq!(rec.changes.len(), 1, "{:?}", rec.changes);
        assert!(rec.changes[0]
            .starts_with("Conv node 'c1' -> MatMul node 'mm' via Relu, Reshape: 4 channels"));
        let (a1, a2) = (
            ranges(init(&out, "w1"), 0, 1),
            ranges(init(&out, "w2"), 0, 4),
        );
        assert_balanced(&r1, &r2, &a1, &a2);
    }

    /// Conv -> `mid` -> Conv with the given extra nodes and outputs.
    fn pair_with(mid: &str, extra: Vec<Node>, outs: &[&str]) -> Model {
        let mut rng = Rng(5);
        let mut nodes = vec![
            Node::new("Conv", "c1", &["x", "w1"], &["y1"]),
            Node::new(mid, "mid", &["y1"], &["a"]),
            Node::new("Conv", "c2", &["a", "w2"], &["y"]),
        ];
        nodes.extend(extra);
        build(
            nodes,
            vec![
                (
                    "w1",
                    weight(&mut rng, &[4, 2, 1, 1], 0, |o| 10f32.powi(o as i32)),
                ),
                ("w2", weight(&mut rng, &[3, 4, 1, 1], 1, |_| 1.0)),
            ],
            &[1, 2, 3, 3],
            outs,
        )
    }

    #[test]
    fn equalize_leaves_unsafe_pairs_alone() {
        let cases = [
            ("through Sigmoid", pair_with("Sigmoid", vec![], &["y"])),
            (
                "intermediate is an output",
                pair_with("Relu", vec![], &["y", "a"]),
            ),
            (
                "second consumer",
                pair_with(
                    "Relu",
                    vec![Node::new("Neg", "n", &["a"], &["z"])],
                    &["y", "z"],
                ),
            ),
            (
                "producer output read twice",
                pair_with(
                    "Relu",
                    vec![Node::new("Neg", "n", &["y1"], &["z"])],
                    &["y", "z"],
                ),
            ),
        ];
        for (why, m) in cases {
            let (out, rec) = Equalize::default().run(m.clone()).unwrap();
            assert_eq!(out, m, "{why}");
            assert!(rec.changes.is_empty(), "{why}: {:?}", rec.changes);
        }
        // The same pair through Relu is equalized (so the cases above fail for the right reason).
        let m = pair_with("Relu", vec![], &["y"]);
        let (out, rec) = Equalize::default().run(m.clone()).unwrap();
        assert_eq!(rec.changes.len(), 1);
        assert_ne!(out, m);
        // A weight that another node reads as well is skipped with a note.
        let m = pair_with(
            "Relu",
            vec![Node::new("Conv", "c3", &["x", "w1"], &["z"])],
            &["y", "z"],
        );
        let (out, rec) = Equalize::default().run(m.clone()).unwrap();
        assert_eq!(out, m);
        assert_eq!(
            rec.changes,
            vec!["skipped Conv node 'c1' -> Conv node 'c2' via Relu: 'w1' is also read elsewhere"]
        );
    }

    fn asset(rel: &str) -> PathBuf {
        let dir = std::env::var_os("SMELT_ASSETS")
            .map(PathBuf::from)
            .or_else(|| {
                let cache = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"))
                    })?;
                Some(cache.join("smelt").join("assets"))
            })
            .expect("no asset directory: run scripts/fetch-assets.sh");
        let p = dir.join(rel);
        assert!(
            p.exists(),
            "missing test asset {}: run scripts/fetch-assets.sh",
            p.display()
        );
        p
    }

    #[test]
    fn equalize_mnist8_keeps_its_outputs() {
        let m = smelt_onnx::load(&asset("mnist-8/model.onnx")).unwrap();
        let x = smelt_onnx::load_tensor(&asset("mnist-8/test_data_set_0/input_0.pb")).unwrap();
        let want = smelt_onnx::load_tensor(&asset("mnist-8/test_data_set_0/output_0.pb"))
            .unwrap()
            .to_f32_vec()
            .unwrap();
        let input = m.graph.runtime_inputs().next().unwrap().name.clone();
        let run = |m: &Model| {
            let s = Session::new(m.clone()).unwrap();
            s.run(&[(input.as_str(), x.clone())]).unwrap()[0]
                .1
                .to_f32_vec()
                .unwrap()
        };
        let before = run(&m);
        let (out, rec) = Equalize::default().run(m.clone()).unwrap();
        let after = run(&out);
        for c in &rec.changes {
            eprintln!("{c}");
        }
        assert_eq!(rec.changes.len(), 2, "{:?}", rec.changes);
        assert!(rec.changes[0].starts_with(
            "Conv node 'Convolution28' -> Conv node 'Convolution110' via Add, Relu, MaxPool: 8 channels"
        ));
        assert!(rec.changes[1].starts_with(
            "Conv node 'Convolution110' -> MatMul node 'Times212' via Add, Relu, MaxPool, Reshape: 16 channels"
        ));
        for name in [
            "Parameter5",
            "Parameter6",
            "Parameter87",
            "Parameter88",
            "Parameter193",
        ] {
            assert_ne!(init(&out, name), init(&m, name), "{name} was not rescaled");
        }
        let after = [after];
        assert_same(&[want], &after);
        assert_same(&[before], &after);
        // The first conv's 8 output channels end closer together than they started.
        let (r0, r1) = (
            ranges(init(&m, "Parameter5"), 0, 1),
            ranges(init(&out, "Parameter5"), 0, 1),
        );
        assert!(
            spread_of(&r1) < spread_of(&r0),
            "{} -> {}",
            spread_of(&r0),
            spread_of(&r1)
        );
    }
}
