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
use smelt_ir::{Attr, Graph, Model, Node, PassRecord};
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

/// How strongly to smooth: not at all (outlier channels only), one alpha for every layer, or
/// a per-layer search over alphas that minimises the quantized layer's output error on
/// calibration rows (the same search as AWQ when activations stay float).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Strength {
    Off,
    Fixed(f32),
    Search,
}

/// Outlier channels, split as in outlier channel splitting (Zhao et al. 2019): a few input
/// channels whose range dwarfs the rest (MiniLM's first FFN input holds one at 24.6 where the
/// next is 6.2) are each divided into m equal copies that fit the other channels' range, and
/// the weight row is repeated m times. The product is unchanged, the per-tensor grid is
/// set by the ordinary channels, and the layer stays one int8 MatMul a few rows deeper.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outliers {
    #[default]
    Off,
    /// Per activation, the fewest of 0, 1, 2, 4 ... 32 channels (at most 1/16 of them)
    /// whose output error is within [`AUTO_SLACK`] of the best of those counts.
    Auto,
    Count(usize),
}

impl Outliers {
    pub fn parse(s: &str) -> Result<Outliers> {
        Ok(match s {
            "auto" => Outliers::Auto,
            "off" | "0" => Outliers::Off,
            n => match n.parse::<usize>() {
                Ok(k) => Outliers::Count(k),
                Err(_) => bail!(
                    Input,
                    "--outliers takes 'auto', 'off' or a channel count, got '{s}'"
                ),
            },
        })
    }
}

/// Splitting more channels is worth it only where it lowers the output error by more than
/// this factor.
const AUTO_SLACK: f64 = 1.2;

/// At most this many copies of one channel (a channel 64x wider than the rest is split into
/// 64 and keeps the rest of its range as rounding error).
const MAX_COPIES: usize = 64;

/// What the pass does and what the search simulates.
#[derive(Clone, Copy, Debug)]
pub struct Smoothing {
    pub strength: Strength,
    pub outliers: Outliers,
    /// Activation type and symmetry of the quantized MatMul (None: activations stay float).
    pub act: Option<(QType, bool)>,
    pub weights: WeightScheme,
}

const ALPHAS: &[f32] = &[0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95];

/// Smoothing factors for `alpha` (None: all 1); split channels are not scaled.
fn factors(amax: &[f32], wmax: &[f32], alpha: Option<f32>, split: &[bool]) -> Vec<f32> {
    amax.iter()
        .zip(wmax)
        .zip(split)
        .map(|((&a, &w), &sp)| match alpha {
            Some(alpha) if !sp && a > 0.0 && w > 0.0 => {
                (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-5, 1e5)
            }
            _ => 1.0,
        })
        .collect()
}

/// The range of the channels not split (after dividing by `s`), and how many copies each
/// channel becomes so that its copies fit that range (1 for the others).
fn copies(st: &Stats, s: &[f32], split: &[bool]) -> (f32, f32, Vec<usize>) {
    let kept = || (0..s.len()).filter(|&j| !split[j]);
    let lo = kept().map(|j| st.min[j] / s[j]).fold(0.0f32, f32::min);
    let hi = kept().map(|j| st.max[j] / s[j]).fold(0.0f32, f32::max);
    let m = (0..s.len())
        .map(|j| {
            if !split[j] {
                return 1;
            }
            let need = |v: f32, bound: f32| if bound != 0.0 { v / bound } else { 0.0 };
            let r = need(st.max[j], hi).max(need(st.min[j], lo));
            (r.ceil() as usize).clamp(1, MAX_COPIES)
        })
        .collect();
    (lo, hi, m)
}

/// Squared output error of the group's quantized MatMuls on the sample rows, with factors `s`
/// and the channels in `split` split into copies.
fn output_error(
    st: &Stats,
    ws: &[Tensor],
    s: &[f32],
    split: &[bool],
    sm: &Smoothing,
    reference: &[Vec<f32>],
) -> Result<f64> {
    let k = s.len();
    let rows = st.sample.len() / k;
    let (lo, hi, m) = copies(st, s, split);
    let mut x: Vec<f32> = st
        .sample
        .iter()
        .enumerate()
        .map(|(i, v)| v / s[i % k])
        .collect();
    if let Some((qt, sym)) = sm.act {
        let a = Affine::from_range(lo, hi, qt, sym);
        let r = if sym {
            qt.symmetric_range()
        } else {
            qt.range()
        };
        // m copies of x/m, each rounded on the grid, sum to m * round(x/m).
        for (i, v) in x.iter_mut().enumerate() {
            let c = m[i % k] as f32;
            *v = c * a.fake(*v / c, r);
        }
    }
    let mut err = 0.0f64;
    for (w, y) in ws.iter().zip(reference) {
        let t = scaled_rows(w, s)?;
        let n = t.shape()[1];
        let axes = Axes {
            channel_axis: 1,
            reduce_axis: 0,
        };
        let q = quantize_weight(&t, &sm.weights, axes)?
            .dequantized()?
            .to_f32_vec()?;
        let mut o = vec![0.0f32; rows * n];
        sgemm(rows, k, n, &x, false, &q, false, &mut o, 1.0, 0.0, None)?;
        err += o
            .iter()
            .zip(y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
    }
    Ok(err)
}

/// Row j of a [K, N] weight times s_j.
fn scaled_rows(w: &Tensor, s: &[f32]) -> Result<Tensor> {
    let n = w.shape()[1].max(1);
    let data: Vec<f32> = w
        .to_f32_vec()?
        .iter()
        .enumerate()
        .map(|(i, x)| x * s[i / n])
        .collect();
    Tensor::from_vec(w.shape().to_vec(), data)
}

/// One group's choice: scaling factors, split channels, and a note.
struct Choice {
    s: Vec<f32>,
    split: Vec<bool>,
    note: String,
}

fn choose(
    st: &Stats,
    amax: &[f32],
    ws: &[Tensor],
    wmax: &[f32],
    ks: &[usize],
    sm: &Smoothing,
) -> Result<Choice> {
    let k = amax.len();
    let mut by_size: Vec<usize> = (0..k).collect();
    by_size.sort_by(|&a, &b| amax[b].total_cmp(&amax[a]).then(a.cmp(&b)));
    let split_of = |c: usize| {
        let mut sp = vec![false; k];
        for &j in &by_size[..c] {
            sp[j] = true;
        }
        sp
    };
    let alphas: Vec<Option<f32>> = match sm.strength {
        Strength::Off => vec![None],
        Strength::Fixed(a) => vec![Some(a)],
        Strength::Search => std::iter::once(None)
            .chain(ALPHAS.iter().map(|&a| Some(a)))
            .collect(),
    };
    let name = |a: Option<f32>| a.map_or("unscaled".to_string(), |a| format!("alpha {a}"));
    if alphas.len() * ks.len() == 1 {
        let split = split_of(ks[0]);
        return Ok(Choice {
            s: factors(amax, wmax, alphas[0], &split),
            split,
            note: name(alphas[0]),
        });
    }
    let rows = st.sample.len() / k.max(1);
    let mut reference = Vec::new();
    for w in ws {
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
    // The best alpha for each split count, then the fewest splits close to the best of all.
    let mut best: Vec<(f64, Option<f32>)> = Vec::new();
    let mut base = f64::NAN;
    for &c in ks {
        let split = split_of(c);
        let mut b = (f64::INFINITY, None);
        for &a in &alphas {
            let f = factors(amax, wmax, a, &split);
            let e = output_error(st, ws, &f, &split, sm, &reference)?;
            if c == 0 && a.is_none() {
                base = e;
            }
            if e < b.0 {
                b = (e, a);
            }
        }
        best.push(b);
    }
    let min = best.iter().map(|b| b.0).fold(f64::INFINITY, f64::min);
    let i = best
        .iter()
        .position(|b| b.0 <= min * AUTO_SLACK)
        .unwrap_or(0);
    let (e, a) = best[i];
    let gain = if e > 0.0 && base.is_finite() {
        format!(" (output error {:.1}x lower)", base / e)
    } else {
        String::new()
    };
    let split = split_of(ks[i]);
    Ok(Choice {
        s: factors(amax, wmax, a, &split),
        split,
        note: format!("{}{gain}", name(a)),
    })
}

/// Scales MatMul inputs and splits their outlier channels (see [`Strength`], [`Outliers`]).
pub fn smooth(mut model: Model, sm: &Smoothing, feeds: &[Feed]) -> Result<(Model, PassRecord)> {
    let mut rec = PassRecord::new("smooth");
    if let Strength::Fixed(alpha) = sm.strength {
        if !(0.0..=1.0).contains(&alpha) {
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
        let ws: Vec<Tensor> = weights.iter().map(|w| g.initializers[w].clone()).collect();
        if ws.iter().any(|t| t.shape()[0] != k) {
            continue;
        }
        let mut wmax = vec![0.0f32; k];
        for t in &ws {
            let n = t.shape()[1];
            for (i, x) in t.to_f32_vec()?.iter().enumerate() {
                let m = &mut wmax[i / n.max(1)];
                *m = m.max(x.abs());
            }
        }
        let ks: Vec<usize> = match (sm.outliers, sm.act) {
            (_, None) | (Outliers::Off, _) => vec![0],
            (Outliers::Count(c), _) => vec![c.min(k / 2)],
            (Outliers::Auto, _) => [0, 1, 2, 4, 8, 16, 32]
                .into_iter()
                .filter(|&c| c == 0 || c <= k / 16)
                .collect(),
        };
        let Choice { s, split, note } = choose(st, &amax, &ws, &wmax, &ks, sm)?;
        let (_, _, m) = copies(st, &s, &split);
        let extra: usize = m.iter().map(|c| c - 1).sum();
        if extra == 0 && s.iter().all(|&f| f == 1.0) {
            rec.note(format!("'{v}': left as is ({note})"));
            continue;
        }
        // Channel c of the new input reads channel src[c] of v times mult[c]; copies of split
        // channels go after the K originals.
        let mut src: Vec<usize> = (0..k).collect();
        let mut mult: Vec<f32> = (0..k).map(|j| 1.0 / (s[j] * m[j] as f32)).collect();
        for (j, &c) in m.iter().enumerate() {
            for _ in 1..c {
                src.push(j);
                mult.push(1.0 / c as f32);
            }
        }
        // Scale each weight's rows and repeat split rows; every user gets its own copy.
        for (&u, (w, t)) in users.iter().zip(weights.iter().zip(&ws)) {
            let n = t.shape()[1];
            let scaled = scaled_rows(t, &s)?.to_f32_vec()?;
            let data: Vec<f32> = src
                .iter()
                .flat_map(|&j| scaled[j * n..(j + 1) * n].iter().copied())
                .collect();
            let name = g.unique_name(&format!("{w}_smoothed"));
            g.initializers
                .insert(name.clone(), Tensor::from_vec(vec![src.len(), n], data)?);
            g.nodes[u].inputs[1] = name;
        }
        let mut x = v.clone();
        if extra > 0 {
            let idx = g.unique_name(&format!("{v}_split_channels"));
            let ids: Vec<i64> = src.iter().map(|&j| j as i64).collect();
            g.initializers
                .insert(idx.clone(), Tensor::from_vec(vec![ids.len()], ids)?);
            let out = g.unique_name(&format!("{v}_split"));
            let name = g.unique_name(&format!("{v}_Split"));
            g.nodes.push(
                Node::new("Gather", &name, &[v, &idx], &[&out]).with_attr("axis", Attr::Int(-1)),
            );
            x = out;
        }
        let inv = g.unique_name(&format!("{v}_smooth_scale"));
        g.initializers
            .insert(inv.clone(), Tensor::from_vec(vec![mult.len()], mult)?);
        let scaled = g.unique_name(&format!("{v}_smoothed"));
        let mul = Node::new(
            "Mul",
            &g.unique_name(&format!("{v}_Smooth")),
            &[&x, &inv],
            &[&scaled],
        );
        for &u in users {
            g.nodes[u].inputs[0] = scaled.clone();
        }
        // Appended (node indices in `gs` stay valid); the graph is re-sorted below.
        g.nodes.push(mul);
        let spread = |x: &[f32]| {
            let (lo, hi) = x
                .iter()
                .fold((f32::MAX, 0.0f32), |(a, b), &v| (a.min(v), b.max(v)));
            hi / lo.max(f32::MIN_POSITIVE)
        };
        let scaled_amax: Vec<f32> = (0..k).map(|j| amax[j] / (s[j] * m[j] as f32)).collect();
        let splits: Vec<String> = (0..k)
            .filter(|&j| split[j])
            .map(|j| format!("{j} ({:.1}) x{}", amax[j], m[j]))
            .collect();
        let split_note = if splits.is_empty() {
            String::new()
        } else {
            format!(
                "; split {} channel(s) into copies (+{extra} rows): {}",
                splits.len(),
                splits.join(", ")
            )
        };
        rec.note(format!(
            "'{v}' ({} MatMuls, {note}): channel max spread {:.1}x -> {:.1}x{split_note}",
            users.len(),
            spread(&amax),
            spread(&scaled_amax),
        ));
    }
    g.sort()?;
    g.remove_dead();
    Ok((model, rec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_engine::Session;
    use smelt_ir::{Dim, ValueInfo};

    /// x [rows, 8] -> MatMul by a [8, 4] weight, channel 3 of x about 40x wider than the rest.
    fn model_and_feeds() -> (Model, Vec<Feed>) {
        let w: Vec<f32> = (0..32)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.05)
            .collect();
        let mut g = Graph {
            inputs: vec![ValueInfo::new(
                "x",
                DType::F32,
                vec![Dim::Fixed(64), Dim::Fixed(8)],
            )],
            outputs: vec![ValueInfo::new("y", DType::F32, vec![])],
            nodes: vec![Node::new("MatMul", "mm", &["x", "w"], &["y"])],
            ..Default::default()
        };
        g.initializers
            .insert("w".into(), Tensor::from_vec(vec![8, 4], w).unwrap());
        let feeds = (0..4)
            .map(|f| {
                let x: Vec<f32> = (0..64 * 8)
                    .map(|i| {
                        let v = (((i * 37 + f * 11) % 101) as f32 / 50.0 - 1.0) * 0.8;
                        if i % 8 == 3 {
                            v * 40.0
                        } else {
                            v
                        }
                    })
                    .collect();
                vec![("x".to_string(), Tensor::from_vec(vec![64, 8], x).unwrap())]
            })
            .collect();
        (Model::new(g, 13), feeds)
    }

    fn outputs(m: &Model, feeds: &[Feed]) -> Vec<f32> {
        let s = Session::reference(m.clone()).unwrap();
        feeds
            .iter()
            .flat_map(|f| {
                let f: Vec<(&str, Tensor)> =
                    f.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                s.run(&f).unwrap()[0].1.to_f32_vec().unwrap()
            })
            .collect()
    }

    fn sq_err(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
    }

    /// The wide channel is split into copies that fit the others' range: the float function
    /// is unchanged, the weight gains the repeated rows, and the quantized model's error falls.
    #[test]
    fn an_outlier_channel_splits_into_copies_and_the_quantized_error_falls() {
        let (m, feeds) = model_and_feeds();
        let want = outputs(&m, &feeds);
        let sm = Smoothing {
            strength: Strength::Off,
            outliers: Outliers::Count(1),
            act: Some((QType::U8, false)),
            weights: WeightScheme::default(),
        };
        let (split, rec) = smooth(m.clone(), &sm, &feeds).unwrap();
        let gather = split
            .graph
            .nodes
            .iter()
            .find(|n| n.op_type == "Gather")
            .expect("a Gather splits the channel");
        let idx = split.graph.initializers[&gather.inputs[1]]
            .to_i64_vec()
            .unwrap();
        // 40x the others' range: 40 copies of channel 3 after the 8 originals.
        assert_eq!(&idx[..8], &[0, 1, 2, 3, 4, 5, 6, 7], "{:?}", rec.changes);
        assert!(idx[8..].iter().all(|&j| j == 3), "{idx:?}");
        assert!((35..=45).contains(&(idx.len() - 7)), "{idx:?}");
        let got = outputs(&split, &feeds);
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b}");
        }
        let err = |outliers| {
            let opts = crate::Options {
                outliers,
                ..Default::default()
            };
            let (q, _) = crate::quantize(m.clone(), &opts, &feeds, |_, _, _| {}).unwrap();
            sq_err(&outputs(&q, &feeds), &want)
        };
        let (plain, with_split) = (err(Outliers::Off), err(Outliers::Count(1)));
        assert!(
            with_split * 4.0 < plain,
            "split {with_split} vs plain {plain}"
        );
    }
}
