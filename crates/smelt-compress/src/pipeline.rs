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

/// Applies `recipe` to `model`. `progress(stage, done, total)` reports fine-tuning steps.
pub fn run(
    model: Model,
    recipe: &Recipe,
    data: &Data,
    seed: u64,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Outcome> {
    let original = model.clone();
    let before = measure(&model, data.val.as_ref())?;
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
                format!(
                    "{}, {} importance: {:.1}% removed",
                    report.method,
                    report.criterion,
                    100.0 * sparsity
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
                    distill: (*distill > 0.0).then(|| Distill {
                        teacher: original.clone(),
                        temperature: 4.0,
                        alpha: *distill,
                    }),
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
            Stage::Quantize {
                mode,
                weight_type,
                granularity,
                block_size,
                observer,
                calib,
            } => {
                let mode = Mode::parse(mode)?;
                let opts = smelt_quant::Options {
                    mode,
                    weights: WeightScheme::parse(
                        mode == Mode::WeightOnly,
                        weight_type.as_deref(),
                        granularity.as_deref(),
                        *block_size,
                    )?,
                    observer: ObserverKind::parse(observer, 99.999, 2048)?,
                    ..Default::default()
                };
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
