use crate::args::{load_model, print_json, refuse_overwrite, DataArgs};
use smelt_compress::pipeline::{self, Data};
use smelt_compress::report::{Latency, Report};
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
    /// The stages to apply (TOML; see recipes/ for ready ones).
    #[arg(long)]
    recipe: PathBuf,
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
    /// Importance for --ablation: magnitude, l2, taylor (uses the training data) or random.
    #[arg(long, default_value = "magnitude")]
    ablation_criterion: String,
    /// Allow writing over the input file.
    #[arg(long)]
    force: bool,
}

/// Where and how [`compress`] runs.
pub struct Run<'a> {
    pub name: &'a str,
    pub output: &'a Path,
    pub report_dir: Option<&'a Path>,
    pub seed: u64,
    pub bench_runs: usize,
    /// Check channel importance by ablation with this criterion.
    pub ablation: Option<Criterion>,
}

pub fn run(a: Args, json: bool) -> Result<()> {
    refuse_overwrite(&a.model, &a.output, a.force)?;
    let recipe = Recipe::load(&a.recipe)?;
    let model = load_model(&a.model)?;
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
    let name = a.model.display().to_string();
    let ablation = if a.ablation {
        Some(Criterion::parse(&a.ablation_criterion, a.seed)?)
    } else {
        None
    };
    compress(
        model,
        &recipe,
        &data,
        &Run {
            name: &name,
            output: &a.output,
            report_dir: a.report.as_deref(),
            seed: a.seed,
            bench_runs: a.bench_runs,
            ablation,
        },
        json,
    )
}

/// Runs the recipe, writes the model (and masks, report), prints the before/after table.
pub fn compress(model: Model, recipe: &Recipe, data: &Data, r: &Run, json: bool) -> Result<()> {
    let (name, output, report_dir) = (r.name, r.output, r.report_dir);
    let (seed, bench_runs) = (r.seed, r.bench_runs);
    let mut bar = crate::progress::Progress::new(json);
    let out = pipeline::run(model.clone(), recipe, data, seed, |stage, d, n| {
        bar.update(stage, d, n, String::new())
    })?;
    bar.finish();
    smelt_onnx::save(&out.model, output)?;
    if let Some(m) = &out.masks {
        smelt_onnx::write_atomic(&crate::args::masks_beside(output), &m.to_safetensors()?)?;
    }
    let mut latency = Vec::new();
    if bench_runs > 0 {
        for batch in [1, 32] {
            let (b, a) =
                smelt_compress::measure::latency_pair(&model, &out.model, batch, bench_runs)?;
            latency.push(Latency {
                batch,
                before_ms: b,
                after_ms: a,
                speedup: b / a.max(1e-12),
            });
        }
    }
    let ablation = match r.ablation {
        Some(c) => {
            let Some(val) = &data.val else {
                bail!(Input, "--ablation needs labelled validation data (--val)");
            };
            let scores = if c == Criterion::Taylor {
                Some(pipeline::taylor(&model, &data.train)?)
            } else {
                None
            };
            smelt_compress::ablation::ablate(
                &model,
                c,
                scores.as_ref(),
                val,
                &[0.125, 0.25, 0.5],
                4,
                seed,
            )?
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
    .with_ablation(ablation);
    if let Some(dir) = report_dir {
        report.write(dir)?;
    }
    if json {
        let mut v = serde_json::to_value(&report)
            .map_err(|e| smelt_tensor::Error::Invalid(format!("report: {e}")))?;
        v["output"] = output.display().to_string().into();
        v["report_dir"] = report_dir.map(|d| d.display().to_string()).into();
        print_json(&v);
        return Ok(());
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
    Ok(())
}
