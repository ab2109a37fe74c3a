//! Interpretability, checked: which channels of each layer matter, by the pruning criterion's
//! scores, and whether that ranking is true. For every channel group the k most important,
//! k random and k least important channels are removed (the same physical removal channel
//! pruning does) and the accuracy measured: a ranking that is right loses least when the least
//! important go and most when the most important go. One that does no better than random is
//! flagged. The random baseline is the mean of several draws: with a handful of channels one
//! draw can land anywhere between the two ends, and is no baseline at all.

use crate::measure::accuracy;
use serde::Serialize;
use smelt_engine::analysis::{infer_shapes, InputSpec};
use smelt_engine::Session;
use smelt_ir::Model;
use smelt_prune::importance::{random_score, Scores};
use smelt_prune::structured::{channel_scores, find_groups, remove_channels, Group};
use smelt_prune::Criterion;
use smelt_tensor::Result;
use smelt_train::Samples;

#[derive(Clone, Debug, Serialize)]
pub struct Curve {
    /// "most important first", "random" or "least important first".
    pub order: &'static str,
    /// (channels removed, accuracy); for "random", the mean over the draws.
    pub points: Vec<(usize, f64)>,
    /// For "random": the lowest and highest accuracy of the draws at each point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread: Option<Vec<(f64, f64)>>,
}

impl LayerAblation {
    /// The `n` most and `n` least important channels, as "index (score)".
    pub fn ends(&self, n: usize) -> (Vec<String>, Vec<String>) {
        let show = |&(c, s): &(usize, f32)| format!("{c} ({s:.3})");
        (
            self.ranking.iter().take(n).map(show).collect(),
            self.least_first.iter().take(n).map(show).collect(),
        )
    }
}

/// Random removal orders averaged into the baseline.
pub const RANDOM_DRAWS: u64 = 10;

#[derive(Clone, Debug, Serialize)]
pub struct LayerAblation {
    pub layer: String,
    pub channels: usize,
    pub criterion: String,
    /// Channel indices, most important first, with their scores.
    pub ranking: Vec<(usize, f32)>,
    /// Channel indices in the order of the least-important-first curve, with their scores:
    /// the ranking reversed, except for greedy (which ranks each end by its own search).
    pub least_first: Vec<(usize, f32)>,
    pub curves: Vec<Curve>,
    /// The ranking beats random at both ends (mean accuracy over the removal sizes).
    pub better_than_random: bool,
}

/// How channels are ranked.
pub enum Ranking<'a> {
    /// By a pruning criterion's scores (Taylor's come from gradients, given here).
    Scores(Criterion, Option<&'a Scores>),
    /// Greedy, on training data, from both ends. One-shot scores miss redundancy: of two
    /// channels that detect the same thing neither matters alone, yet removing both does. So
    /// the most important are found by removing, round by round, the channel that raises the
    /// loss most on top of those already gone, and the least important by removing the one
    /// that raises it least (above 16 channels, a sixteenth of them per round). With
    /// redundant pairs the two orders are not each other's reverse.
    Greedy(Samples<'a>),
}

/// A group's channels in both removal orders, with the scores each order came from.
struct Ranked {
    most_first: Vec<(usize, f32)>,
    least_first: Vec<(usize, f32)>,
}

impl Ranking<'_> {
    pub fn name(&self) -> String {
        match self {
            Ranking::Scores(c, _) => c.name().into(),
            Ranking::Greedy(_) => "greedy".into(),
        }
    }

    fn rank(&self, model: &Model, grp: &Group) -> Result<Ranked> {
        match self {
            Ranking::Scores(c, given) => {
                let scores = channel_scores(&model.graph, grp, *c, *given)?;
                let mut most_first: Vec<usize> = (0..grp.channels).collect();
                most_first.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                let most_first: Vec<(usize, f32)> =
                    most_first.into_iter().map(|c| (c, scores[c])).collect();
                let least_first = most_first.iter().rev().copied().collect();
                Ok(Ranked {
                    most_first,
                    least_first,
                })
            }
            Ranking::Greedy(train) => Ok(Ranked {
                most_first: greedy(model, grp, train, true)?,
                least_first: greedy(model, grp, train, false)?,
            }),
        }
    }
}

/// The order greedy removal takes `grp`'s channels in (costliest first when `costliest`, else
/// cheapest first), each with the rise in training loss at its turn (the last channel, never
/// removed, gets 0).
fn greedy(
    model: &Model,
    grp: &Group,
    train: &Samples,
    costliest: bool,
) -> Result<Vec<(usize, f32)>> {
    let input = smelt_train::input_name(model)?;
    let mut rise = vec![0f32; grp.channels];
    let mut before = loss(&Session::new(model.clone())?, &input, train)?;
    let mut gone: Vec<usize> = Vec::new();
    let mut left: Vec<usize> = (0..grp.channels).collect();
    while left.len() > 1 {
        let step = (left.len() / 16).clamp(1, left.len() - 1);
        let mut trials = Vec::with_capacity(left.len());
        for &c in &left {
            // Each trial is a full evaluation: a large group takes long, so Ctrl-C stops here.
            smelt_tensor::interrupt::check()?;
            let mut cut = gone.clone();
            cut.push(c);
            cut.sort_unstable();
            let mut m = model.clone();
            remove_channels(&mut m, &[(grp, cut)])?;
            trials.push((loss(&Session::new(m)?, &input, train)?, c));
        }
        trials.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        if costliest {
            trials.reverse();
        }
        for &(l, c) in &trials[..step] {
            rise[c] = (l - before) as f32;
            gone.push(c);
            left.retain(|&x| x != c);
        }
        // With several removed in one round the loss after all of them is not measured; the
        // next round's comparison is among its own trials, so the last one's stands in.
        before = trials[step - 1].0;
    }
    gone.extend(left);
    Ok(gone.into_iter().map(|c| (c, rise[c])).collect())
}

/// Mean cross-entropy of `s` on `data` (finer than accuracy for telling channels apart).
fn loss(s: &Session, input: &str, data: &Samples) -> Result<f64> {
    let (n, batch) = (data.y.len(), 256);
    let mut total = 0.0;
    for start in (0..n).step_by(batch) {
        let idx: Vec<usize> = (start..(start + batch).min(n)).collect();
        let out = s.run(&[(input, smelt_train::rows(data.x, &idx)?)])?;
        let y = &data.y[start..start + idx.len()];
        total += smelt_train::loss::cross_entropy(&out[0].1, y)?.0 * idx.len() as f64;
    }
    Ok(total / n.max(1) as f64)
}

/// Ablation curves for every channel group of at least `min_channels`, removing the
/// `fractions` of its channels in each order.
pub fn ablate(
    model: &Model,
    ranking: &Ranking,
    val: &Samples,
    fractions: &[f64],
    min_channels: usize,
    seed: u64,
) -> Result<Vec<LayerAblation>> {
    // The folded form the scores are computed on (a Reshape of a weight becomes the weight).
    let model = &smelt_train::prepare(model.clone())?;
    let base = accuracy(model, val)?;
    let shapes = infer_shapes(&Session::reference(model.clone())?, &InputSpec::default())?;
    let (groups, _) = find_groups(model, &shapes);
    let mut out = Vec::new();
    for grp in groups.iter().filter(|g| g.channels >= min_channels) {
        let Ranked {
            most_first,
            least_first,
        } = ranking.rank(model, grp)?;
        let most: Vec<usize> = most_first.iter().map(|r| r.0).collect();
        let least: Vec<usize> = least_first.iter().map(|r| r.0).collect();
        let ks: Vec<usize> = fractions
            .iter()
            .map(|f| ((f * grp.channels as f64).round() as usize).clamp(1, grp.channels - 1))
            .collect();
        let removed = |order: &[usize]| -> Result<Vec<(usize, f64)>> {
            let mut points = vec![(0, base)];
            for &k in &ks {
                let mut cut: Vec<usize> = order[..k].to_vec();
                cut.sort_unstable();
                let mut m = model.clone();
                remove_channels(&mut m, &[(grp, cut)])?;
                points.push((k, accuracy(&m, val)?));
            }
            Ok(points)
        };
        let mut draws = Vec::new();
        for d in 0..RANDOM_DRAWS {
            let mut order: Vec<usize> = (0..grp.channels).collect();
            let s = seed.wrapping_add(d);
            order.sort_by(|&a, &b| {
                random_score(s, &grp.root, a).total_cmp(&random_score(s, &grp.root, b))
            });
            draws.push(removed(&order)?);
        }
        let random = Curve {
            order: "random",
            points: (0..=ks.len())
                .map(|i| {
                    let mean = draws.iter().map(|d| d[i].1).sum::<f64>() / draws.len() as f64;
                    (draws[0][i].0, mean)
                })
                .collect(),
            spread: Some(
                (0..=ks.len())
                    .map(|i| {
                        draws.iter().fold((f64::MAX, f64::MIN), |(lo, hi), d| {
                            (lo.min(d[i].1), hi.max(d[i].1))
                        })
                    })
                    .collect(),
            ),
        };
        let curves = vec![
            Curve {
                order: "most important first",
                points: removed(&most)?,
                spread: None,
            },
            random,
            Curve {
                order: "least important first",
                points: removed(&least)?,
                spread: None,
            },
        ];
        let mean = |c: &Curve| {
            c.points[1..].iter().map(|p| p.1).sum::<f64>() / (c.points.len() - 1).max(1) as f64
        };
        let (m, r, l) = (mean(&curves[0]), mean(&curves[1]), mean(&curves[2]));
        out.push(LayerAblation {
            layer: grp.root.clone(),
            channels: grp.channels,
            criterion: ranking.name(),
            ranking: most_first,
            least_first,
            curves,
            better_than_random: m < r && l > r,
        });
    }
    Ok(out)
}
