//! Running a recipe: each stage calls the library that owns it (smelt-prune, smelt-train,
//! smelt-quant) on the previous stage's model, and the model is measured after every stage.

use crate::measure::{measure, Measure};
use crate::recipe::{Recipe, Stage};
use serde::Serialize;
use smelt_engine::Feed;
use smelt_ir::Model;
use smelt_prune::{Criterion, Masks, Method};
use smelt_quant::{Mode, ObserverKind, WeightScheme};
use smelt_tensor::Result;
use smelt_train::optim::{Optimizer, Schedule};
use smelt_train::{Distill, Qat, Samples};
use std::time::Instant;

/// Labelled data for a run: `train` feeds calibration and fine-tuning, `val` the measurements.
pub struct Data<'a> {
    pub train: Samples<'a>,
    pub val: Option<Samples<'a>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StageRecord {
    pub kind: &'static str,
    /// What the stage did, in a line.
    pub summary: String,
    pub seconds: f64,
    /// The model measured after the stage.
    pub after: Measure,
}

pub struct Outcome {
    pub model: Model,
    pub before: Measure,
    pub stages: Vec<StageRecord>,
    /// Pruning masks still held at the end.
    pub masks: Option<Masks>,
    /// Per-layer bits chosen by a mixed-precision search, with the reasons.
    pub precision: Vec<smelt_quant::mixed::LayerChoice>,
    /// What the quantize stage did per tensor (bits, error, fallbacks), if one ran.
    pub manifest: Option<smelt_quant::Manifest>,
}

/// Taylor importance over the first 1,024 training samples.
pub fn taylor(model: &Model, train: &Samples) -> Result<smelt_prune::importance::Scores> {
    let n = train.y.len().min(1024);
    let x = smelt_train::rows(train.x, &(0..n).collect::<Vec<_>>())?;
    let part = Samples {
        x: &x,
        y: &train.y[..n],
    };
    smelt_train::taylor_scores(model.clone(), &part, 64, 1.0)
}

/// Per-layer channel fractions that remove `target` of all channels, shared out by measured
/// sensitivity: each layer is pruned alone at each step of a grid and scored on the first 1,000
/// training samples; then, greedily, the layer whose next step costs the least accuracy per
/// channel removed takes that step, until enough channels are gone.
fn channel_shares(
    model: &Model,
    opts: &smelt_prune::Options,
    target: f64,
    train: &Samples,
    calib: &[Feed],
) -> Result<Vec<(String, f64)>> {
    const GRID: [f64; 6] = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75];
    let n = train.y.len().min(1000);
    let x = smelt_train::rows(train.x, &(0..n).collect::<Vec<_>>())?;
    let tune = Samples {
        x: &x,
        y: &train.y[..n],
    };
    let base = crate::measure::accuracy(model, &tune)?;
    let prepared = smelt_train::prepare(model.clone())?;
    let shapes = smelt_engine::analysis::infer_shapes(
        &smelt_engine::Session::reference(prepared.clone())?,
        &Default::default(),
    )?;
    let (groups, _) = smelt_prune::structured::find_groups(&prepared, &shapes);
    // (node name, channels, cost at each grid step)
    let mut layers: Vec<(String, usize, Vec<f64>)> = Vec::new();
    for g in groups.iter().filter(|g| g.channels >= 2) {
        let name = prepared.graph.nodes[g.root_node].name.clone();
        if name.is_empty()
            || !opts
                .ops
                .contains(&prepared.graph.nodes[g.root_node].op_type)
        {
            continue;
        }
        let mut costs = Vec::new();
        for f in GRID {
            smelt_tensor::interrupt::check()?;
            let one = smelt_prune::Options {
                sparsity: 0.0,
                overrides: vec![(name.clone(), f)],
                ..opts.clone()
            };
            let (m, _, _) = smelt_prune::prune(model.clone(), &one, calib)?;
            costs.push(base - crate::measure::accuracy(&m, &tune)?);
        }
        layers.push((name, g.channels, costs));
    }
    let total: usize = layers.iter().map(|l| l.1).sum();
    let want = (target * total as f64).round() as usize;
    // As the pruner counts: rounded, at least one channel kept.
    let removed_at = |l: &(String, usize, Vec<f64>), step: usize| -> usize {
        if step == 0 {
            0
        } else {
            ((GRID[step - 1] * l.1 as f64).round() as usize).min(l.1 - 1)
        }
    };
    let mut step = vec![0usize; layers.len()];
    let mut removed = 0usize;
    while removed < want {
        let next = (0..layers.len())
            .filter(|&i| step[i] < GRID.len())
            .map(|i| {
                let l = &layers[i];
                let cost_now = if step[i] == 0 { 0.0 } else { l.2[step[i] - 1] };
                let gain = (removed_at(l, step[i] + 1) - removed_at(l, step[i])).max(1);
                (i, (l.2[step[i]] - cost_now).max(0.0) / gain as f64)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let Some((i, _)) = next else { break };
        removed += removed_at(&layers[i], step[i] + 1) - removed_at(&layers[i], step[i]);
        step[i] += 1;
    }
    Ok(layers
        .iter()
        .zip(&step)
        .filter(|(_, &s)| s > 0)
        .map(|(l, &s)| (l.0.clone(), GRID[s - 1]))
        .collect())
}

/// The first `n` training samples as engine feeds of `batch` rows.
fn feeds(model: &Model, data: &Samples, n: usize, batch: usize) -> Result<Vec<Feed>> {
    let input = smelt_train::input_name(model)?;
    // A model with a fixed batch of 1 is calibrated one sample at a time.
    let fixed_one = model
        .graph
        .runtime_inputs()
        .next()
        .and_then(|v| v.shape.as_ref()?.first().cloned())
        == Some(smelt_ir::Dim::Fixed(1));
    let batch = if fixed_one { 1 } else { batch.max(1) };
    let idx: Vec<usize> = (0..n.min(data.y.len())).collect();
    idx.chunks(batch)
        .map(|c| Ok(vec![(input.clone(), smelt_train::rows(data.x, c)?)]))
        .collect()
}

/// The quantizer's options for a quantize stage (defaults for any other stage).
pub fn quantize_options(stage: &Stage) -> Result<smelt_quant::Options> {
    let Stage::Quantize {
        mode,
        weight_type,
        granularity,
        block_size,
        observer,
        ..
    } = stage
    else {
        return Ok(Default::default());
    };
    let mode = Mode::parse(mode)?;
    Ok(smelt_quant::Options {
        mode,
        weights: WeightScheme::parse(
            mode == Mode::WeightOnly,
            weight_type.as_deref(),
            granularity.as_deref(),
            *block_size,
        )?,
        observer: ObserverKind::parse(observer, 99.999, 2048)?,
        ..Default::default()
    })
}

/// Applies `recipe` to `model`. `progress(stage, done, total)` reports fine-tuning steps.
pub fn run(
    model: Model,
    recipe: &Recipe,
    data: &Data,
    before: Measure,
    seed: u64,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Outcome> {
    let original = model.clone();
    let mut model = model;
    let mut masks: Option<Masks> = None;
    let mut manifest = None;
    let mut stages = Vec::new();
    for (i, stage) in recipe.stages.iter().enumerate() {
        smelt_tensor::interrupt::check()?;
        let started = Instant::now();
        let label = format!("{} {}", i + 1, stage.kind());
        let summary = match stage {
            Stage::Prune {
                pattern,
                sparsity,
                scope,
                criterion,
                per_layer,
            } => {
                let mut opts = smelt_prune::Options {
                    method: Method::parse(pattern, scope)?,
                    criterion: Criterion::parse(criterion, seed)?,
                    sparsity: *sparsity,
                    ..Default::default()
                };
                if opts.criterion == Criterion::Taylor {
                    opts.gradient_scores = Some(std::sync::Arc::new(taylor(&model, &data.train)?));
                }
                let calib = if opts.criterion.needs_data() {
                    feeds(&model, &data.train, 128, 32)?
                } else {
                    vec![]
                };
                let mut shares = String::new();
                if *per_layer {
                    let fractions = channel_shares(&model, &opts, *sparsity, &data.train, &calib)?;
                    shares = fractions
                        .iter()
                        .map(|(n, f)| format!("{n} {:.0}%", 100.0 * f))
                        .collect::<Vec<_>>()
                        .join(", ");
                    shares = format!(" (per layer by sensitivity: {shares})");
                    opts.overrides = fractions;
                    opts.sparsity = 0.0;
                }
                let (m, mk, report) = smelt_prune::prune(model, &opts, &calib)?;
                model = m;
                // Channel pruning changes shapes: earlier masks no longer fit.
                masks = match (opts.method, masks.take()) {
                    (Method::Channels, _) => None,
                    (_, Some(mut old)) => {
                        old.0.extend(mk.0);
                        Some(old)
                    }
                    (_, None) => (!mk.0.is_empty()).then_some(mk),
                };
                // Channels: what was actually removed (the pruner keeps at least one per layer).
                let done = match opts.method {
                    Method::Channels => {
                        let (r, c) = report
                            .groups
                            .iter()
                            .fold((0, 0), |(r, c), g| (r + g.removed.len(), c + g.channels));
                        r as f64 / c.max(1) as f64
                    }
                    _ => *sparsity,
                };
                format!(
                    "{}, {} importance: {:.1}% removed{shares}",
                    report.method,
                    report.criterion,
                    100.0 * done
                )
            }
            Stage::Finetune {
                epochs,
                lr,
                batch,
                optimizer,
                max_steps,
                loss_temperature,
                distill,
                qat,
            } => {
                let opts = smelt_train::Options {
                    epochs: *epochs,
                    batch: *batch,
                    lr: *lr,
                    optimizer: Optimizer::parse(optimizer, 0.9)?,
                    schedule: Schedule::Cosine { warmup: 0 },
                    seed,
                    distill: (*distill > 0.0)
                        .then(|| Distill::logits(original.clone(), 4.0, *distill)),
                    masks: masks.clone(),
                    max_steps: *max_steps,
                    qat: match qat.as_deref() {
                        None => None,
                        Some(s) => Some(Qat {
                            quant: smelt_quant::Options {
                                weights: Qat::weights(s)?,
                                ..Default::default()
                            },
                            calib: 500,
                            learn_scales: false,
                        }),
                    },
                    loss_temperature: *loss_temperature,
                    ..Default::default()
                };
                let t = smelt_train::finetune(model, &data.train, data.val.as_ref(), &opts, |p| {
                    progress(&label, p.step, p.steps)
                })?;
                model = t.model;
                masks = t.masks;
                let last = t.history.last();
                format!(
                    "{} epoch(s), lr {lr}, final train loss {:.4}{}",
                    t.history.len(),
                    last.map_or(f64::NAN, |e| e.train_loss),
                    qat.as_ref()
                        .map(|q| format!(", QAT {q}"))
                        .unwrap_or_default()
                )
            }
            Stage::Quantize { calib, .. } => {
                let opts = quantize_options(stage)?;
                let mode = opts.mode;
                let feeds = if mode == Mode::Static {
                    feeds(&model, &data.train, *calib, 32)?
                } else {
                    vec![]
                };
                let (m, man) =
                    smelt_quant::quantize(model, &opts, &feeds, |_, d, n| progress(&label, d, n))?;
                model = m;
                // Integer weights cannot be masked any more; their zeros are kept exactly.
                masks = None;
                let summary = format!(
                    "{} {}, {} nodes quantized, {} left in float",
                    mode.name(),
                    opts.weights.qtype.name(),
                    man.nodes_quantized,
                    man.fallbacks.len()
                );
                manifest = Some(man);
                summary
            }
        };
        let after = measure(&model, data.val.as_ref())?;
        stages.push(StageRecord {
            kind: stage.kind(),
            summary,
            seconds: started.elapsed().as_secs_f64(),
            after,
        });
    }
    Ok(Outcome {
        model,
        before,
        stages,
        masks,
        precision: vec![],
        manifest,
    })
}
