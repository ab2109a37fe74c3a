use crate::args::{load_model, print_json, refuse_overwrite, DataArgs};
use smelt_compress::ablation::Ranking;
use smelt_compress::pipeline::{self, Data};
use smelt_compress::report::{Latency, Report};
use smelt_compress::search::{Budget, Found};
use smelt_compress::Recipe;
use smelt_ir::Model;
use smelt_prune::Criterion;
use smelt_tensor::{bail, Result};
use smelt_train::Samples;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// The float ONNX model to compress.
    model: PathBuf,
    /// Where to write the compressed model.
    #[arg(short, long)]
    output: PathBuf,
    /// The stages to apply (TOML; see recipes/ for ready ones). Without it, a budget
    /// (--max-accuracy-drop, --target-size, --target-latency) chooses among candidates.
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// Budget: accuracy the result may lose, in points (0.5 = half a percentage point).
    #[arg(long)]
    max_accuracy_drop: Option<f64>,
    /// Budget: the largest acceptable file, in bytes, or as a fraction of the original ("0.3x").
    #[arg(long)]
    target_size: Option<String>,
    /// Budget: the slowest acceptable latency in ms at --latency-batch, in smelt's engine.
    #[arg(long)]
    target_latency: Option<f64>,
    /// Budget: the lowest acceptable mean cosine of the outputs to the original's, on --data
    /// (no labels needed: text works too). Chooses int8 / int4 weights per layer.
    #[arg(long)]
    min_fidelity: Option<f64>,
    #[arg(long, default_value_t = 1)]
    latency_batch: usize,
    /// Candidate recipes for the budget search (default: the ready ones, gentlest first).
    #[arg(long, value_delimiter = ',')]
    candidates: Vec<PathBuf>,
    /// Start no new candidate after this many seconds (the best so far is kept).
    #[arg(long, default_value_t = 600.0)]
    time_limit: f64,
    /// Labelled training data: calibration and fine-tuning (same forms as `eval --data`).
    #[command(flatten)]
    data: DataArgs,
    /// Labelled validation data, for the accuracy before, after each stage and after.
    #[arg(long)]
    val: Option<PathBuf>,
    #[arg(long, default_value_t = 2000)]
    val_limit: usize,
    /// Write the report (report.html with charts, report.json, summary.md) into this folder.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Seed of shuffles and random choices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Timed runs of each model, side by side, at batch 1 and 32 (0 skips the latency).
    #[arg(long, default_value_t = 20)]
    bench_runs: usize,
    /// Also rank each layer's channels by importance and check the ranking by ablation
    /// (removing the most / random / least important channels), in the report.
    #[arg(long)]
    ablation: bool,
    /// Importance for --ablation: magnitude, l2, taylor (uses the training data), greedy
    /// (elimination on up to 2,000 training samples; sees redundant channels) or random.
    #[arg(long, default_value = "magnitude")]
    ablation_criterion: String,
    /// Also time the original and the result in onnxruntime, side by side, with this Python
    /// (it must import onnxruntime and numpy; `scripts/setup-python.sh` makes one).
    #[arg(long, value_name = "PYTHON")]
    ort_python: Option<PathBuf>,
    /// Allow writing over the input file.
    #[arg(long)]
    force: bool,
}

/// What to apply: one recipe, or the best of several candidates within a budget.
pub enum How {
    Recipe(Recipe),
    /// Candidate recipes; with `true`, also per-layer int4/int8 from measured sensitivity.
    Search(Budget, Vec<Recipe>, bool),
    /// Per-layer precision within a fidelity budget, measured on these feeds.
    Fidelity(Budget, Vec<smelt_engine::Feed>),
}

/// Bytes, or a fraction of `original` written "0.3x".
fn parse_size(s: &str, original: u64) -> Result<u64> {
    let bad = || {
        smelt_tensor::Error::Input(format!(
            "--target-size '{s}': give bytes or a fraction like 0.3x"
        ))
    };
    match s.strip_suffix('x') {
        Some(f) => {
            let f: f64 = f.parse().map_err(|_| bad())?;
            if f.is_nan() || f <= 0.0 {
                return Err(bad());
            }
            Ok((f * original as f64) as u64)
        }
        None => s.parse().map_err(|_| bad()),
    }
}

/// Where and how [`compress`] runs.
pub struct Run<'a> {
    pub name: &'a str,
    pub output: &'a Path,
    pub report_dir: Option<&'a Path>,
    pub seed: u64,
    pub bench_runs: usize,
    /// Python with onnxruntime, to time both models there too.
    pub ort_python: Option<&'a Path>,
    /// Check channel importance by ablation, ranked this way.
    pub ablation: Option<Ablation>,
}

/// How `--ablation` ranks channels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ablation {
    Criterion(Criterion),
    /// Greedy elimination on training data (`smelt_compress::ablation::Ranking::Greedy`).
    Greedy,
}

impl Ablation {
    pub fn parse(s: &str, seed: u64) -> Result<Ablation> {
        match s {
            "greedy" => Ok(Ablation::Greedy),
            "wanda" => bail!(
                Input,
                "--ablation-criterion wanda is not available (its channel scores need activation \
                 norms): use magnitude, l2, taylor, greedy or random"
            ),
            _ => Criterion::parse(s, seed).map(Ablation::Criterion).map_err(|_| {
                smelt_tensor::Error::Input(format!(
                    "unknown --ablation-criterion '{s}' (expected magnitude, l2, taylor, greedy or random)"
                ))
            }),
        }
    }

    /// Whether the ranking is fitted to the training data (so must not see the validation set).
    fn learns(self) -> bool {
        matches!(
            self,
            Ablation::Greedy | Ablation::Criterion(Criterion::Taylor)
        )
    }
}

/// Samples greedy elimination evaluates on: each of its O(channels^2) trials runs them all.
const GREEDY_SAMPLES: usize = 2000;

pub fn run(a: Args, json: bool) -> Result<()> {
    refuse_overwrite(&a.model, &a.output, a.force)?;
    if let Some(py) = &a.ort_python {
        crate::ort::check(py)?;
    }
    let model = load_model(&a.model)?;
    let budget = Budget {
        max_accuracy_drop: a.max_accuracy_drop,
        target_bytes: match a.target_size.as_deref() {
            None => None,
            Some(t) => Some(parse_size(
                t,
                std::fs::metadata(&a.model).map(|m| m.len()).unwrap_or(0),
            )?),
        },
        target_latency_ms: a.target_latency,
        min_fidelity: a.min_fidelity,
        batch: a.latency_batch,
        time_limit: std::time::Duration::from_secs_f64(a.time_limit.max(0.0)),
    };
    let name = a.model.display().to_string();
    let run = Run {
        name: &name,
        output: &a.output,
        report_dir: a.report.as_deref(),
        seed: a.seed,
        bench_runs: a.bench_runs,
        ort_python: a.ort_python.as_deref(),
        ablation: None,
    };
    if let Some(f) = a.min_fidelity {
        if !(0.0..=1.0).contains(&f) {
            bail!(Input, "--min-fidelity must be in [0, 1], got {f}");
        }
        if a.recipe.is_some() || a.ablation || a.max_accuracy_drop.is_some() {
            bail!(
                Input,
                "--min-fidelity runs its own search: it does not combine with --recipe, \
                 --ablation or --max-accuracy-drop"
            );
        }
        let feeds = a.data.load(&model, 16)?.feeds;
        return compress(model, How::Fidelity(budget, feeds), None, &run, json);
    }
    let train = a.data.dataset(&model)?;
    let Some(train_y) = train.y.clone() else {
        bail!(Input, "the training data has no labels");
    };
    let val = match &a.val {
        Some(p) => Some(a.data.labelled_val(&model, p, Some(a.val_limit))?),
        None => None,
    };
    let val_y = val.as_ref().and_then(|v| v.y.clone());
    let data = Data {
        train: Samples {
            x: &train.x,
            y: &train_y,
        },
        val: val
            .as_ref()
            .zip(val_y.as_deref())
            .map(|(v, y)| Samples { x: &v.x, y }),
    };
    let ablation = if a.ablation {
        Some(Ablation::parse(&a.ablation_criterion, a.seed)?)
    } else {
        None
    };
    // The validation images are the test split; a ranking fitted on them would be checked on
    // the data it was fitted to.
    if ablation.is_some_and(Ablation::learns)
        && a.val.as_ref() == a.data.data.as_ref()
        && a.data.split != "train"
    {
        bail!(
            Input,
            "--ablation-criterion {} ranks on --data, which here is the same test split as \
             --val: pass --split train (or other training data)",
            a.ablation_criterion
        );
    }
    let how = match &a.recipe {
        Some(r) => How::Recipe(Recipe::load(r)?),
        None => {
            if budget.max_accuracy_drop.is_none()
                && budget.target_bytes.is_none()
                && budget.target_latency_ms.is_none()
            {
                bail!(
                    Input,
                    "give --recipe, or a budget (--max-accuracy-drop, --target-size, --target-latency)"
                );
            }
            let candidates = if a.candidates.is_empty() {
                smelt_compress::search::builtin()?
            } else {
                a.candidates
                    .iter()
                    .map(|p| Recipe::load(p))
                    .collect::<Result<_>>()?
            };
            How::Search(budget, candidates, a.candidates.is_empty())
        }
    };
    compress(model, how, Some(&data), &Run { ablation, ..run }, json)
}

/// The model, and its masks beside it when pruning left some.
fn save_result(out: &pipeline::Outcome, output: &Path) -> Result<()> {
    smelt_onnx::save(&out.model, output)?;
    let masks = crate::args::masks_beside(output);
    match &out.masks {
        Some(m) => smelt_onnx::write_atomic(&masks, &m.to_safetensors()?)?,
        // A mask file left by an earlier best would not belong to this model.
        None if masks.exists() => std::fs::remove_file(&masks).map_err(|e| {
            smelt_tensor::Error::io(format!("cannot remove {}", masks.display()), e)
        })?,
        None => {}
    }
    Ok(())
}

/// Candidates that ran (not those skipped after a stop or the time limit).
fn tried(found: &Found) -> usize {
    found
        .candidates
        .iter()
        .filter(|c| !c.verdict.starts_with("not tried"))
        .count()
}

/// The report of a search that has not finished, saying `why`: the best candidate so far, if
/// any, and every verdict reached.
fn partial_report(name: &str, found: &Found, budget: &Budget, why: String) -> Report {
    let (recipe, stages, precision) = match &found.best {
        Some((r, o)) => (r.clone(), o.stages.clone(), o.precision.clone()),
        None => (
            Recipe {
                name: "(none accepted)".into(),
                description: String::new(),
                stages: vec![],
                recovery: None,
            },
            vec![],
            vec![],
        ),
    };
    Report::new(
        name.to_string(),
        recipe,
        found.before.clone(),
        stages,
        vec![],
    )
    .with_search(budget.clone(), found.candidates.clone())
    .with_precision(precision)
    .partial(why)
}

/// Runs the recipe, writes the model (and masks, report), prints the before/after table.
/// A search keeps its best model so far in `output` and a partial report in the report folder
/// while it runs, so Ctrl-C leaves both.
pub fn compress(model: Model, how: How, data: Option<&Data>, r: &Run, json: bool) -> Result<()> {
    let (name, output, report_dir) = (r.name, r.output, r.report_dir);
    let (seed, bench_runs) = (r.seed, r.bench_runs);
    let mut bar = crate::progress::Progress::new(json);
    let need_data = || data.ok_or_else(|| smelt_tensor::Error::Input("no training data".into()));
    let (recipe, out, search) = match how {
        How::Recipe(recipe) => {
            let data = need_data()?;
            let before = smelt_compress::measure::measure(&model, data.val.as_ref())?;
            let out = pipeline::run(
                model.clone(),
                &recipe,
                data,
                before,
                seed,
                &mut |stage, d, n| bar.update(stage, d, n, String::new()),
            )?;
            save_result(&out, output)?;
            (recipe, out, None)
        }
        How::Search(..) | How::Fidelity(..) => {
            let (budget, total) = match &how {
                How::Search(b, c, per_layer) => (
                    b.clone(),
                    c.len() + (*per_layer && b.max_accuracy_drop.is_some()) as usize,
                ),
                How::Fidelity(b, _) => (b.clone(), 3),
                How::Recipe(_) => unreachable!(),
            };
            // Keep the best model so far on disk, and a report of what is decided.
            let after_each = |found: &Found, new_best: bool| {
                if let (true, Some((_, o))) = (new_best, &found.best) {
                    save_result(o, output)?;
                }
                let Some(dir) = report_dir else {
                    return Ok(());
                };
                let done = tried(found);
                let why = if found.interrupted {
                    format!("the search was interrupted after {done} of {total} candidates")
                } else {
                    format!("the search is running ({done} of {total} candidates decided)")
                };
                partial_report(name, found, &budget, why).write(dir)
            };
            let progress = |stage: &str, d, n| bar.update(stage, d, n, String::new());
            let found = match &how {
                How::Search(b, candidates, per_layer) => smelt_compress::search::search(
                    &model,
                    candidates,
                    *per_layer,
                    need_data()?,
                    b,
                    seed,
                    progress,
                    after_each,
                )?,
                How::Fidelity(b, feeds) => {
                    smelt_compress::search::search_fidelity(&model, feeds, b, progress, after_each)?
                }
                How::Recipe(_) => unreachable!(),
            };
            let done = tried(&found);
            let Some((best_recipe, out)) = found.best else {
                if let Some(dir) = report_dir {
                    let verdict = if found.interrupted {
                        "the search was interrupted before any candidate met the budget"
                    } else {
                        "no candidate met the budget: no model was written"
                    };
                    partial_report(name, &found, &budget, verdict.into()).write(dir)?;
                }
                if found.interrupted {
                    bar.finish();
                    eprintln!("interrupted: no candidate had met the budget; nothing written");
                    return Err(smelt_tensor::Error::Interrupted);
                }
                let lines: Vec<String> = found
                    .candidates
                    .iter()
                    .map(|c| format!("  {}: {}", c.recipe, c.verdict))
                    .collect();
                bail!(
                    Input,
                    "no candidate met the budget; no model written:\n{}",
                    lines.join("\n")
                );
            };
            let interrupted = found.interrupted.then_some(done);
            (
                best_recipe,
                out,
                Some((budget, found.candidates, interrupted)),
            )
        }
    };
    bar.finish();
    let interrupted = search.as_ref().is_some_and(|s| s.2.is_some());
    // After Ctrl-C the user wants out: the timing and ablation are skipped.
    let bench_runs = if interrupted { 0 } else { bench_runs };
    let mut latency = Vec::new();
    let mut ort_failures = Vec::new();
    if bench_runs > 0 {
        const BATCHES: [usize; 2] = [1, 32];
        // onnxruntime failing to time a model is a finding for the report, not a reason to
        // lose the run's results.
        let ort_ms = match r
            .ort_python
            .map(|py| crate::ort::latency_pairs(py, &model, &out.model, &BATCHES, bench_runs))
        {
            Some(Ok(ms)) => ms.into_iter().map(Some).collect(),
            Some(Err(e)) => {
                ort_failures.push(format!("onnxruntime timing failed: {e}"));
                vec![None; BATCHES.len()]
            }
            None => vec![None; BATCHES.len()],
        };
        for (batch, ort_ms) in BATCHES.into_iter().zip(ort_ms) {
            let (b, a) =
                smelt_compress::measure::latency_pair(&model, &out.model, batch, bench_runs)?;
            latency.push(Latency {
                batch,
                before_ms: b,
                after_ms: a,
                speedup: b / a.max(1e-12),
                ort_ms,
            });
        }
    }
    let ablation = match r.ablation.filter(|_| !interrupted) {
        Some(c) => {
            let Some(val) = data.and_then(|d| d.val.as_ref()) else {
                bail!(Input, "--ablation needs labelled validation data (--val)");
            };
            let taylor = if c == Ablation::Criterion(Criterion::Taylor) {
                Some(pipeline::taylor(&model, &need_data()?.train)?)
            } else {
                None
            };
            let subset;
            let ranking = match c {
                Ablation::Criterion(c) => Ranking::Scores(c, taylor.as_ref()),
                Ablation::Greedy => {
                    let train = &need_data()?.train;
                    let n = train.y.len().min(GREEDY_SAMPLES);
                    let idx: Vec<usize> = (0..n).collect();
                    subset = smelt_train::rows(train.x, &idx)?;
                    Ranking::Greedy(Samples {
                        x: &subset,
                        y: &train.y[..n],
                    })
                }
            };
            smelt_compress::ablation::ablate(&model, &ranking, val, &[0.125, 0.25, 0.5], 4, seed)?
        }
        None => vec![],
    };
    let report = Report::new(
        name.to_string(),
        recipe.clone(),
        out.before,
        out.stages,
        latency,
    )
    .with_warnings(ort_failures)
    .with_ablation(ablation)
    .with_precision(out.precision)
    .with_layers(&out.model, out.manifest.as_ref())?;
    let report = match search {
        Some((b, c, None)) => report.with_search(b, c),
        Some((b, c, Some(done))) => report.with_search(b, c).partial(format!(
            "the search was interrupted after {done} candidates; the best so far was written"
        )),
        None => report,
    };
    if let Some(dir) = report_dir {
        report.write(dir)?;
    }
    if json {
        let mut v = serde_json::to_value(&report)
            .map_err(|e| smelt_tensor::Error::Invalid(format!("report: {e}")))?;
        v["output"] = output.display().to_string().into();
        v["report_dir"] = report_dir.map(|d| d.display().to_string()).into();
        print_json(&v);
        return if interrupted {
            Err(smelt_tensor::Error::Interrupted)
        } else {
            Ok(())
        };
    }
    for c in &report.candidates {
        println!("candidate  {:<18} {}", c.recipe, c.verdict);
    }
    println!(
        "compressed {name} -> {} (recipe {})",
        output.display(),
        recipe.name
    );
    for (i, st) in report.stages.iter().enumerate() {
        println!(
            "  {}. {:<9} {:>6.1} s  {}",
            i + 1,
            st.kind,
            st.seconds,
            st.summary
        );
    }
    println!();
    let rows = report.table();
    let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(6).max(6);
    println!(
        "{:<w0$}  {:>14}  {:>14}  {:>14}",
        "", "before", "after", "change"
    );
    for r in &rows {
        println!("{:<w0$}  {:>14}  {:>14}  {:>14}", r[0], r[1], r[2], r[3]);
    }
    for w in &report.warnings {
        println!("warning: {w}");
    }
    if let Some(dir) = report_dir {
        println!("report     {}", dir.join("report.html").display());
    }
    if interrupted {
        return Err(smelt_tensor::Error::Interrupted);
    }
    Ok(())
}
