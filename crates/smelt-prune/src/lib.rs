//! Pruning: remove what a model does not need.
//!
//! Layout: `targets` finds the prunable weights, `importance` scores them, `unstructured`
//! turns scores into masks (layer-wise, global, N:M), `mask` holds and saves masks, and
//! `structured` finds the coupled channel groups and slices them out of the graph; `blocks`
//! removes whole residual blocks. [`prune`] runs them and returns the model, its masks and a
//! [`Report`].

pub mod blocks;
pub mod importance;
pub mod mask;
pub mod structured;
pub mod targets;
pub mod unstructured;

pub use importance::Criterion;
pub use mask::{Mask, Masks};
pub use unstructured::{cubic_schedule, Scope};

use serde::Serialize;
use smelt_engine::analysis::{infer_shapes, InputSpec};
use smelt_engine::passes::FoldConstants;
use smelt_engine::{Feed, Session};
use smelt_ir::pattern::matches_node;
use smelt_ir::{Model, Pass};
use smelt_tensor::{bail, DType, Result};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// Single weights, ranked per layer or over all layers.
    Unstructured(Scope),
    /// N of every M consecutive weights along the input axis are kept.
    NOfM(usize, usize),
    /// Whole output channels, neurons and heads: the graph gets smaller.
    Channels,
    /// Only `remove_blocks`.
    None,
}

impl Method {
    /// `unstructured` (with `scope` layer or global), `N:M` such as 2:4, `channels` or `none`.
    pub fn parse(pattern: &str, scope: &str) -> Result<Method> {
        Ok(match pattern {
            "unstructured" => Method::Unstructured(match scope {
                "global" => Scope::Global,
                "layer" => Scope::Layer,
                s => bail!(Input, "unknown scope '{s}' (expected layer or global)"),
            }),
            "channels" => Method::Channels,
            "none" => Method::None,
            p => match p.split_once(':') {
                Some((n, m)) => match (n.parse(), m.parse()) {
                    (Ok(n), Ok(m)) => Method::NOfM(n, m),
                    _ => bail!(Input, "pattern '{p}': N:M needs two integers, e.g. 2:4"),
                },
                None => bail!(
                    Input,
                    "unknown pattern '{p}' (expected unstructured, N:M such as 2:4, channels or none)"
                ),
            },
        })
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub method: Method,
    pub criterion: Criterion,
    /// Fraction of weights (or channels) removed where no override applies.
    pub sparsity: f64,
    /// (node name, op type, weight name or glob; fraction) — the first match wins.
    pub overrides: Vec<(String, f64)>,
    pub ops: Vec<String>,
    pub exclude: Vec<String>,
    /// Residual blocks to remove, named by their Add or any node inside.
    pub remove_blocks: Vec<String>,
    /// Attention heads to remove from every attention layer (channel pruning), instead of
    /// `sparsity` of them.
    pub heads: Option<usize>,
    /// Per-element scores for [`Criterion::Taylor`], by weight name.
    pub gradient_scores: Option<std::sync::Arc<importance::Scores>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            method: Method::Unstructured(Scope::Layer),
            criterion: Criterion::L1,
            sparsity: 0.5,
            overrides: vec![],
            ops: targets::DEFAULT_OPS.iter().map(|s| s.to_string()).collect(),
            exclude: vec![],
            remove_blocks: vec![],
            heads: None,
            gradient_scores: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerRecord {
    pub layer: String,
    pub op: String,
    pub weight: String,
    pub params: usize,
    pub zeros: usize,
    pub sparsity: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupRecord {
    pub root: String,
    /// Channels (or heads) before pruning.
    pub channels: usize,
    /// Elements per channel: 1, or the head size.
    pub unit: usize,
    pub removed: Vec<usize>,
    /// Tensors that shrank with it.
    pub members: usize,
    /// Importance of every channel (the criterion's score), for reports.
    pub scores: Vec<f32>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub method: String,
    pub criterion: String,
    pub layers: Vec<LayerRecord>,
    pub groups: Vec<GroupRecord>,
    /// Channel groups that could not be pruned, with the node that stops each.
    pub refused: Vec<structured::Refusal>,
    /// Layers left dense, with the reason.
    pub skipped: Vec<(String, String)>,
    pub blocks_removed: Vec<blocks::Block>,
    pub notes: Vec<String>,
}

/// Rejects models with non-finite weights: scores over NaN rank arbitrarily.
fn check_weights(model: &Model) -> Result<()> {
    for (name, t) in &model.graph.initializers {
        if t.dtype() == DType::F32 && t.as_slice::<f32>()?.iter().any(|x| !x.is_finite()) {
            bail!(
                Input,
                "weight '{name}' contains NaN or Inf: fix the model before pruning"
            );
        }
    }
    Ok(())
}

/// The shape of every value of the model's own graph (the reference session keeps them all;
/// the running one fuses some away).
fn shapes(model: &Model) -> Result<HashMap<String, (DType, Vec<usize>)>> {
    let s = Session::reference(model.clone())?;
    infer_shapes(&s, &InputSpec::default())
}

/// Prunes `model`. `calib` feeds activation-aware criteria (Wanda).
pub fn prune(model: Model, opts: &Options, calib: &[Feed]) -> Result<(Model, Masks, Report)> {
    let mut report = Report {
        method: match opts.method {
            Method::Unstructured(Scope::Layer) => "unstructured (layer-wise)".into(),
            Method::Unstructured(Scope::Global) => "unstructured (global)".into(),
            Method::NOfM(n, m) => format!("{n}:{m} semi-structured"),
            Method::Channels => "structured (channels)".into(),
            Method::None => "blocks only".into(),
        },
        criterion: opts.criterion.name().into(),
        ..Default::default()
    };
    let mut model = model;
    model.graph.drop_initializer_inputs();
    // Weights written as Constant nodes or Reshapes of constants become initializers.
    let (mut model, _) = FoldConstants {
        max_elements: 1 << 28,
    }
    .run(model)?;
    check_weights(&model)?;

    if !opts.remove_blocks.is_empty() {
        let sh = shapes(&model)?;
        for pat in &opts.remove_blocks {
            let found = blocks::find(&model.graph, &sh);
            let Some(b) = found.iter().find(|b| blocks::names(&model.graph, b, pat)) else {
                let known: Vec<&str> = found.iter().map(|b| b.add.as_str()).collect();
                bail!(
                    Input,
                    "--remove-block '{pat}' names no residual block (blocks found: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                );
            };
            blocks::remove(&mut model.graph, b)?;
            report.blocks_removed.push(b.clone());
        }
    }

    let mut masks = Masks::default();
    match opts.method {
        Method::None => {}
        Method::Unstructured(_) | Method::NOfM(..) => {
            let ts = targets::find(&model.graph, &opts.ops, &opts.exclude)?;
            if ts.is_empty() {
                bail!(
                    Input,
                    "no prunable weights: no {} node with a constant float weight",
                    opts.ops.join("/")
                );
            }
            let overrides = layer_overrides(&model, &ts, &opts.overrides)?;
            let norms = if opts.criterion.needs_data() {
                importance::input_norms(&model, &ts, calib)?
            } else {
                HashMap::new()
            };
            let mut scores = Vec::with_capacity(ts.len());
            for t in &ts {
                let w = model.graph.initializers[&t.weight].to_f32_vec()?;
                let n = norms.get(&t.input).map(Vec::as_slice);
                scores.push(importance::element_scores(
                    opts.criterion,
                    t,
                    &w,
                    n,
                    opts.gradient_scores.as_deref(),
                )?);
            }
            if opts.criterion == Criterion::Wanda
                && opts.method == Method::Unstructured(Scope::Global)
            {
                report.notes.push(
                    "wanda scores are not comparable across layers (they scale with each layer's \
                     inputs); --scope layer usually keeps more accuracy"
                        .into(),
                );
            }
            masks = match opts.method {
                Method::Unstructured(scope) => {
                    unstructured::masks(&ts, &scores, scope, opts.sparsity, &overrides)?
                }
                Method::NOfM(n, m) => {
                    let (mk, skipped) = unstructured::n_of_m(&ts, &scores, n, m)?;
                    report.skipped = skipped;
                    mk
                }
                _ => unreachable!(),
            };
            masks.apply(&mut model.graph)?;
            for t in &ts {
                if let Some(m) = masks.0.get(&t.weight) {
                    let zeros = m.keep.iter().filter(|k| !**k).count();
                    report.layers.push(LayerRecord {
                        layer: t.layer.clone(),
                        op: t.op.clone(),
                        weight: t.weight.clone(),
                        params: t.numel(),
                        zeros,
                        sparsity: zeros as f64 / t.numel() as f64,
                    });
                }
            }
        }
        Method::Channels => {
            model = prune_channels(model, opts, calib, &mut report)?;
        }
    }
    Ok((model, masks, report))
}

/// The override fraction of each target: the first pattern naming its node or weight.
/// A pattern that names nothing is an error.
fn layer_overrides(
    model: &Model,
    ts: &[targets::WeightTarget],
    overrides: &[(String, f64)],
) -> Result<Vec<Option<f64>>> {
    let g = &model.graph;
    for (p, _) in overrides {
        if !ts
            .iter()
            .any(|t| matches_node(p, &g.nodes[t.node]) || &t.weight == p)
        {
            bail!(Input, "--layer '{p}' names no prunable layer or weight");
        }
    }
    Ok(ts
        .iter()
        .map(|t| {
            overrides
                .iter()
                .find(|(p, _)| matches_node(p, &g.nodes[t.node]) || &t.weight == p)
                .map(|o| o.1)
        })
        .collect())
}

fn prune_channels(
    model: Model,
    opts: &Options,
    calib: &[Feed],
    report: &mut Report,
) -> Result<Model> {
    let before = shapes(&model)?;
    let (groups, refused) = structured::find_groups(&model, &before);
    let g = &model.graph;
    let excluded = |grp: &structured::Group| {
        let n = &g.nodes[grp.root_node];
        !opts.ops.contains(&n.op_type) || opts.exclude.iter().any(|p| matches_node(p, n))
    };
    for (p, _) in &opts.overrides {
        let names = |n: usize| matches_node(p, &g.nodes[n]);
        if !groups.iter().any(|grp| names(grp.root_node)) {
            match refused.iter().find(|r| {
                g.nodes
                    .iter()
                    .any(|n| n.label() == r.root && matches_node(p, n))
            }) {
                Some(r) => bail!(
                    Unsupported,
                    "--layer '{p}': {} cannot be pruned safely: {} ({})",
                    r.root,
                    r.reason,
                    r.node
                ),
                None => bail!(Input, "--layer '{p}' names no prunable layer"),
            }
        }
    }
    if groups.iter().all(excluded) {
        let why = refused
            .first()
            .map(|r| format!(": {} stops at {}: {}", r.root, r.node, r.reason))
            .unwrap_or_default();
        bail!(
            Unsupported,
            "no channel group of this model can be pruned safely{why}"
        );
    }
    let act_norms = if opts.criterion == Criterion::Wanda {
        let mut axes: HashMap<String, usize> = HashMap::new();
        for grp in groups.iter().filter(|grp| !excluded(grp)) {
            for c in structured::consumers(&model.graph, grp) {
                axes.insert(c.value, c.axis);
            }
        }
        importance::axis_norms(&model, &axes, calib)?
    } else {
        HashMap::new()
    };
    let mut out = model.clone();
    let mut applied = Vec::new();
    for grp in groups.iter().filter(|grp| !excluded(grp)) {
        let n = &g.nodes[grp.root_node];
        let frac = opts
            .overrides
            .iter()
            .find(|(p, _)| matches_node(p, n))
            .map(|o| o.1);
        let k = match (frac, opts.heads) {
            (None, Some(h)) if grp.unit > 1 => {
                if h >= grp.channels {
                    bail!(
                        Input,
                        "--heads {h}: {} has only {} heads",
                        grp.root,
                        grp.channels
                    );
                }
                h
            }
            _ => {
                let frac = frac.unwrap_or(opts.sparsity);
                if !(0.0..1.0).contains(&frac) {
                    bail!(
                        Input,
                        "channel fraction {frac} for {} is outside [0, 1)",
                        grp.root
                    );
                }
                ((frac * grp.channels as f64).round() as usize).min(grp.channels - 1)
            }
        };
        let scores = if opts.criterion == Criterion::Wanda {
            let cons = structured::consumers(&model.graph, grp);
            structured::activation_scores(&model.graph, grp, &cons, &act_norms)?
        } else {
            structured::channel_scores(
                &model.graph,
                grp,
                opts.criterion,
                opts.gradient_scores.as_deref(),
            )?
        };
        let cut = structured::lowest(&scores, k);
        applied.push((grp, cut.clone()));
        report.groups.push(GroupRecord {
            root: grp.root.clone(),
            channels: grp.channels,
            unit: grp.unit,
            removed: cut,
            members: grp.members.len(),
            scores,
        });
    }
    structured::remove_channels(&mut out, &applied)?;
    report.refused = refused;
    verify(&model, &out, &before, &applied)?;
    Ok(out)
}

/// Runs the pruned model once: its outputs keep their shapes, and every coupled value shrank
/// by exactly what its group lost. Anything else is refused rather than written.
fn verify(
    orig: &Model,
    pruned: &Model,
    before: &HashMap<String, (DType, Vec<usize>)>,
    applied: &[(&structured::Group, Vec<usize>)],
) -> Result<()> {
    let after = shapes(pruned).map_err(|e| {
        e.context("the pruned model does not run; smelt refuses to write it (please report this)")
    })?;
    for o in &orig.graph.outputs {
        if before.get(&o.name).map(|s| &s.1) != after.get(&o.name).map(|s| &s.1) {
            bail!(
                Invalid,
                "pruning changed the shape of output '{}': refused",
                o.name
            );
        }
    }
    let mut expect: HashMap<(&str, usize), usize> = HashMap::new();
    for (grp, removed) in applied {
        for m in grp.members.iter().filter(|m| !m.constant) {
            let e = expect
                .entry((m.name.as_str(), m.axis))
                .or_insert(before[&m.name].1[m.axis]);
            *e -= removed.len() * m.map.outer * m.map.unit;
        }
    }
    for ((name, axis), want) in expect {
        let Some((_, s)) = after.get(name) else {
            continue;
        };
        if s.get(axis) != Some(&want) {
            let at = pruned
                .graph
                .producer(name)
                .map(|p| pruned.graph.nodes[p].label())
                .unwrap_or_else(|| name.to_string());
            bail!(
                Unsupported,
                "after pruning, '{name}' (from {at}) has shape {s:?}, expected {want} along axis {axis}: \
                 a reshape there does not follow the channels; exclude that layer"
            );
        }
    }
    Ok(())
}
