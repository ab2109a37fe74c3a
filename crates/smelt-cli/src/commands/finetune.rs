use super::quantize::observer_kind;
use crate::args::{load_model, print_json, refuse_overwrite, DataArgs};
use serde_json::json;
use smelt_prune::Scope;
use smelt_tensor::{bail, Result};
use smelt_train::optim::{Optimizer, Schedule};
use smelt_train::{Distill, Gradual, Options, Qat, Samples};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The ONNX model to fine-tune (float weights).
    model: PathBuf,
    /// Where to write the fine-tuned model.
    #[arg(short, long)]
    output: PathBuf,
    /// Training data (same forms as `eval --data`; use --split train).
    #[command(flatten)]
    data: DataArgs,
    /// Labelled validation data (an idx folder's test split, an .npz); evaluated each epoch,
    /// and the best epoch is kept.
    #[arg(long)]
    val: Option<PathBuf>,
    /// Samples of --val used.
    #[arg(long)]
    val_limit: Option<usize>,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// sgd (with --momentum) or adamw.
    #[arg(long, default_value = "sgd")]
    optimizer: String,
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// constant, step (x0.1 each epoch) or cosine (with --warmup steps).
    #[arg(long, default_value = "cosine", value_parser = ["constant", "step", "cosine"])]
    schedule: String,
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Seed of the shuffle.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Pruning masks (from `smelt prune`) to hold: pruned weights stay exactly zero.
    #[arg(long)]
    masks: Option<PathBuf>,
    /// Distill from this model (e.g. the original, uncompressed one).
    #[arg(long)]
    distill_from: Option<PathBuf>,
    #[arg(long, default_value_t = 4.0)]
    temperature: f32,
    /// Weight of the distillation loss (the label loss gets 1 - alpha).
    #[arg(long, default_value_t = 0.5)]
    alpha: f32,
    /// Feature matching with the teacher: weight of the mean squared error between the two
    /// models' intermediate values (each divided by the teacher's mean square), added to the
    /// loss. 0 (the default) matches logits only.
    #[arg(long, default_value_t = 0.0)]
    feature_weight: f32,
    /// The values to match, by name (comma-separated); by default every Conv, Gemm and
    /// MatMul output that both models share with the same shape.
    #[arg(long, value_delimiter = ',')]
    features: Vec<String>,
    /// Stop after this many steps in all.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Quantization-aware training: quantize statically first, then train through fake
    /// quantization; the output is a QDQ model. w8a8: int8 weights per channel, uint8
    /// activations; w4a8: int4 weights per channel.
    #[arg(long, value_parser = ["w8a8", "w4a8"])]
    qat: Option<String>,
    /// Training samples that calibrate the activation ranges for --qat.
    #[arg(long, default_value_t = 500)]
    qat_calib: usize,
    /// Learn the quantization scales as well (LSQ); best with --optimizer adamw.
    #[arg(long)]
    learn_scales: bool,
    /// Observer that sets the activation ranges for --qat.
    #[arg(long, default_value = "minmax", value_parser = ["minmax", "percentile", "entropy", "mse"])]
    observer: String,
    /// Write a checkpoint into this folder after every epoch (`epoch-N/`, older ones removed).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Continue an interrupted run from the latest checkpoint in --checkpoint; give the same
    /// flags as the first run.
    #[arg(long, requires = "checkpoint")]
    resume: bool,
    /// Compute the label loss on logits / T: for models with very large logits (MNIST-8 takes
    /// raw 0..255 pixels), where a few confidently wrong samples would make the whole gradient.
    #[arg(long, default_value_t = 1.0)]
    loss_temperature: f32,
    /// Prune while training: raise the sparsity of the Conv/Gemm/MatMul weights gradually
    /// (cubic schedule, magnitude) to this fraction; the masks are written beside the output.
    #[arg(long)]
    prune_to: Option<f64>,
    /// layer (every layer the same fraction) or global (one ranking) for --prune-to.
    #[arg(long, default_value = "global", value_parser = ["layer", "global"])]
    prune_scope: String,
    /// Fraction of the run's steps by which --prune-to is reached (then held).
    #[arg(long, default_value_t = 0.6)]
    prune_until: f64,
    /// Recompute the masks every this many steps while the sparsity rises.
    #[arg(long, default_value_t = 50)]
    prune_every: usize,
    /// Allow writing over the input file.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args, json: bool) -> Result<()> {
    refuse_overwrite(&a.model, &a.output, a.force)?;
    if a.data.tokenizer.is_some() {
        bail!(
            Unsupported,
            "fine-tuning on text is not supported yet: give labelled images (--data)"
        );
    }
    let started = Instant::now();
    let model = load_model(&a.model)?;
    let train = a.data.dataset(&model)?;
    let Some(y) = train.y.clone() else {
        bail!(Input, "the training data has no labels");
    };
    let val = match &a.val {
        Some(p) => Some(a.data.labelled_val(&model, p, a.val_limit)?),
        None => None,
    };
    let steps_per_epoch = y.len().div_ceil(a.batch.max(1));
    let opts = Options {
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        optimizer: Optimizer::parse(&a.optimizer, a.momentum)?,
        schedule: match a.schedule.as_str() {
            "constant" => Schedule::Constant,
            "step" => Schedule::Step {
                every: steps_per_epoch,
                gamma: 0.1,
            },
            _ => Schedule::Cosine { warmup: a.warmup },
        },
        weight_decay: a.weight_decay,
        seed: a.seed,
        distill: match &a.distill_from {
            Some(_) if !(a.feature_weight >= 0.0 && a.feature_weight.is_finite()) => {
                bail!(Input, "--feature-weight must be a finite number >= 0")
            }
            Some(_) if a.feature_weight == 0.0 && !a.features.is_empty() => {
                bail!(Input, "--features needs a --feature-weight above 0")
            }
            Some(p) => Some(Distill {
                feature_weight: a.feature_weight,
                features: a.features.clone(),
                ..Distill::logits(load_model(p)?, a.temperature, a.alpha)
            }),
            None if a.feature_weight > 0.0 || !a.features.is_empty() => {
                bail!(
                    Input,
                    "feature matching needs a teacher: give --distill-from"
                )
            }
            None => None,
        },
        masks: a
            .masks
            .as_deref()
            .map(smelt_prune::Masks::load)
            .transpose()?,
        max_steps: a.max_steps,
        qat: match a.qat.as_deref() {
            Some(scheme) => Some(Qat {
                quant: smelt_quant::Options {
                    weights: Qat::weights(scheme)?,
                    observer: observer_kind(&a.observer, 99.999, None)?,
                    ..smelt_quant::Options::default()
                },
                calib: a.qat_calib,
                learn_scales: a.learn_scales,
            }),
            None => None,
        },
        checkpoint: a.checkpoint.clone(),
        resume: a.resume,
        loss_temperature: if a.loss_temperature > 0.0 && a.loss_temperature.is_finite() {
            a.loss_temperature
        } else {
            bail!(Input, "--loss-temperature must be positive");
        },
        gradual: match a.prune_to {
            Some(s) => {
                if !(0.0..1.0).contains(&s) || !(0.0..=1.0).contains(&a.prune_until) {
                    bail!(
                        Input,
                        "--prune-to must be in [0, 1) and --prune-until in [0, 1]"
                    );
                }
                let total = a
                    .max_steps
                    .unwrap_or(usize::MAX)
                    .min(steps_per_epoch * a.epochs);
                Some(Gradual {
                    sparsity: s,
                    scope: if a.prune_scope == "layer" {
                        Scope::Layer
                    } else {
                        Scope::Global
                    },
                    start: 0,
                    end: (total as f64 * a.prune_until) as usize,
                    every: a.prune_every.max(1),
                })
            }
            None => None,
        },
    };
    let samples = Samples { x: &train.x, y: &y };
    let val_y = val.as_ref().and_then(|v| v.y.clone());
    let val_samples = val
        .as_ref()
        .zip(val_y.as_deref())
        .map(|(v, y)| Samples { x: &v.x, y });
    let mut bar = crate::progress::Progress::new(json);
    let batch = a.batch.max(1);
    let mut epoch_start = (usize::MAX, Instant::now());
    let trained = smelt_train::finetune(model, &samples, val_samples.as_ref(), &opts, |p| {
        if epoch_start.0 != p.epoch {
            epoch_start = (p.epoch, Instant::now());
        }
        let rate = (p.step * batch) as f64 / epoch_start.1.elapsed().as_secs_f64().max(1e-9);
        bar.update(
            &format!("epoch {}", p.epoch + 1),
            p.step,
            p.steps,
            format!("loss {:.4}, {rate:.0} samples/s", p.loss),
        );
    })?;
    bar.finish();
    smelt_onnx::save(&trained.model, &a.output)?;
    // Masks made here (gradual pruning) go beside the output, as `smelt prune` writes them.
    let masks_path = match (&trained.masks, a.prune_to) {
        (Some(m), Some(_)) => {
            let p = crate::args::masks_beside(&a.output);
            smelt_onnx::write_atomic(&p, &m.to_safetensors()?)?;
            Some(p)
        }
        _ => None,
    };
    let sparsity = trained.masks.as_ref().map(|m| {
        let (cut, all) = m.0.values().fold((0, 0), |(c, n), m| {
            (c + m.keep.iter().filter(|k| !**k).count(), n + m.keep.len())
        });
        cut as f64 / all.max(1) as f64
    });
    let seconds = started.elapsed().as_secs_f64();
    if json {
        print_json(&json!({
            "input": a.model.display().to_string(),
            "output": a.output.display().to_string(),
            "epochs": trained.history,
            "masks": masks_path.as_ref().map(|p| p.display().to_string()),
            "sparsity": sparsity,
            "seconds": seconds,
        }));
        return Ok(());
    }
    println!("fine-tuned {} -> {}", a.model.display(), a.output.display());
    if let Some(p) = &masks_path {
        println!("masks      {}", p.display());
    }
    if let Some(s) = sparsity {
        println!("sparsity   {:.1}% of the masked weights", 100.0 * s);
    }
    for e in &trained.history {
        let v = e
            .val_accuracy
            .map(|v| format!(", val accuracy {v:.4}"))
            .unwrap_or_default();
        println!(
            "epoch {:>3}  loss {:.4}{v}  ({:.0} samples/s)",
            e.epoch + 1,
            e.train_loss,
            e.samples_per_second
        );
    }
    println!("time       {seconds:.1} s");
    Ok(())
}
