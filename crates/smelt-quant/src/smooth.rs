//! SmoothQuant (Xiao et al. 2023): transformer activations have a few channels with
//! outliers 10-100x larger than the rest, which per-tensor activation scales cannot resolve.
//! For X·W, dividing channel j of X by s_j and multiplying row j of W by s_j changes
//! nothing in float but moves the difficulty from activations to weights (which have
//! per-channel scales). s_j = max|X_j|^alpha / max|W_j|^(1-alpha).
//!
//! The division is an explicit Mul in front of the MatMuls that read X (X itself often also
//! feeds a residual Add that must stay unscaled).

use crate::calibrate::{for_each_run, Feed};
use crate::params::Affine;
use crate::scheme::{QType, WeightScheme};
use crate::weights::{quantize_weight, Axes};
use smelt_engine::kernels::gemm::sgemm;
use smelt_ir::{Graph, Model, Node, PassRecord};
use smelt_tensor::{bail, DType, Result, Tensor};

/// Activations read as the left operand by MatMuls with a constant [K, N] right operand.
fn groups(g: &Graph) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if n.op_type != "MatMul" || !n.domain.is_empty() {
            continue;
        }
        let (a, b) = (&n.inputs[0], &n.inputs[1]);
        let Some(w) = g.initializers.get(b) else {
            continue;
        };
        if w.rank() != 2 || w.dtype() != DType::F32 || g.initializers.contains_key(a) {
            continue;
        }
        match out.iter_mut().find(|(v, _)| v == a) {
            Some((_, v)) => v.push(i),
            None => out.push((a.clone(), vec![i])),
        }
    }
    out
}

/// Rows of each activation kept for the strength search (spread over the feeds).
const SAMPLE_ROWS: usize = 512;

/// Per-channel (last axis) statistics of one activation over the calibration feeds.
struct Stats {
    min: Vec<f32>,
    max: Vec<f32>,
    /// Up to SAMPLE_ROWS rows, row-major [rows, channels].
    sample: Vec<f32>,
}

impl Stats {
    fn absmax(&self) -> Vec<f32> {
        self.min
            .iter()
            .zip(&self.max)
            .map(|(a, b)| a.abs().max(b.abs()))
            .collect()
    }
}

fn channel_stats(model: &Model, values: &[String], feeds: &[Feed]) -> Result<Vec<Stats>> {
    let mut out: Vec<Stats> = values
        .iter()
        .map(|_| Stats {
            min: vec![],
            max: vec![],
            sample: vec![],
        })
        .collect();
    let per_feed = SAMPLE_ROWS.div_ceil(feeds.len().max(1));
    for_each_run(model, values, feeds, |_, cap| {
        for (k, v) in values.iter().enumerate() {
            let t = &cap[v];
            let c = (*t.shape().last().unwrap_or(&1)).max(1);
            let x = t.to_f32_vec()?;
            let st = &mut out[k];
            if st.min.len() != c {
                st.min = vec![f32::INFINITY; c];
                st.max = vec![f32::NEG_INFINITY; c];
            }
            for (i, &val) in x.iter().enumerate() {
                if !val.is_finite() {
                    bail!(
                        Input,
                        "activation '{v}' holds {val} on the calibration data"
                    );
                }
                let j = i % c;
                st.min[j] = st.min[j].min(val);
                st.max[j] = st.max[j].max(val);
            }
            let rows = x.len() / c;
            let step = (rows / per_feed.max(1)).max(1);
            for r in (0..rows).step_by(step).take(per_feed) {
                if st.sample.len() / c < SAMPLE_ROWS {
                    st.sample.extend_from_slice(&x[r * c..(r + 1) * c]);
                }
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// How strongly to smooth: one alpha for every layer, or a per-layer search over alphas that
/// minimises the quantized layer's output error on calibration rows (the same search as AWQ
/// when activations stay float).
#[derive(Clone, Debug)]
pub enum Strength {
    Fixed(f32),
    Search {
        /// Activation type and symmetry simulated during the search (None: weight-only).
        act: Option<(QType, bool)>,
        weights: WeightScheme,
    },
}

const ALPHAS: &[f32] = &[0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95];

fn factors(amax: &[f32], wmax: &[f32], alpha: f32) -> Vec<f32> {
    amax.iter()
        .zip(wmax)
        .map(|(&a, &w)| {
            if a > 0.0 && w > 0.0 {
                (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-5, 1e5)
            } else {
                1.0
            }
        })
        .collect()
}

/// Squared output error of the group's quantized MatMuls on the sample rows with factors `s`.
fn output_error(
    st: &Stats,
    ws: &[Tensor],
    s: &[f32],
    act: Option<(QType, bool)>,
    scheme: &WeightScheme,
    reference: &[Vec<f32>],
) -> Result<f64> {
    let k = s.len();
    let rows = st.sample.len() / k;
    let mut x: Vec<f32> = st
        .sample
        .iter()
        .enumerate()
        .map(|(i, v)| v / s[i % k])
        .collect();
    if let Some((qt, sym)) = act {
        let lo = st
            .min
            .iter()
            .zip(s)
            .map(|(m, f)| m / f)
            .fold(0.0f32, f32::min);
        let hi = st
            .max
            .iter()
            .zip(s)
            .map(|(m, f)| m / f)
            .fold(0.0f32, f32::max);
        let a = Affine::from_range(lo, hi, qt, sym);
        let r = if sym {
            qt.symmetric_range()
        } else {
            qt.range()
        };
        for v in x.iter_mut() {
            *v = a.fake(*v, r);
        }
    }
    let mut err = 0.0f64;
    for (w, y) in ws.iter().zip(reference) {
        let n = w.shape()[1];
        let scaled: Vec<f32> = w
            .to_f32_vec()?
            .iter()
            .enumerate()
            .map(|(i, v)| v * s[i / n])
            .collect();
        let t = Tensor::from_vec(vec![k, n], scaled)?;
        let axes = Axes {
            channel_axis: 1,
            reduce_axis: 0,
        };
        let q = quantize_weight(&t, scheme, axes)?
            .dequantized()?
            .to_f32_vec()?;
        let mut out = vec![0.0f32; rows * n];
        sgemm(rows, k, n, &x, false, &q, false, &mut out, 1.0, 0.0, None)?;
        err += out
            .iter()
            .zip(y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
    }
    Ok(err)
}

pub fn smooth(
    mut model: Model,
    strength: &Strength,
    feeds: &[Feed],
) -> Result<(Model, PassRecord)> {
    let mut rec = PassRecord::new("smooth");
    if let Strength::Fixed(alpha) = strength {
        if !(0.0..=1.0).contains(alpha) {
            bail!(Input, "smoothing strength must be in [0, 1], got {alpha}");
        }
    }
    if feeds.is_empty() {
        bail!(Input, "smoothing needs calibration data");
    }
    let gs = groups(&model.graph);
    let values: Vec<String> = gs.iter().map(|g| g.0.clone()).collect();
    let stats = channel_stats(&model, &values, feeds)?;
    let g = &mut model.graph;
    for ((v, users), st) in gs.iter().zip(&stats) {
        let amax = st.absmax();
        let k = amax.len();
        let weights: Vec<String> = users
            .iter()
            .map(|&u| g.nodes[u].inputs[1].clone())
            .collect();
        if weights.iter().any(|w| g.initializers[w].shape()[0] != k) {
            continue;
        }
        let mut wmax = vec![0.0f32; k];
        for w in &weights {
            let t = &g.initializers[w];
            let n = t.shape()[1];
            for (i, x) in t.to_f32_vec()?.iter().enumerate() {
                let m = &mut wmax[i / n.max(1)];
                *m = m.max(x.abs());
            }
        }
        let (s, chosen) = match strength {
            Strength::Fixed(alpha) => (factors(&amax, &wmax, *alpha), format!("alpha {alpha}")),
            Strength::Search {
                act,
                weights: scheme,
            } => {
                let ws: Vec<Tensor> = weights.iter().map(|w| g.initializers[w].clone()).collect();
                let rows = st.sample.len() / k.max(1);
                let mut reference = Vec::new();
                for w in &ws {
                    let n = w.shape()[1];
                    let mut y = vec![0.0f32; rows * n];
                    sgemm(
                        rows,
                        k,
                        n,
                        &st.sample,
                        false,
                        &w.to_f32_vec()?,
                        false,
                        &mut y,
                        1.0,
                        0.0,
                        None,
                    )?;
                    reference.push(y);
                }
                let ones = vec![1.0f32; k];
                let mut best = (
                    output_error(st, &ws, &ones, *act, scheme, &reference)?,
                    ones,
                    "none".to_string(),
                );
                let base = best.0;
                for &alpha in ALPHAS {
                    let f = factors(&amax, &wmax, alpha);
                    let e = output_error(st, &ws, &f, *act, scheme, &reference)?;
                    if e < best.0 {
                        best = (e, f, format!("alpha {alpha}"));
                    }
                }
                let gain = if best.0 > 0.0 { base / best.0 } else { 1.0 };
                (
                    best.1,
                    format!("{} (output error {:.1}x lower)", best.2, gain),
                )
            }
        };
        if chosen.starts_with("none") {
            rec.note(format!(
                "'{v}': left unscaled (no alpha lowers the output error)"
            ));
            continue;
        }
        let spread = |x: &[f32]| {
            let (lo, hi) = x
                .iter()
                .fold((f32::MAX, 0.0f32), |(a, b), &v| (a.min(v), b.max(v)));
            hi / lo.max(f32::MIN_POSITIVE)
        };
        let scaled_amax: Vec<f32> = amax.iter().zip(&s).map(|(a, s)| a / s).collect();
        // Scale each weight's rows; a weight read elsewhere too gets a private copy.
        for (&u, w) in users.iter().zip(&weights) {
            let t = g.initializers[w].clone();
            let n = t.shape()[1];
            let data: Vec<f32> = t
                .to_f32_vec()?
                .iter()
                .enumerate()
                .map(|(i, x)| x * s[i / n])
                .collect();
            let name = g.unique_name(&format!("{w}_smoothed"));
            g.initializers
                .insert(name.clone(), Tensor::from_vec(t.shape().to_vec(), data)?);
            g.nodes[u].inputs[1] = name;
        }
        let inv = g.unique_name(&format!("{v}_smooth_scale"));
        g.initializers.insert(
            inv.clone(),
            Tensor::from_vec(vec![k], s.iter().map(|x| 1.0 / x).collect::<Vec<f32>>())?,
        );
        let out = g.unique_name(&format!("{v}_smoothed"));
        let mul = Node::new(
            "Mul",
            &g.unique_name(&format!("{v}_Smooth")),
            &[v, &inv],
            &[&out],
        );
        for &u in users {
            g.nodes[u].inputs[0] = out.clone();
        }
        // Appended (node indices in `gs` stay valid); the graph is re-sorted below.
        g.nodes.push(mul);
        rec.note(format!(
            "'{v}' ({} MatMuls, {chosen}): channel max spread {:.1}x -> {:.1}x",
            users.len(),
            spread(&amax),
            spread(&scaled_amax)
        ));
    }
    g.sort()?;
    g.remove_dead();
    Ok((model, rec))
}
