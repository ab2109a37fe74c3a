//! Fine-tuning: train a model's weights with the engine's own gradients, to recover the
//! accuracy pruning or quantization cost.
//!
//! Layout: `loss` (cross-entropy, distillation, MSE), `optim` (SGD with momentum, AdamW,
//! learning-rate schedules); [`finetune`] is the loop: seeded shuffling, forward with the
//! values backward needs, `smelt_engine::grad::backward`, the update, pruning masks enforced
//! after every step, validation each epoch and the best model kept. With [`Qat`] the model is
//! quantized first and trained in its fake-quantized form (`smelt_quant::qat`), then written
//! back as QDQ.

pub mod checkpoint;
pub mod loss;
pub mod optim;

use checkpoint::Checkpoint;
use optim::{Optimizer, Schedule};
use serde::{Deserialize, Serialize};
use smelt_engine::passes::FoldConstants;
use smelt_engine::{grad, RunOptions, Session};
use smelt_ir::{Dim, Model, Pass};
use smelt_prune::Masks;
use smelt_tensor::{bail, DType, Result, Tensor};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// Labelled samples: `x` is `[N, ...]`, one label per row.
pub struct Samples<'a> {
    pub x: &'a Tensor,
    pub y: &'a [i64],
}

pub struct Distill {
    pub teacher: Model,
    pub temperature: f32,
    /// Weight of the distillation term; the hard-label loss gets `1 - alpha`.
    pub alpha: f32,
    /// Weight of feature matching ([`loss::feature_match`], averaged over `features`), added
    /// to the loss; 0 turns it off.
    pub feature_weight: f32,
    /// The intermediate values to match, by name in both models. Empty: every Conv, Gemm
    /// and MatMul output the two share with the same shape (a layer that structured pruning
    /// narrowed has no counterpart and is left out).
    pub features: Vec<String>,
}

impl Distill {
    /// Logit distillation only, the default: KL at temperature `temperature`, weight `alpha`.
    pub fn logits(teacher: Model, temperature: f32, alpha: f32) -> Distill {
        Distill {
            teacher,
            temperature,
            alpha,
            feature_weight: 0.0,
            features: Vec::new(),
        }
    }
}

pub struct Options {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f32,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub weight_decay: f32,
    pub seed: u64,
    pub distill: Option<Distill>,
    /// Pruning masks to hold: masked weights stay exactly zero.
    pub masks: Option<Masks>,
    /// Stop after this many steps in all (a time budget for long runs).
    pub max_steps: Option<usize>,
    /// Quantization-aware training: quantize first, train through fake quantization.
    pub qat: Option<Qat>,
    /// Write a checkpoint here after every epoch ([`checkpoint`]).
    pub checkpoint: Option<std::path::PathBuf>,
    /// Continue from the latest checkpoint in `checkpoint` (run with the same options).
    pub resume: bool,
    /// Prune while training, gradually.
    pub gradual: Option<Gradual>,
    /// The label loss is computed on logits divided by this: for models trained to very
    /// large logits (a few confidently wrong samples would otherwise make the whole gradient).
    /// Predictions do not change with it.
    pub loss_temperature: f32,
}

/// Gradual magnitude pruning inside the loop (Zhu & Gupta, 2017): the sparsity of the
/// prunable weights (Conv, Gemm, MatMul) rises along a cubic from 0 at step `start` to
/// `sparsity` at step `end`; every `every` steps the masks are recomputed from the current
/// weights, and they are held from then on, so the network adapts as it loses weights.
#[derive(Clone, Debug)]
pub struct Gradual {
    pub sparsity: f64,
    pub scope: smelt_prune::unstructured::Scope,
    pub start: usize,
    pub end: usize,
    pub every: usize,
}

/// A finished run.
pub struct Trained {
    /// The best model (by validation accuracy; the last one without validation data).
    pub model: Model,
    pub history: Vec<Epoch>,
    /// The masks held at the end (given, or made by gradual pruning).
    pub masks: Option<Masks>,
}

pub struct Qat {
    /// The static quantization to train for (its weights and activation types).
    pub quant: smelt_quant::Options,
    /// Training samples that calibrate activation ranges before training starts.
    pub calib: usize,
    /// Learn the scales too (LSQ); otherwise they stay as calibrated.
    pub learn_scales: bool,
}

impl Qat {
    /// The weight scheme of a QAT scheme name: `w8a8` (int8 per channel) or `w4a8` (int4 per
    /// channel); activations stay the quantizer's default uint8.
    pub fn weights(scheme: &str) -> Result<smelt_quant::WeightScheme> {
        let qtype = match scheme {
            "w8a8" => smelt_quant::QType::I8,
            "w4a8" => smelt_quant::QType::I4,
            _ => bail!(Input, "unknown qat scheme '{scheme}' (w8a8 or w4a8)"),
        };
        Ok(smelt_quant::WeightScheme {
            qtype,
            ..smelt_quant::WeightScheme::default()
        })
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            epochs: 1,
            batch: 64,
            lr: 0.01,
            optimizer: Optimizer::Sgd { momentum: 0.9 },
            schedule: Schedule::Cosine { warmup: 0 },
            weight_decay: 0.0,
            seed: 0,
            distill: None,
            masks: None,
            max_steps: None,
            qat: None,
            checkpoint: None,
            resume: false,
            gradual: None,
            loss_temperature: 1.0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Epoch {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_accuracy: Option<f64>,
    pub samples_per_second: f64,
}

/// What a progress callback sees after each step.
pub struct Progress {
    pub epoch: usize,
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
}

/// Gives a fixed-batch-1 model a dynamic batch, folds constant weight expressions into plain
/// initializers (what gets trained), and drops initializers that pose as inputs (IR < 4).
pub fn prepare(model: Model) -> Result<Model> {
    let mut model = model;
    model.graph.drop_initializer_inputs();
    let fixed_one = model
        .graph
        .runtime_inputs()
        .any(|v| v.shape.as_ref().and_then(|s| s.first()) == Some(&Dim::Fixed(1)));
    if fixed_one {
        model = smelt_ir::passes::DynamicBatch::default().run(model)?.0;
    }
    Ok(FoldConstants {
        max_elements: 1 << 28,
    }
    .run(model)?
    .0)
}

/// The trainable weights: float initializers every reader of which has a gradient. Scalars
/// are constants of the computation (an input scaling, an epsilon, a Pow exponent, a
/// quantization scale), not weights, and so are a Pow's exponents and quantization scales.
pub fn trainable(model: &Model) -> Vec<String> {
    let ops: HashSet<&str> = grad::differentiable_ops().into_iter().collect();
    let g = &model.graph;
    let not_weight = |r: usize, name: &str| {
        let n = &g.nodes[r];
        let slot = n.inputs.iter().position(|x| x == name);
        match n.op_type.as_str() {
            "Pow" => slot == Some(1),
            "QuantizeLinear" | "DequantizeLinear" => slot != Some(0),
            _ => false,
        }
    };
    g.initializers
        .iter()
        .filter(|(name, t)| {
            t.dtype() == DType::F32 && t.numel() > 1 && {
                let readers = g.consumers(name);
                !readers.is_empty()
                    && readers
                        .iter()
                        .all(|&r| ops.contains(g.nodes[r].op_type.as_str()) && !not_weight(r, name))
            }
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// A seeded permutation of `0..n` (Fisher-Yates over a 64-bit LCG).
fn shuffle(n: usize, seed: u64) -> Vec<usize> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        p.swap(i, ((s >> 33) as usize) % (i + 1));
    }
    p
}

/// The rows `idx` of `x` (`[N, ...]`), in that order.
pub fn rows(x: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let inner: usize = x.shape()[1..].iter().product();
    let v = x.as_slice::<f32>()?;
    let mut out = Vec::with_capacity(idx.len() * inner);
    for &i in idx {
        out.extend_from_slice(&v[i * inner..(i + 1) * inner]);
    }
    let mut shape = x.shape().to_vec();
    shape[0] = idx.len();
    Tensor::from_vec(shape, out)
}

/// The one input that labelled samples feed.
pub fn input_name(model: &Model) -> Result<String> {
    let mut it = model.graph.runtime_inputs();
    match (it.next(), it.next()) {
        (Some(v), None) => Ok(v.name.clone()),
        _ => bail!(
            Unsupported,
            "training and evaluating on labelled samples support models with one input"
        ),
    }
}

/// Top-1 accuracy of `s` on `data`, in batches.
pub fn accuracy(s: &Session, input: &str, data: &Samples, batch: usize) -> Result<f64> {
    let n = data.y.len();
    let mut ok = 0usize;
    for start in (0..n).step_by(batch.max(1)) {
        let idx: Vec<usize> = (start..(start + batch).min(n)).collect();
        let out = s.run(&[(input, rows(data.x, &idx)?)])?;
        let logits = out[0].1.as_slice::<f32>()?;
        let c = logits.len() / idx.len();
        for (k, &i) in idx.iter().enumerate() {
            if data.y[i] < 0 || data.y[i] as u64 >= c as u64 {
                bail!(
                    Input,
                    "label {} of sample {i} is outside the model's {c} classes",
                    data.y[i]
                );
            }
            let row = &logits[k * c..(k + 1) * c];
            let best = (0..c).fold(0, |b, j| if row[j] > row[b] { j } else { b });
            ok += usize::from(best as i64 == data.y[i]);
        }
    }
    Ok(ok as f64 / n.max(1) as f64)
}

fn enforce(masks: &Masks, name: &str, v: &mut [f32]) {
    if let Some(m) = masks.0.get(name) {
        for (x, &k) in v.iter_mut().zip(&m.keep) {
            if !k {
                *x = 0.0;
            }
        }
    }
}

/// Fine-tunes `model` on `train` (classification).
pub fn finetune(
    model: Model,
    train: &Samples,
    val: Option<&Samples>,
    opts: &Options,
    mut progress: impl FnMut(&Progress),
) -> Result<Trained> {
    if train.y.is_empty() || train.x.shape().first() != Some(&train.y.len()) {
        bail!(
            Input,
            "the training set is empty or its labels do not match its samples"
        );
    }
    let resumed = match (&opts.checkpoint, opts.resume) {
        (Some(dir), true) => match Checkpoint::latest(dir)? {
            Some(c) => Some(c),
            None => bail!(Input, "no checkpoint to resume in {}", dir.display()),
        },
        (None, true) => bail!(Input, "resuming needs the checkpoint folder"),
        _ => None,
    };
    let (model, form, input) = match &resumed {
        // The checkpoint holds the model as it was being trained (prepared, quantized).
        Some(c) => (c.model.clone(), c.form.clone(), input_name(&c.model)?),
        None => {
            let mut model = prepare(model)?;
            let input = input_name(&model)?;
            let mut form = None;
            // Before quantizing, so the codes of cut weights are exact zeros.
            if let Some(m) = &opts.masks {
                m.apply(&mut model.graph)?;
            }
            if let Some(q) = &opts.qat {
                let (m, f) = fake_quantize(model, q, train, &input, opts)?;
                model = m;
                form = Some(f);
            }
            (model, form, input)
        }
    };
    // A checkpoint's model already holds its masks; a fresh one had them applied above.
    let mut masks = match &resumed {
        Some(c) => c.masks.clone(),
        None => opts.masks.clone(),
    };
    let mut params = trainable(&model);
    let mut scales = HashSet::new();
    if let (Some(f), Some(q)) = (&form, &opts.qat) {
        if q.learn_scales {
            scales.extend(f.scales.iter().cloned());
            params.extend(f.scales.iter().cloned());
        }
    }
    if params.is_empty() {
        bail!(Unsupported, "the model has no trainable float weights");
    }
    if let Some(m) = &opts.masks {
        for name in m.0.keys() {
            if !params.contains(name) {
                bail!(
                    Input,
                    "the masks name '{name}', which is not a trainable weight of the model"
                );
            }
        }
    }
    let teacher = match &opts.distill {
        Some(d) => {
            let t = prepare(d.teacher.clone())?;
            let input = input_name(&d.teacher)?;
            // Feature matching reads values of the file's graph, which only the reference
            // session keeps all of (the running one fuses some away).
            let s = if d.feature_weight > 0.0 {
                Session::reference(t)?
            } else {
                Session::new(t)?
            };
            Some((s, input))
        }
        None => None,
    };
    let mut session = Session::unfolded(model.clone())?;
    let features = match (&teacher, &opts.distill) {
        (Some((ts, tin)), Some(d)) if d.feature_weight > 0.0 => {
            let probe = rows(train.x, &[0])?;
            matched_features(&session, &input, ts, tin, &probe, &d.features)?
        }
        _ => Vec::new(),
    };
    let mut needed = grad::needed_values(&model, &params)?;
    needed.extend(
        features
            .iter()
            .filter(|f| !needed.contains(f))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let n = train.y.len();
    let batch = opts.batch.max(1);
    let steps_per_epoch = n.div_ceil(batch);
    let total = opts
        .max_steps
        .unwrap_or(usize::MAX)
        .min(steps_per_epoch * opts.epochs);
    let prunable = match &opts.gradual {
        Some(_) => {
            let ops: Vec<String> = smelt_prune::targets::DEFAULT_OPS
                .iter()
                .map(|s| s.to_string())
                .collect();
            smelt_prune::targets::find(&model.graph, &ops, &[])?
        }
        None => vec![],
    };
    let (mut history, mut best, mut states, mut step, first) = match resumed {
        Some(c) => (c.history, c.best, c.states, c.step, c.epochs_done),
        None => (Vec::new(), None, HashMap::new(), 0usize, 0),
    };
    for epoch in first..opts.epochs {
        if step >= total {
            break;
        }
        let started = Instant::now();
        let order = shuffle(n, opts.seed.wrapping_add(epoch as u64));
        let (mut loss_sum, mut seen) = (0f64, 0usize);
        for chunk in order.chunks(batch) {
            if step >= total {
                break;
            }
            smelt_tensor::interrupt::check()?;
            if let Some(gp) = &opts.gradual {
                if step >= gp.start && step <= gp.end && (step - gp.start) % gp.every.max(1) == 0 {
                    let m = gradual_masks(&session, &prunable, gp, step, opts.masks.as_ref())?;
                    for name in m.0.keys() {
                        let mut w = session.model().graph.initializers[name].clone();
                        enforce(&m, name, w.as_mut_slice::<f32>()?);
                        session.set_initializer(name, w)?;
                    }
                    masks = Some(m);
                }
            }
            let x = rows(train.x, chunk)?;
            let y: Vec<i64> = chunk.iter().map(|&i| train.y[i]).collect();
            let (loss, grads) =
                batch_gradients(&session, &input, &x, &params, &needed, |logits, values| {
                    let (mut loss, mut dlogits) =
                        loss::cross_entropy_scaled(logits, &y, opts.loss_temperature)?;
                    let mut seeds = Vec::new();
                    if let (Some((ts, tin)), Some(d)) = (&teacher, &opts.distill) {
                        let (outs, tv) = ts.run_with(
                            &[(tin.as_str(), x.clone())],
                            &RunOptions {
                                capture: features.clone(),
                                ..Default::default()
                            },
                        )?;
                        let t = &outs[0].1;
                        // Each matched value's loss, averaged, weighted by feature_weight.
                        let w = d.feature_weight / features.len().max(1) as f32;
                        let mut matched = 0f64;
                        for f in &features {
                            let (fl, df) = loss::feature_match(&values[f], &tv[f])?;
                            matched += w as f64 * fl;
                            let df: Vec<f32> =
                                df.as_slice::<f32>()?.iter().map(|g| w * g).collect();
                            seeds.push((
                                f.clone(),
                                Tensor::from_vec(values[f].shape().to_vec(), df)?,
                            ));
                        }
                        let (kl, dk) = loss::distill(logits, t, d.temperature)?;
                        // Label and logit losses blend by alpha; feature matching adds on top.
                        loss = (1.0 - d.alpha as f64) * loss + d.alpha as f64 * kl + matched;
                        let (a, b) = (1.0 - d.alpha, d.alpha);
                        let dv: Vec<f32> = dlogits
                            .as_slice::<f32>()?
                            .iter()
                            .zip(dk.as_slice::<f32>()?)
                            .map(|(h, s)| a * h + b * s)
                            .collect();
                        dlogits = Tensor::from_vec(logits.shape().to_vec(), dv)?;
                    }
                    if !loss.is_finite() {
                        bail!(
                            Invalid,
                            "the loss became {loss} at step {step}: lower --lr (it is {})",
                            opts.lr
                        );
                    }
                    Ok((loss, dlogits, seeds))
                })?;
            let lr = opts.schedule.rate(opts.lr, step, total);
            for name in &params {
                let Some(g) = grads.get(name) else { continue };
                let mut g = g.as_slice::<f32>()?.to_vec();
                let mut w = session.model().graph.initializers[name].clone();
                if let Some(m) = &masks {
                    enforce(m, name, &mut g);
                }
                // Decay only matrices and kernels, not biases and norm parameters.
                let wd = if w.rank() > 1 { opts.weight_decay } else { 0.0 };
                let wv = w.as_mut_slice::<f32>()?;
                optim::step(
                    opts.optimizer,
                    states.entry(name.clone()).or_default(),
                    wv,
                    &g,
                    lr,
                    wd,
                );
                if let Some(m) = &masks {
                    enforce(m, name, wv);
                }
                if scales.contains(name) {
                    // A learned step size must stay positive.
                    wv.iter_mut().for_each(|s| *s = s.max(1e-12));
                }
                session.set_initializer(name, w)?;
            }
            loss_sum += loss * chunk.len() as f64;
            seen += chunk.len();
            step += 1;
            progress(&Progress {
                epoch,
                step: step - epoch * steps_per_epoch,
                steps: steps_per_epoch,
                loss,
            });
        }
        let secs = started.elapsed().as_secs_f64();
        let val_accuracy = match val {
            Some(v) => Some(accuracy(&session, &input, v, 256)?),
            None => None,
        };
        let current = session.model().clone();
        let score = val_accuracy.unwrap_or(epoch as f64);
        if best.as_ref().is_none_or(|(b, _)| score >= *b) {
            best = Some((score, current));
        }
        history.push(Epoch {
            epoch,
            train_loss: loss_sum / seen.max(1) as f64,
            val_accuracy,
            samples_per_second: seen as f64 / secs.max(1e-9),
        });
        if let Some(dir) = &opts.checkpoint {
            let c = Checkpoint {
                epochs_done: epoch + 1,
                step,
                model: session.model().clone(),
                best,
                states,
                history,
                form: form.clone(),
                masks: masks.clone(),
            };
            c.save(dir)?;
            (best, states, history) = (c.best, c.states, c.history);
        }
    }
    let Some((_, mut out)) = best else {
        bail!(
            Input,
            "no epoch left to run (the checkpoint has all {} epochs)",
            opts.epochs
        );
    };
    // Training starts from the prepared model; keep the original's metadata.
    out.producer_name = "smelt".into();
    if let Some(m) = &masks {
        m.apply(&mut out.graph)?;
    }
    if let Some(f) = &form {
        out = smelt_quant::qat::to_qdq(out, f)?;
    }
    Ok(Trained {
        model: out,
        history,
        masks,
    })
}

/// The values feature matching compares: `asked` by name (each must exist in both models
/// with the same shape), or with none asked, every Conv, Gemm and MatMul output that both
/// share with the same shape on `probe`, except the student's graph outputs (the logits have
/// their own loss).
fn matched_features(
    student: &Session,
    input: &str,
    teacher: &Session,
    teacher_input: &str,
    probe: &Tensor,
    asked: &[String],
) -> Result<Vec<String>> {
    let sg = student.graph();
    let produced = |s: &Session| -> HashSet<String> {
        s.graph()
            .nodes
            .iter()
            .flat_map(|n| n.outputs.iter().cloned())
            .collect()
    };
    let (sp, tp) = (produced(student), produced(teacher));
    let candidates: Vec<String> = if asked.is_empty() {
        sg.nodes
            .iter()
            .filter(|n| {
                n.domain.is_empty() && matches!(n.op_type.as_str(), "Conv" | "Gemm" | "MatMul")
            })
            .map(|n| n.outputs[0].clone())
            .filter(|o| tp.contains(o) && !sg.outputs.iter().any(|v| &v.name == o))
            .collect()
    } else {
        for (i, f) in asked.iter().enumerate() {
            if asked[..i].contains(f) {
                bail!(Input, "feature '{f}' is named twice");
            }
            if !sp.contains(f) || !tp.contains(f) {
                bail!(
                    Input,
                    "feature '{f}' is not computed by both the model and the teacher"
                );
            }
        }
        asked.to_vec()
    };
    let shapes = |s: &Session, inp: &str| -> Result<HashMap<String, Vec<usize>>> {
        let (_, v) = s.run_with(
            &[(inp, probe.clone())],
            &RunOptions {
                capture: candidates.clone(),
                ..Default::default()
            },
        )?;
        Ok(v.into_iter()
            .map(|(k, t)| (k, t.shape().to_vec()))
            .collect())
    };
    let (ss, ts) = (shapes(student, input)?, shapes(teacher, teacher_input)?);
    let mut out = Vec::new();
    for f in candidates {
        if ss.get(&f) == ts.get(&f) {
            out.push(f);
        } else if !asked.is_empty() {
            bail!(
                Input,
                "feature '{f}' has shape {:?} in the model but {:?} in the teacher",
                ss.get(&f),
                ts.get(&f)
            );
        }
    }
    if out.is_empty() {
        bail!(
            Input,
            "feature matching found no value that the model and the teacher share with the same shape"
        );
    }
    Ok(out)
}

/// Magnitude masks at the schedule's sparsity for `step`, over the current weights; weights
/// that `fixed` masks (given by the user) stay cut.
fn gradual_masks(
    session: &Session,
    targets: &[smelt_prune::targets::WeightTarget],
    gp: &Gradual,
    step: usize,
    fixed: Option<&Masks>,
) -> Result<Masks> {
    let s = smelt_prune::unstructured::cubic_schedule(step, gp.start, gp.end, 0.0, gp.sparsity);
    let g = &session.model().graph;
    let scores: Vec<Vec<f32>> = targets
        .iter()
        .map(|t| {
            let w = g.initializers[&t.weight].as_slice::<f32>()?;
            let cut = fixed.and_then(|f| f.0.get(&t.weight));
            Ok(w.iter()
                .enumerate()
                .map(|(i, x)| match cut {
                    Some(m) if !m.keep[i] => -1.0,
                    _ => x.abs(),
                })
                .collect())
        })
        .collect::<Result<_>>()?;
    let mut m = smelt_prune::unstructured::masks(
        targets,
        &scores,
        gp.scope,
        s,
        &vec![None; targets.len()],
    )?;
    if let Some(f) = fixed {
        for (k, fm) in &f.0 {
            match m.0.get_mut(k) {
                Some(mm) => mm.keep.iter_mut().zip(&fm.keep).for_each(|(a, &b)| *a &= b),
                None => {
                    m.0.insert(k.clone(), fm.clone());
                }
            }
        }
    }
    Ok(m)
}

/// One forward and backward pass on `x`, keeping the `needed` values
/// (`grad::needed_values` of `params`, computed once per run): `objective` maps the first
/// output and the kept values to (loss, d loss / d output, and the loss's gradients with
/// respect to kept intermediate values, if it reads any); returns the loss and the gradients
/// of `params`.
fn batch_gradients<Objective>(
    session: &Session,
    input: &str,
    x: &Tensor,
    params: &[String],
    needed: &[String],
    objective: Objective,
) -> Result<(f64, HashMap<String, Tensor>)>
where
    Objective:
        FnOnce(&Tensor, &HashMap<String, Tensor>) -> Result<(f64, Tensor, Vec<(String, Tensor)>)>,
{
    let (outs, mut values) = session.run_with(
        &[(input, x.clone())],
        &RunOptions {
            capture: needed.to_vec(),
            ..Default::default()
        },
    )?;
    let (loss, d, mut seeds) = objective(&outs[0].1, &values)?;
    seeds.push((outs[0].0.clone(), d));
    values.insert(input.to_string(), x.clone());
    values.extend(outs);
    let grads = grad::backward(session.model(), &values, &seeds, params)?;
    Ok((loss, grads))
}

/// First-order Taylor importance of every trainable weight element: |w x dL/dw| of the
/// cross-entropy, summed over `data` in batches of `batch` (Molchanov et al., 2019). What
/// `smelt_prune::Criterion::Taylor` ranks by.
pub fn taylor_scores(
    model: Model,
    data: &Samples,
    batch: usize,
    temperature: f32,
) -> Result<HashMap<String, Vec<f32>>> {
    if data.y.is_empty() || data.x.shape().first() != Some(&data.y.len()) {
        bail!(
            Input,
            "the taylor criterion needs labelled samples; the data is empty or unlabelled"
        );
    }
    let model = prepare(model)?;
    let input = input_name(&model)?;
    let params = trainable(&model);
    let needed = grad::needed_values(&model, &params)?;
    let session = Session::unfolded(model)?;
    let mut scores: HashMap<String, Vec<f32>> = HashMap::new();
    let idx: Vec<usize> = (0..data.y.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let x = rows(data.x, chunk)?;
        let y: Vec<i64> = chunk.iter().map(|&i| data.y[i]).collect();
        let (_, grads) = batch_gradients(&session, &input, &x, &params, &needed, |logits, _| {
            let (l, d) = loss::cross_entropy_scaled(logits, &y, temperature)?;
            Ok((l, d, Vec::new()))
        })?;
        for (name, g) in grads {
            let w = session.model().graph.initializers[&name].as_slice::<f32>()?;
            let acc = scores.entry(name).or_insert_with(|| vec![0.0; w.len()]);
            for ((a, &w), &g) in acc.iter_mut().zip(w).zip(g.as_slice::<f32>()?) {
                *a += (w * g).abs();
            }
        }
    }
    Ok(scores)
}

/// Quantizes `model` statically, calibrated on `q.calib` training samples drawn with the
/// run's seed, and returns its training form.
fn fake_quantize(
    model: Model,
    q: &Qat,
    train: &Samples,
    input: &str,
    opts: &Options,
) -> Result<(Model, smelt_quant::qat::TrainingForm)> {
    if q.quant.mode != smelt_quant::Mode::Static {
        bail!(
            Unsupported,
            "quantization-aware training needs static quantization"
        );
    }
    let n = train.y.len();
    let pick = shuffle(n, opts.seed ^ 0x9e37_79b9_7f4a_7c15);
    let calib: Vec<smelt_engine::Feed> = pick[..q.calib.clamp(1, n)]
        .chunks(opts.batch.max(1))
        .map(|idx| Ok(vec![(input.to_string(), rows(train.x, idx)?)]))
        .collect::<Result<_>>()?;
    let quant = smelt_quant::Options {
        compact: false,
        ..q.quant.clone()
    };
    let (m, _) = smelt_quant::quantize(model, &quant, &calib, |_, _, _| {})?;
    smelt_quant::qat::to_training(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let a = shuffle(100, 3);
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(a, shuffle(100, 3));
        assert_ne!(a, shuffle(100, 4));
    }
}
