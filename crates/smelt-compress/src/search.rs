//! Budget-driven search: try candidate recipes from the gentlest to the most aggressive, measure
//! each on this machine, and keep the smallest one that meets the budget. A candidate that is
//! neither smaller nor faster than the original is rejected, however accurate: a compression
//! that gains nothing is not a result. Among accepted candidates, one that is both smaller and
//! clearly faster (by 15%) beats one that is only smaller; then the smallest file wins, then
//! the fastest.
//!
//! A stop request ([`smelt_tensor::interrupt`]) ends the search at once: the candidate running
//! is abandoned and the best one so far is kept.

use crate::measure::{latency_pair, measure, Measure};
use crate::pipeline::{self, Data, Outcome, StageRecord};
use crate::recipe::{Recipe, Stage};
use serde::Serialize;
use smelt_engine::{Feed, Session};
use smelt_ir::Model;
use smelt_tensor::{bail, Result};
use std::time::{Duration, Instant};

/// The ready recipes of `recipes/`, gentlest first: the default candidates.
pub const BUILTIN: [(&str, &str); 6] = [
    (
        "int8-static",
        include_str!("../../../recipes/int8-static.toml"),
    ),
    (
        "int4-weight-only",
        include_str!("../../../recipes/int4-weight-only.toml"),
    ),
    (
        "channels30-int4",
        include_str!("../../../recipes/channels30-int4.toml"),
    ),
    (
        "channels40-per-layer-int4",
        include_str!("../../../recipes/channels40-per-layer-int4.toml"),
    ),
    (
        "prune50-int8",
        include_str!("../../../recipes/prune50-int8.toml"),
    ),
    (
        "channels50-int8",
        include_str!("../../../recipes/channels50-int8.toml"),
    ),
];

pub fn builtin() -> Result<Vec<Recipe>> {
    BUILTIN.iter().map(|(_, t)| Recipe::parse(t)).collect()
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Budget {
    /// Accuracy the result may lose, in points (0.5 = half a percentage point).
    pub max_accuracy_drop: Option<f64>,
    /// Largest acceptable file, in bytes.
    pub target_bytes: Option<u64>,
    /// Slowest acceptable latency at `batch`, in ms, in smelt's engine.
    pub target_latency_ms: Option<f64>,
    /// Lowest acceptable fidelity to the original (mean cosine of the outputs).
    pub min_fidelity: Option<f64>,
    pub batch: usize,
    /// Stop starting new candidates after this long (the best so far is kept).
    #[serde(skip)]
    pub time_limit: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    pub recipe: String,
    pub after: Option<Measure>,
    /// Median ms at the budget's batch: (original, candidate).
    pub latency_ms: Option<(f64, f64)>,
    pub seconds: f64,
    pub accepted: bool,
    /// Why it was rejected (or failed), or what it met.
    pub verdict: String,
}

pub struct Found {
    /// The best accepted candidate (see the module docs) and the recipe it ran, if any.
    pub best: Option<(Recipe, Outcome)>,
    pub candidates: Vec<Candidate>,
    /// The search stopped early on a stop request.
    pub interrupted: bool,
    /// The original model, measured once.
    pub before: Measure,
}

/// One way to compress the model: what the report calls it, and how to run it.
pub struct Trial<'a> {
    pub recipe: Recipe,
    #[allow(clippy::type_complexity)]
    pub run: Box<dyn FnOnce(&mut dyn FnMut(&str, usize, usize)) -> Result<Outcome> + 'a>,
    /// Tried next when this one misses only the accuracy budget (fine-tuning in the loop).
    pub recover: Option<Box<Trial<'a>>>,
}

impl<'a> Trial<'a> {
    /// A recipe run by the pipeline, with its recovery recipe behind it.
    fn recipe(
        model: &'a Model,
        recipe: Recipe,
        data: &'a Data,
        before: &'a Measure,
        seed: u64,
    ) -> Trial<'a> {
        let recover = recipe
            .recovered()
            .map(|r| Box::new(Trial::recipe(model, r, data, before, seed)));
        let r = recipe.clone();
        Trial {
            recipe,
            run: Box::new(move |p: &mut dyn FnMut(&str, usize, usize)| {
                pipeline::run(model.clone(), &r, data, before.clone(), seed, p)
            }),
            recover,
        }
    }
}

/// Runs the candidate recipes in order within the budget's time limit, then, with
/// `per_layer` and an accuracy budget, int4/int8 weights chosen per layer from measured
/// sensitivity. `after_each(found, new_best)` is called once each candidate is decided, so the
/// caller can keep the best model so far on disk.
#[allow(clippy::too_many_arguments)]
pub fn search(
    model: &Model,
    candidates: &[Recipe],
    per_layer: bool,
    data: &Data,
    budget: &Budget,
    seed: u64,
    progress: impl FnMut(&str, usize, usize),
    after_each: impl FnMut(&Found, bool) -> Result<()>,
) -> Result<Found> {
    if data.val.is_none() && budget.max_accuracy_drop.is_some() {
        bail!(
            Input,
            "an accuracy budget needs labelled validation data (--val)"
        );
    }
    let before = measure(model, data.val.as_ref())?;
    let mut trials: Vec<Trial> = candidates
        .iter()
        .map(|r| Trial::recipe(model, r.clone(), data, &before, seed))
        .collect();
    if let (true, Some(drop), Some(val)) = (per_layer, budget.max_accuracy_drop, &data.val) {
        // Tuned on training samples, judged on the validation data like every candidate.
        let n = data.train.y.len().min(2000);
        let x = smelt_train::rows(data.train.x, &(0..n).collect::<Vec<_>>())?;
        let y = data.train.y[..n].to_vec();
        let tune =
            move |m: &Model| crate::measure::accuracy(m, &smelt_train::Samples { x: &x, y: &y });
        // A tenth of the budget kept in reserve for the difference between the two sets.
        let floor = tune(model)? - 0.9 * drop / 100.0;
        trials.push(mixed_trial(
            model,
            format!(
                "int4 or int8 weights per layer, chosen from each layer's measured sensitivity \
                 to lose at most {drop} points"
            ),
            floor,
            tune,
            move |m| measure(m, Some(val)),
            before.clone(),
        ));
    }
    run_trials(model, trials, before.clone(), budget, progress, after_each)
}

/// Weight-only quantization of every layer at `bits`: int8 per output channel, int4 in blocks
/// of 128 along the reduction axis. The one description of the schemes the per-layer and
/// uniform trials use.
fn weight_only(bits: u32) -> Stage {
    Stage::Quantize {
        mode: "weight-only".into(),
        weight_type: Some(format!("int{bits}")),
        granularity: Some(if bits == 8 { "channel" } else { "block" }.into()),
        block_size: 128,
        observer: "minmax".into(),
        calib: 0,
    }
}

/// Mean cosine of `model`'s first output to the original's on `feeds`.
struct Fidelity<'a> {
    feeds: &'a [Feed],
    reference: Vec<smelt_tensor::Tensor>,
}

impl<'a> Fidelity<'a> {
    fn new(original: &Model, feeds: &'a [Feed]) -> Result<Fidelity<'a>> {
        let s = Session::new(original.clone())?;
        let reference = feeds
            .iter()
            .map(|f| first_output(&s, f))
            .collect::<Result<_>>()?;
        Ok(Fidelity { feeds, reference })
    }

    fn of(&self, model: &Model) -> Result<f64> {
        let s = Session::new(model.clone())?;
        let mut acc = smelt_data::FidelityAccumulator::new();
        for (f, r) in self.feeds.iter().zip(&self.reference) {
            smelt_tensor::interrupt::check()?;
            acc.add(r, &first_output(&s, f)?)?;
        }
        Ok(acc.finish()?.cosine)
    }
}

fn first_output(s: &Session, feed: &Feed) -> Result<smelt_tensor::Tensor> {
    Ok(s.run_feed(feed)?.remove(0).1)
}

/// A fidelity budget needs no labels: the candidates are weight-only int8 everywhere, int4
/// everywhere, and int4/int8 chosen per layer from measured sensitivity (smelt_quant::mixed),
/// each scored by its outputs' cosine to the original's on `val` (batches of feeds).
pub fn search_fidelity(
    model: &Model,
    val: &[Feed],
    budget: &Budget,
    progress: impl FnMut(&str, usize, usize),
    after_each: impl FnMut(&Found, bool) -> Result<()>,
) -> Result<Found> {
    let Some(floor) = budget.min_fidelity else {
        bail!(Input, "a fidelity search needs --min-fidelity");
    };
    if budget.max_accuracy_drop.is_some() {
        bail!(
            Input,
            "an accuracy budget needs labelled data; with unlabelled data give --min-fidelity"
        );
    }
    if val.is_empty() {
        bail!(Input, "no samples to measure fidelity on");
    }
    // Layers are chosen on the first half of the batches and every candidate is judged on
    // the second, so the budget is checked on data the choice never saw.
    let (tune, judge) = if val.len() >= 2 {
        val.split_at(val.len() / 2)
    } else {
        (val, val)
    };
    let fid = Fidelity::new(model, judge)?;
    let tune_fid = Fidelity::new(model, tune)?;
    let before = {
        let mut m = measure(model, None)?;
        m.fidelity = Some(1.0);
        m
    };
    let judge = std::rc::Rc::new(move |m: &Model| -> Result<Measure> {
        let mut after = measure(m, None)?;
        after.fidelity = Some(fid.of(m)?);
        Ok(after)
    });
    let uniform = |bits: u32| {
        let (judge, before) = (judge.clone(), before.clone());
        let name = format!("int{bits}");
        Trial {
            recipe: Recipe {
                name: format!("{name}-weight-only"),
                description: format!("every layer's weights {name}, compute in float"),
                stages: vec![weight_only(bits)],
                recovery: None,
            },
            run: Box::new(move |_: &mut dyn FnMut(&str, usize, usize)| {
                let t = Instant::now();
                let opts = pipeline::quantize_options(&weight_only(bits))?;
                let (m, man) = smelt_quant::quantize(model.clone(), &opts, &[], |_, _, _| {})?;
                let after = judge(&m)?;
                let summary = format!(
                    "weight-only {name}, {} nodes quantized",
                    man.nodes_quantized
                );
                Ok(one_stage(m, before, summary, t, after, vec![], man))
            })
                as Box<dyn FnOnce(&mut dyn FnMut(&str, usize, usize)) -> Result<Outcome>>,
            recover: None,
        }
    };
    let mut trials = vec![uniform(8), uniform(4)];
    trials.push(mixed_trial(
        model,
        format!(
            "int4 or int8 weights per layer, chosen from each layer's measured sensitivity to \
             keep the cosine to the original >= {floor}"
        ),
        // A tenth of the distance to 1 kept in reserve: the choice is tuned on other batches
        // than the ones it is judged on.
        floor + 0.1 * (1.0 - floor),
        move |m| tune_fid.of(m),
        move |m| judge(m),
        before.clone(),
    ));
    run_trials(model, trials, before, budget, progress, after_each)
}

/// The outcome of a one-stage quantization trial.
fn one_stage(
    m: Model,
    before: Measure,
    summary: String,
    started: Instant,
    after: Measure,
    precision: Vec<smelt_quant::mixed::LayerChoice>,
    manifest: smelt_quant::Manifest,
) -> Outcome {
    Outcome {
        model: m,
        before,
        stages: vec![StageRecord {
            kind: "quantize",
            summary,
            seconds: started.elapsed().as_secs_f64(),
            after,
        }],
        masks: None,
        precision,
        manifest: Some(manifest),
    }
}

/// Weight-only int4 or int8 per layer (smelt_quant::mixed): chosen so that `tune` stays at
/// or above `floor`, then measured by `judge`.
fn mixed_trial<'a>(
    model: &'a Model,
    description: String,
    floor: f64,
    tune: impl Fn(&Model) -> Result<f64> + 'a,
    judge: impl Fn(&Model) -> Result<Measure> + 'a,
    before: Measure,
) -> Trial<'a> {
    Trial {
        recipe: Recipe {
            name: "int4-int8-per-layer".into(),
            description,
            stages: vec![],
            recovery: None,
        },
        run: Box::new(move |p: &mut dyn FnMut(&str, usize, usize)| {
            let t = Instant::now();
            let base = pipeline::quantize_options(&weight_only(8))?;
            let int4 = pipeline::quantize_options(&weight_only(4))?.weights;
            let plan = smelt_quant::mixed::choose(model, &base, int4, &[], floor, tune, |d, n| {
                p("per-layer sensitivity", d, n)
            })?;
            let (m, man) = smelt_quant::quantize(model.clone(), &plan.options, &[], |_, _, _| {})?;
            let at = |b: u32| plan.layers.iter().filter(|l| l.bits == b).count();
            let summary = format!(
                "{} of {} layers at int4, {} float, the rest int8 ({} evaluations; {:.5} with \
                 the int8 layers, floor {:.5})",
                at(4),
                plan.layers.len(),
                at(32),
                plan.evaluations,
                plan.high_metric,
                floor
            );
            let after = judge(&m)?;
            Ok(one_stage(m, before, summary, t, after, plan.layers, man))
        }),
        recover: None,
    }
}

/// Runs the trials in order, judges each against the budget, keeps the best.
fn run_trials(
    model: &Model,
    trials: Vec<Trial>,
    before: Measure,
    budget: &Budget,
    mut progress: impl FnMut(&str, usize, usize),
    mut after_each: impl FnMut(&Found, bool) -> Result<()>,
) -> Result<Found> {
    let started = Instant::now();
    let mut out = Found {
        best: None,
        candidates: vec![],
        interrupted: false,
        before,
    };
    // Lower is better: (not both smaller and faster, bytes, latency).
    let mut best_key: Option<(bool, u64, f64)> = None;
    let mut queue: std::collections::VecDeque<Trial> = trials.into();
    let mut i = 0;
    while let Some(trial) = queue.pop_front() {
        i += 1;
        let n = i + queue.len();
        let name = trial.recipe.name.clone();
        let skip = if out.interrupted {
            Some("not tried: the search was interrupted")
        } else if started.elapsed() > budget.time_limit {
            Some("not tried: the time limit was reached")
        } else {
            None
        };
        if let Some(why) = skip {
            out.candidates.push(Candidate {
                recipe: name,
                after: None,
                latency_ms: None,
                seconds: 0.0,
                accepted: false,
                verdict: why.into(),
            });
            continue;
        }
        let t = Instant::now();
        let label = format!("candidate {i}/{n} {name}");
        let outcome = match (trial.run)(&mut |s, d, k| progress(&format!("{label}: {s}"), d, k)) {
            Ok(o) => o,
            Err(e) => {
                out.interrupted = matches!(e, smelt_tensor::Error::Interrupted);
                out.candidates.push(Candidate {
                    recipe: name,
                    after: None,
                    latency_ms: None,
                    seconds: t.elapsed().as_secs_f64(),
                    accepted: false,
                    verdict: if out.interrupted {
                        "interrupted while running".into()
                    } else {
                        format!("failed: {e}")
                    },
                });
                after_each(&out, false)?;
                continue;
            }
        };
        let before = out.before.clone();
        let after = outcome
            .stages
            .last()
            .map_or(before.clone(), |s| s.after.clone());
        let (lb, la) = latency_pair(model, &outcome.model, budget.batch.max(1), 10)?;
        let mut reasons = Vec::new();
        if let (Some(max), Some(b), Some(a)) =
            (budget.max_accuracy_drop, before.accuracy, after.accuracy)
        {
            let drop = 100.0 * (b - a);
            // Measured accuracies are multiples of 1/samples: compare with rounding slack.
            if drop > max + 1e-9 {
                reasons.push(format!("loses {drop:.2} points (budget {max})"));
            }
        }
        if let (Some(min), Some(f)) = (budget.min_fidelity, after.fidelity) {
            if f < min {
                reasons.push(format!("cosine {f:.5} (floor {min})"));
            }
        }
        if let Some(tb) = budget.target_bytes {
            if after.bytes > tb {
                reasons.push(format!("{} bytes (target {tb})", after.bytes));
            }
        }
        if let Some(tl) = budget.target_latency_ms {
            if la > tl {
                reasons.push(format!("{la:.3} ms (target {tl})"));
            }
        }
        let smaller = after.bytes < before.bytes;
        let faster = la < lb / 1.05;
        if !smaller && !faster {
            reasons.push("neither smaller nor faster than the original".into());
        }
        let accepted = reasons.is_empty();
        let only_accuracy = reasons.len() == 1 && reasons[0].starts_with("loses");
        let verdict = if accepted {
            format!(
                "meets the budget: x{:.2} size, {:.2}x speed",
                after.bytes as f64 / before.bytes.max(1) as f64,
                lb / la.max(1e-12)
            )
        } else {
            format!("rejected: {}", reasons.join("; "))
        };
        out.candidates.push(Candidate {
            recipe: name,
            after: Some(after.clone()),
            latency_ms: Some((lb, la)),
            seconds: t.elapsed().as_secs_f64(),
            accepted,
            verdict,
        });
        // Preferring "smaller and faster" needs a speed-up beyond timing noise (10 alternated
        // runs on a busy machine vary by ~10%): a weight-only model that runs at float speed
        // must not win on a lucky measurement.
        let clearly_faster = la < lb / 1.15;
        let key = (!(smaller && clearly_faster), after.bytes, la);
        let better = best_key.is_none_or(|b| {
            (key.0, key.1) < (b.0, b.1) || ((key.0, key.1) == (b.0, b.1) && key.2 < b.2)
        });
        let new_best = accepted && better;
        if new_best {
            best_key = Some(key);
            out.best = Some((trial.recipe, outcome));
        } else if let (true, Some(r)) = (only_accuracy, trial.recover) {
            queue.push_front(*r);
        }
        // A stop asked for while a trial finished anyway still ends the search.
        out.interrupted = smelt_tensor::interrupt::requested();
        after_each(&out, new_best)?;
    }
    Ok(out)
}
