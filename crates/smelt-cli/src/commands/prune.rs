use crate::args::{load_model, print_json, refuse_overwrite, DataArgs};
use serde_json::json;
use smelt_compress::measure::{latency_pair, Measure};
use smelt_ir::Model;
use smelt_prune::{Criterion, Method, Options};
use smelt_tensor::{bail, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The float ONNX model to prune.
    model: PathBuf,
    /// Where to write the pruned model.
    #[arg(short, long)]
    output: PathBuf,
    /// What to remove: `unstructured` (single weights), `N:M` such as 2:4 (N kept in every M
    /// along the input axis), or `channels` (whole channels, neurons and attention heads; the
    /// graph shrinks).
    #[arg(long, default_value = "unstructured")]
    pattern: String,
    /// Fraction of weights (unstructured) or of channels (channels) to remove.
    #[arg(long, default_value_t = 0.5)]
    sparsity: f64,
    /// Unstructured ranking: per layer, or over all layers at once.
    #[arg(long, default_value = "layer", value_parser = ["layer", "global"])]
    scope: String,
    /// Importance: magnitude (= l1), l2, wanda (|w| x input norm, needs --calib), random, or
    /// taylor (|w x dL/dw| of the cross-entropy, needs labelled --calib data).
    #[arg(long, default_value = "magnitude")]
    criterion: String,
    /// Seed for --criterion random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Per-layer fraction, `PATTERN=FRACTION` (node name, op type, weight name or glob; the
    /// first match wins; repeatable).
    #[arg(long = "layer")]
    layers: Vec<String>,
    /// Op types whose weights (or output channels) are pruned.
    #[arg(long, value_delimiter = ',', default_value = "Conv,Gemm,MatMul")]
    ops: Vec<String>,
    /// Leave dense: a node name, an op type or a name pattern (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    /// Attention heads to remove from every attention layer (with --pattern channels; other
    /// groups follow --sparsity).
    #[arg(long)]
    heads: Option<usize>,
    /// Remove a residual block, named by its Add or any node in it (repeatable). With
    /// `--pattern none`, only blocks are removed.
    #[arg(long)]
    remove_block: Vec<String>,
    /// Where to write the masks (safetensors, 1 = kept); default: next to the output.
    #[arg(long)]
    masks: Option<PathBuf>,
    /// Calibration data for --criterion wanda (same forms as `eval --data`).
    #[command(flatten)]
    data: DataArgs,
    /// Samples per calibration run.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Batch size of the before/after latency measurement.
    #[arg(long, default_value_t = 1)]
    bench_batch: usize,
    /// Timed runs of each model in the latency measurement (0 skips it).
    #[arg(long, default_value_t = 20)]
    bench_runs: usize,
    /// Also time both models in onnxruntime, side by side, with this Python (it must import
    /// onnxruntime and numpy; `scripts/setup-python.sh` makes one).
    #[arg(long, value_name = "PYTHON")]
    ort_python: Option<PathBuf>,
    /// Write the report (JSON) here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Allow writing over the input file.
    #[arg(long)]
    force: bool,
}

fn options(a: &Args) -> Result<Options> {
    let method = Method::parse(&a.pattern, &a.scope)?;
    let mut overrides = Vec::new();
    for l in &a.layers {
        let Some((p, f)) = l.rsplit_once('=') else {
            bail!(Input, "--layer '{l}': expected PATTERN=FRACTION");
        };
        let f: f64 = f.parse().map_err(|_| {
            smelt_tensor::Error::Input(format!("--layer '{l}': '{f}' is not a number"))
        })?;
        overrides.push((p.to_string(), f));
    }
    Ok(Options {
        method,
        criterion: Criterion::parse(&a.criterion, a.seed)?,
        sparsity: a.sparsity,
        overrides,
        ops: a.ops.clone(),
        exclude: a.exclude.clone(),
        remove_blocks: a.remove_block.clone(),
        heads: a.heads,
        gradient_scores: None,
    })
}

/// The model measured, with the size of its file as written.
fn measure(model: &Model, path: &Path) -> Result<Measure> {
    let mut m = smelt_compress::measure::measure(model, None)?;
    m.bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(m.bytes);
    Ok(m)
}

pub fn run(a: Args, json: bool) -> Result<()> {
    refuse_overwrite(&a.model, &a.output, a.force)?;
    if let Some(py) = &a.ort_python {
        crate::ort::check(py)?;
    }
    let started = Instant::now();
    let mut opts = options(&a)?;
    let model = load_model(&a.model)?;
    if opts.criterion == Criterion::Taylor {
        if a.data.data.is_none() {
            bail!(
                Input,
                "--criterion taylor needs labelled calibration data: pass --calib DATA"
            );
        }
        let mut d = a.data.clone();
        d.limit = d.limit.or(Some(1024));
        let ds = d.dataset(&model)?;
        let Some(y) = &ds.y else {
            bail!(
                Input,
                "--criterion taylor needs labels in the calibration data"
            );
        };
        let samples = smelt_train::Samples { x: &ds.x, y };
        let scores = smelt_train::taylor_scores(model.clone(), &samples, a.batch, 1.0)?;
        opts.gradient_scores = Some(std::sync::Arc::new(scores));
    }
    let calib = if opts.criterion.needs_data() {
        if a.data.data.is_none() {
            bail!(
                Input,
                "--criterion wanda needs calibration data: pass --calib DATA"
            );
        }
        let mut d = a.data.clone();
        d.limit = d.limit.or(Some(128));
        d.sort_by_length = true;
        d.load(&model, a.batch)?.feeds
    } else {
        Vec::new()
    };
    let (pruned, masks, report) = smelt_prune::prune(model.clone(), &opts, &calib)?;
    smelt_onnx::save(&pruned, &a.output)?;
    let masks_path = if masks.0.is_empty() {
        None
    } else {
        let p = a
            .masks
            .clone()
            .unwrap_or_else(|| crate::args::masks_beside(&a.output));
        smelt_onnx::write_atomic(&p, &masks.to_safetensors()?)?;
        Some(p)
    };
    let seconds = started.elapsed().as_secs_f64();
    let before = measure(&model, &a.model)?;
    let after = measure(&pruned, &a.output)?;
    let latency = if a.bench_runs > 0 {
        Some(latency_pair(
            &model,
            &pruned,
            a.bench_batch.max(1),
            a.bench_runs,
        )?)
    } else {
        None
    };
    let ort = match (&a.ort_python, a.bench_runs) {
        (Some(py), 1..) => {
            let batch = [a.bench_batch.max(1)];
            match crate::ort::latency_pairs(py, &model, &pruned, &batch, a.bench_runs) {
                Ok(ms) => ms.first().copied(),
                // The pruned model is written: a timing failure is reported, not fatal.
                Err(e) => {
                    eprintln!("warning: onnxruntime timing failed: {e}");
                    None
                }
            }
        }
        _ => None,
    };
    let side = |m: &Measure, ms: Option<f64>, ort: Option<f64>| json!({"params": m.params, "nonzero_params": m.nonzero, "flops": m.flops, "bytes": m.bytes, "latency_ms": ms, "ort_latency_ms": ort});
    let mut doc =
        serde_json::to_value(&report).map_err(|e| smelt_tensor::Error::Invalid(e.to_string()))?;
    doc["input"] = json!(a.model.display().to_string());
    doc["output"] = json!(a.output.display().to_string());
    doc["masks"] = json!(masks_path.as_ref().map(|p| p.display().to_string()));
    doc["before"] = side(&before, latency.map(|l| l.0), ort.map(|l| l.0));
    doc["after"] = side(&after, latency.map(|l| l.1), ort.map(|l| l.1));
    doc["bench_batch"] = json!(a.bench_batch);
    doc["threads"] = json!(rayon::current_num_threads());
    doc["seconds"] = json!(seconds);
    if let Some(p) = &a.report {
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| smelt_tensor::Error::Invalid(e.to_string()))?;
        smelt_onnx::write_atomic(p, text.as_bytes())?;
    }
    if json {
        print_json(&doc);
        return Ok(());
    }
    println!("pruned     {} -> {}", a.model.display(), a.output.display());
    println!(
        "method     {}, criterion {}",
        report.method, report.criterion
    );
    for b in &report.blocks_removed {
        println!("block      {} removed ({} nodes)", b.add, b.nodes.len());
    }
    for l in &report.layers {
        println!(
            "layer      {:<32} {:>9} params  {:>5.1}% zero",
            l.layer,
            l.params,
            100.0 * l.sparsity
        );
    }
    for g in &report.groups {
        let what = if g.unit > 1 { "heads" } else { "channels" };
        println!(
            "group      {:<40} {} -> {} {what} ({} tensors)",
            g.root,
            g.channels,
            g.channels - g.removed.len(),
            g.members
        );
    }
    for r in &report.refused {
        println!("kept       {}: stops at {}: {}", r.root, r.node, r.reason);
    }
    for (l, why) in &report.skipped {
        println!("dense      {l}: {why}");
    }
    let pct = |x: u64, y: u64| {
        if y > 0 {
            100.0 * x as f64 / y as f64
        } else {
            0.0
        }
    };
    println!(
        "params     {} -> {} ({:.1}%), nonzero {} -> {} ({:.1}%)",
        before.params,
        after.params,
        pct(after.params, before.params),
        before.nonzero,
        after.nonzero,
        pct(after.nonzero, before.nonzero)
    );
    println!(
        "FLOPs      {} -> {} ({:.1}%)",
        before.flops,
        after.flops,
        pct(after.flops, before.flops)
    );
    println!(
        "size       {} -> {} bytes ({:.1}%)",
        before.bytes,
        after.bytes,
        pct(after.bytes, before.bytes)
    );
    if let Some((x, y)) = latency {
        println!(
            "latency    {x:.3} -> {y:.3} ms at batch {} ({:.2}x faster, smelt engine, {} threads)",
            a.bench_batch,
            x / y,
            rayon::current_num_threads()
        );
        if y >= x && matches!(opts.method, Method::Channels) {
            println!("warning    the pruned model is not faster on this machine");
        }
    }
    if let Some((x, y)) = ort {
        println!(
            "onnxruntime {x:.3} -> {y:.3} ms at batch {} ({:.2}x faster, {} threads)",
            a.bench_batch,
            x / y,
            rayon::current_num_threads()
        );
        if y >= x && matches!(opts.method, Method::Channels) {
            println!("warning    the pruned model is not faster in onnxruntime");
        }
    }
    for n in &report.notes {
        println!("note       {n}");
    }
    if let Some(p) = &masks_path {
        println!("masks      {}", p.display());
    }
    println!("time       {seconds:.2} s");
    Ok(())
}
