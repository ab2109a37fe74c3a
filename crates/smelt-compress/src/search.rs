//! Budget-driven search: try candidate recipes from the gentlest to the most aggressive, measure
//! each on this machine, and keep the smallest one that meets the budget. A candidate that is
//! neither smaller nor faster than the original is rejected, however accurate: a compression
//! that gains nothing is not a result. Among accepted candidates, one that is both smaller and
//! faster beats one that is only smaller; then the smallest file wins, then the fastest.
//!
//! A stop request ([`smelt_tensor::interrupt`]) ends the search at once: the candidate running
//! is abandoned and the best one so far is kept.

use crate::measure::{latency_pair, Measure};
use crate::pipeline::{self, Data};
use crate::recipe::Recipe;
use serde::Serialize;
use smelt_ir::Model;
use smelt_tensor::{bail, Result};
use std::time::{Duration, Instant};

/// The ready recipes of `recipes/`, gentlest first: the default candidates.
pub const BUILTIN: [(&str, &str); 5] = [
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
    /// The best accepted candidate (see the module docs), if any.
    pub best: Option<(usize, pipeline::Outcome)>,
    pub candidates: Vec<Candidate>,
    /// The search stopped early on a stop request.
    pub interrupted: bool,
    /// The original model as measured by the first candidate that ran.
    pub before: Option<Measure>,
}

/// Runs the candidates in order within the budget's time limit. `after_each(found, new_best)`
/// is called once each candidate is decided, so the caller can keep the best model so far on
/// disk.
pub fn search(
    model: &Model,
    candidates: &[Recipe],
    data: &Data,
    budget: &Budget,
    seed: u64,
    mut progress: impl FnMut(&str, usize, usize),
    mut after_each: impl FnMut(&Found, bool) -> Result<()>,
) -> Result<Found> {
    if data.val.is_none() && budget.max_accuracy_drop.is_some() {
        bail!(
            Input,
            "an accuracy budget needs labelled validation data (--val)"
        );
    }
    let started = Instant::now();
    let mut out = Found {
        best: None,
        candidates: vec![],
        interrupted: false,
        before: None,
    };
    // Lower is better: (not both smaller and faster, bytes, latency).
    let mut best_key: Option<(bool, u64, f64)> = None;
    for (i, recipe) in candidates.iter().enumerate() {
        let skip = if out.interrupted {
            Some("not tried: the search was interrupted")
        } else if started.elapsed() > budget.time_limit {
            Some("not tried: the time limit was reached")
        } else {
            None
        };
        if let Some(why) = skip {
            out.candidates.push(Candidate {
                recipe: recipe.name.clone(),
                after: None,
                latency_ms: None,
                seconds: 0.0,
                accepted: false,
                verdict: why.into(),
            });
            continue;
        }
        let t = Instant::now();
        let label = format!("candidate {}/{} {}", i + 1, candidates.len(), recipe.name);
        let run = pipeline::run(model.clone(), recipe, data, seed, |s, d, n| {
            progress(&format!("{label}: {s}"), d, n)
        });
        let outcome = match run {
            Ok(o) => o,
            Err(e) => {
                out.interrupted = matches!(e, smelt_tensor::Error::Interrupted);
                out.candidates.push(Candidate {
                    recipe: recipe.name.clone(),
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
        let before = out
            .before
            .get_or_insert_with(|| outcome.before.clone())
            .clone();
        let before = &before;
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
            if drop > max {
                reasons.push(format!("loses {drop:.2} points (budget {max})"));
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
            recipe: recipe.name.clone(),
            after: Some(after.clone()),
            latency_ms: Some((lb, la)),
            seconds: t.elapsed().as_secs_f64(),
            accepted,
            verdict,
        });
        let key = (!(smaller && faster), after.bytes, la);
        let better = best_key.is_none_or(|b| {
            (key.0, key.1) < (b.0, b.1) || ((key.0, key.1) == (b.0, b.1) && key.2 < b.2)
        });
        let new_best = accepted && better;
        if new_best {
            best_key = Some(key);
            out.best = Some((i, outcome));
        }
        after_each(&out, new_best)?;
    }
    Ok(out)
}
