use crate::args::{load_model, print_json, refuse_overwrite, DataArgs};
use serde_json::json;
use smelt_ir::Pass;
use smelt_quant::inputs::{quantize_inputs, InputPreprocess};
use smelt_quant::{Clip, Mode, ObserverKind, Options, QType, WeightScheme};
use smelt_tensor::{bail, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The float ONNX model to quantize.
    model: PathBuf,
    /// Where to write the quantized model.
    #[arg(short, long)]
    output: PathBuf,
    /// static (weights + calibrated activations), dynamic (activation ranges at run time) or
    /// weight-only.
    #[arg(long, default_value = "static", value_parser = ["static", "dynamic", "weight-only"])]
    mode: String,
    /// Weight type: int8, uint8, int7 (int8 with 7-bit codes, which x86 int8 kernels without
    /// VNNI multiply exactly), int4, uint4, int2, uint2 (default int8; int4 for weight-only).
    #[arg(long)]
    weight_type: Option<String>,
    /// tensor, channel or block (default channel; block for 4-bit and lower weights).
    #[arg(long)]
    granularity: Option<String>,
    /// Elements per block for --granularity block (along the reduction axis).
    #[arg(long, default_value_t = 128)]
    block_size: usize,
    /// Asymmetric weights (a zero point per group) instead of symmetric.
    #[arg(long)]
    weight_asym: bool,
    /// Weight clipping: minmax, or mse (search the range that minimises reconstruction error).
    #[arg(long, default_value = "minmax", value_parser = ["minmax", "mse"])]
    weight_clip: String,
    /// Activation type for static mode.
    #[arg(long, default_value = "uint8", value_parser = ["uint8", "int8"])]
    act_type: String,
    /// Symmetric activation ranges.
    #[arg(long)]
    act_sym: bool,
    /// How activation ranges are chosen from calibration data.
    #[arg(long, default_value = "minmax", value_parser = ["minmax", "percentile", "entropy", "mse"])]
    observer: String,
    /// Percentile for --observer percentile.
    #[arg(long, default_value_t = 99.999)]
    percentile: f64,
    /// Histogram bins for the entropy and mse observers (default: 4096 for entropy, 2048 for
    /// mse).
    #[arg(long)]
    bins: Option<usize>,
    /// Calibration data (same forms as `eval --data`; use --split train). Default: 500 samples.
    #[command(flatten)]
    data: DataArgs,
    /// Samples per calibration run.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Op types to quantize.
    #[arg(long, value_delimiter = ',', default_value = "Conv,Gemm,MatMul,Gather")]
    ops: Vec<String>,
    /// Keep in float: a node name, an op type or a name pattern with * and ? (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    /// Quantize only the inputs of quantized nodes, not their outputs.
    #[arg(long)]
    no_output_quant: bool,
    /// Make the model take uint8 inputs, folding --scale/--mean/--std into the graph.
    #[arg(long)]
    quantize_inputs: bool,
    /// Cross-layer equalization before quantizing (data-free).
    #[arg(long)]
    equalize: bool,
    /// SmoothQuant / AWQ-style scaling of MatMul inputs: `auto` searches each layer's
    /// strength against its quantized output error, or give a fixed alpha in [0, 1].
    /// Uses the calibration data.
    #[arg(long)]
    smooth: Option<String>,
    /// Take MatMul input channels whose range dwarfs the rest out of the quantized product
    /// into a small float one: `auto` picks 0-8 per activation by the quantized output error
    /// on the calibration data, or give a count per activation.
    #[arg(long)]
    outliers: Option<String>,
    /// GPTQ: quantize MatMul/Gemm weights row by row, compensating each rounding error with
    /// the rows still to come (uses the calibration data).
    #[arg(long)]
    gptq: bool,
    /// Correct each channel's mean shift on the calibration data (static mode).
    #[arg(long)]
    bias_correction: bool,
    /// Also quantize one layer at a time and report each layer's metric drop.
    #[arg(long)]
    sensitivity: bool,
    /// Labelled data for --sensitivity (default: fidelity to the float model on the
    /// calibration data).
    #[arg(long)]
    val: Option<PathBuf>,
    /// Samples of --val used by --sensitivity.
    #[arg(long, default_value_t = 2000)]
    val_limit: usize,
    /// Rename every internal value and node to a short id (inputs and outputs keep their
    /// names): the smallest file, for shipping, but hard to read; --exclude and the manifest
    /// still use the original names.
    #[arg(long)]
    compact_names: bool,
    /// Write the per-tensor manifest (JSON) here.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Allow writing over the input file.
    #[arg(long)]
    force: bool,
}

fn options(a: &Args) -> Result<Options> {
    let mode = Mode::parse(&a.mode)?;
    let scheme = WeightScheme::parse(
        mode == Mode::WeightOnly,
        a.weight_type.as_deref(),
        a.granularity.as_deref(),
        a.block_size,
    )?;
    let observer = observer_kind(&a.observer, a.percentile, a.bins)?;
    Ok(Options {
        mode,
        weights: WeightScheme {
            symmetric: !a.weight_asym,
            clip: if a.weight_clip == "mse" {
                Clip::Mse
            } else {
                Clip::MinMax
            },
            ..scheme
        },
        act_qtype: QType::parse(&a.act_type)?,
        act_symmetric: a.act_sym,
        observer,
        ops: a.ops.clone(),
        exclude: a.exclude.clone(),
        quantize_outputs: !a.no_output_quant,
        equalize: a.equalize,
        smooth: match a.smooth.as_deref() {
            None => None,
            Some("auto") => Some(f32::NAN),
            Some(v) => Some(v.parse::<f32>().map_err(|_| {
                smelt_tensor::Error::Input(format!(
                    "--smooth takes 'auto' or a number in [0, 1], got '{v}'"
                ))
            })?),
        },
        outliers: match a.outliers.as_deref() {
            None => smelt_quant::smooth::Outliers::Off,
            Some(v) => smelt_quant::smooth::Outliers::parse(v)?,
        },
        bias_correction: a.bias_correction,
        gptq: a.gptq,
        only: None,
        ranges: None,
        weight_overrides: Default::default(),
        compact: true,
    })
}

pub fn run(a: Args, json: bool) -> Result<()> {
    refuse_overwrite(&a.model, &a.output, a.force)?;
    let started = Instant::now();
    let opts = options(&a)?;
    let model = load_model(&a.model)?;
    let needs_data = opts.mode == Mode::Static
        || opts.bias_correction
        || opts.smooth.is_some()
        || opts.outliers != smelt_quant::smooth::Outliers::Off
        || opts.gptq
        || a.sensitivity && a.val.is_none();
    let mut data = a.data.clone();
    data.limit = data.limit.or(Some(500));
    data.sort_by_length = true;
    let calib = if data.data.is_some() {
        data.load(&model, a.batch)?.feeds
    } else if needs_data {
        bail!(Input, "static quantization needs calibration data: pass --calib DATA (e.g. --calib mnist/ --split train)");
    } else {
        Vec::new()
    };
    let calib_time = started.elapsed().as_secs_f64();
    let mut bar = crate::progress::Progress::new(json);
    let (mut qmodel, mut manifest) =
        smelt_quant::quantize(model.clone(), &opts, &calib, |stage, d, n| {
            bar.update(stage, d, n, "batches".into())
        })?;
    bar.finish();
    if a.quantize_inputs {
        let pre = InputPreprocess {
            scale: a.data.scale,
            mean: a.data.mean.clone(),
            std: a.data.std.clone(),
        };
        let (m, rec) = quantize_inputs(qmodel, &pre)?;
        qmodel = m;
        manifest.notes.extend(rec.changes);
    }
    let sensitivity = if a.sensitivity {
        Some(run_sensitivity(&a, &model, &opts, &calib)?)
    } else {
        None
    };
    if a.compact_names {
        let (m, rec) = smelt_ir::passes::CompactNames.run(qmodel)?;
        qmodel = m;
        manifest.notes.extend(rec.changes);
    }
    smelt_onnx::save(&qmodel, &a.output)?;
    let seconds = started.elapsed().as_secs_f64();
    let in_bytes = std::fs::metadata(&a.model).map(|m| m.len()).unwrap_or(0);
    let out_bytes = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    let mut doc =
        serde_json::to_value(&manifest).map_err(|e| smelt_tensor::Error::Invalid(e.to_string()))?;
    doc["input"] = json!(a.model.display().to_string());
    doc["output"] = json!(a.output.display().to_string());
    doc["input_bytes"] = json!(in_bytes);
    doc["output_bytes"] = json!(out_bytes);
    doc["seconds"] = json!(seconds);
    doc["data_seconds"] = json!(calib_time);
    if let Some(s) = &sensitivity {
        doc["sensitivity"] = json!(s);
    }
    if let Some(p) = &a.manifest {
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| smelt_tensor::Error::Invalid(e.to_string()))?;
        smelt_onnx::write_atomic(p, text.as_bytes())?;
    }
    if json {
        print_json(&doc);
        return Ok(());
    }
    print_summary(&a, &manifest, in_bytes, out_bytes, seconds);
    if let Some(s) = &sensitivity {
        println!(
            "\nsensitivity ({}): metric with only this layer quantized",
            s.metric
        );
        println!("  float metric {:.4}", s.float_metric);
        let mut rows = s.layers.clone();
        rows.sort_by(|x, y| y.drop.total_cmp(&x.drop));
        for l in rows {
            println!("  {:<40} {:>9.4}  drop {:+.4}", l.node, l.metric, l.drop);
        }
    }
    Ok(())
}

fn print_summary(a: &Args, m: &smelt_quant::Manifest, in_bytes: u64, out_bytes: u64, seconds: f64) {
    println!("quantized  {} -> {}", a.model.display(), a.output.display());
    println!("mode       {} (opset {})", m.mode, m.opset);
    println!("nodes      {} quantized", m.nodes_quantized);
    let w: Vec<_> = m.weights().collect();
    if let Some(first) = w.first() {
        let worst = w
            .iter()
            .map(|t| t.sqnr_db.unwrap_or(f64::INFINITY))
            .fold(f64::INFINITY, f64::min);
        println!(
            "weights    {} tensors, {} {} ({}), worst SQNR {:.1} dB",
            w.len(),
            first.qtype,
            first.granularity.split(' ').next().unwrap_or(""),
            if first.symmetric {
                "symmetric"
            } else {
                "asymmetric"
            },
            worst
        );
    }
    let acts: Vec<_> = m
        .tensors
        .iter()
        .filter(|t| t.kind == "activation")
        .collect();
    if !acts.is_empty() {
        let worst = acts
            .iter()
            .map(|t| t.sqnr_db.unwrap_or(f64::INFINITY))
            .fold(f64::INFINITY, f64::min);
        println!(
            "activations {} tensors, {} per-tensor, {}, worst SQNR {:.1} dB",
            acts.len(),
            acts[0].qtype,
            acts[0].observer.clone().unwrap_or_default(),
            worst
        );
    }
    let ratio = if in_bytes > 0 {
        out_bytes as f64 / in_bytes as f64
    } else {
        0.0
    };
    println!(
        "size       {in_bytes} -> {out_bytes} bytes ({:.1}% of the original)",
        100.0 * ratio
    );
    for f in &m.fallbacks {
        println!("float      {} ({}): {}", f.node, f.op, f.reason);
    }
    for n in &m.notes {
        println!("note       {n}");
    }
    if let Some(p) = &a.manifest {
        println!("manifest   {}", p.display());
    }
    println!("time       {seconds:.2} s");
}

fn run_sensitivity(
    a: &Args,
    model: &smelt_ir::Model,
    opts: &Options,
    calib: &[smelt_quant::Feed],
) -> Result<smelt_quant::sensitivity::Report> {
    use crate::args::session;
    match &a.val {
        Some(val) => {
            let mut d = a.data.clone();
            d.data = Some(val.clone());
            d.split = "test".into();
            d.limit = Some(a.val_limit);
            let b = d.load(model, 64)?;
            let Some(labels) = b.labels.clone() else {
                bail!(Input, "--val data has no labels");
            };
            let eval = |m: &smelt_ir::Model| -> Result<f64> {
                let s = session(m.clone())?;
                let (mut ok, mut n) = (0usize, 0usize);
                for (feed, y) in b.feeds.iter().zip(&labels) {
                    let out = s.run_feed(feed)?;
                    let pred = smelt_data::top1(&out[0].1)?;
                    ok += pred
                        .iter()
                        .zip(y)
                        .filter(|(p, l)| **p as i64 == **l)
                        .count();
                    n += y.len();
                }
                Ok(ok as f64 / n.max(1) as f64)
            };
            smelt_quant::sensitivity::analyze(model, opts, calib, "accuracy", eval)
        }
        None => {
            let reference = session(model.clone())?;
            let refs: Vec<_> = calib
                .iter()
                .map(|f| reference.run_feed(f))
                .collect::<Result<_>>()?;
            // Text models are read as mean-pooled sentence embeddings (as `smelt eval --pool
            // mean` scores them): per token, padding positions would weigh in too.
            let pooled = a.data.tokenizer.is_some();
            let read = |feed: &smelt_quant::Feed, out: &smelt_tensor::Tensor| {
                let mask = feed
                    .iter()
                    .find(|(n, _)| n == "attention_mask")
                    .map(|(_, t)| t);
                if pooled {
                    smelt_data::mean_pool(out, mask)
                } else {
                    Ok(out.clone())
                }
            };
            let refs: Vec<_> = refs
                .iter()
                .zip(calib)
                .map(|(r, f)| read(f, &r[0].1))
                .collect::<Result<_>>()?;
            let eval = |m: &smelt_ir::Model| -> Result<f64> {
                let s = session(m.clone())?;
                let mut acc = smelt_data::FidelityAccumulator::new();
                for (feed, r) in calib.iter().zip(&refs) {
                    let out = s.run_feed(feed)?;
                    acc.add(r, &read(feed, &out[0].1)?)?;
                }
                Ok(acc.finish()?.cosine)
            };
            let metric = if pooled {
                "mean-pooled cosine to float"
            } else {
                "cosine to float"
            };
            smelt_quant::sensitivity::analyze(model, opts, calib, metric, eval)
        }
    }
}

/// The calibration observer named on the command line.
/// Entropy's default keeps TensorRT's ratio of histogram bins to grid levels (2048 for 128,
/// 16 per level) on the 256 levels of a one-sided uint8 grid: with 8 per level the KL
/// threshold moves with how the bins split among levels (MNIST-8 W8A8: 0.9889 at 2048
/// bins, 0.9890-0.9892 at 1024-8192).
const ENTROPY_BINS: usize = 4096;
const MSE_BINS: usize = 2048;

pub fn observer_kind(name: &str, percentile: f64, bins: Option<usize>) -> Result<ObserverKind> {
    let bins = bins.unwrap_or(if name == "entropy" {
        ENTROPY_BINS
    } else {
        MSE_BINS
    });
    if bins < 128 {
        bail!(Input, "--bins must be at least 128, got {bins}");
    }
    if name == "percentile" && !(percentile > 50.0 && percentile <= 100.0) {
        bail!(Input, "--percentile must be in (50, 100], got {percentile}");
    }
    ObserverKind::parse(name, percentile, bins)
}
