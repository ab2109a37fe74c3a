//! Interpretability, checked: which channels of each layer matter, by the pruning criterion's
//! scores, and whether that ranking is true. For every channel group the k most important,
//! k random and k least important channels are removed (the same physical removal channel
//! pruning does) and the accuracy measured: a ranking that is right loses least when the least
//! important go and most when the most important go. One that does no better than random is
//! flagged.

use crate::measure::accuracy;
use serde::Serialize;
use smelt_engine::analysis::{infer_shapes, InputSpec};
use smelt_engine::Session;
use smelt_ir::Model;
use smelt_prune::importance::{random_score, Scores};
use smelt_prune::structured::{channel_scores, find_groups, remove_channels};
use smelt_prune::Criterion;
use smelt_tensor::Result;
use smelt_train::Samples;

#[derive(Clone, Debug, Serialize)]
pub struct Curve {
    /// "most important first", "random" or "least important first".
    pub order: &'static str,
    /// (channels removed, accuracy).
    pub points: Vec<(usize, f64)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerAblation {
    pub layer: String,
    pub channels: usize,
    pub criterion: String,
    /// Channel indices, most important first, with their scores.
    pub ranking: Vec<(usize, f32)>,
    pub curves: Vec<Curve>,
    /// The ranking beats random at both ends (mean accuracy over the removal sizes).
    pub better_than_random: bool,
}

/// Ablation curves for every channel group of at least `min_channels`, removing the
/// `fractions` of its channels in each order.
pub fn ablate(
    model: &Model,
    criterion: Criterion,
    gradient_scores: Option<&Scores>,
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
        let scores = channel_scores(&model.graph, grp, criterion, gradient_scores)?;
        let mut most: Vec<usize> = (0..grp.channels).collect();
        most.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let least: Vec<usize> = most.iter().rev().copied().collect();
        let mut random: Vec<usize> = (0..grp.channels).collect();
        random.sort_by(|&a, &b| {
            random_score(seed, &grp.root, a).total_cmp(&random_score(seed, &grp.root, b))
        });
        let mut curves = Vec::new();
        for (order, idx) in [
            ("most important first", &most),
            ("random", &random),
            ("least important first", &least),
        ] {
            let mut points = vec![(0, base)];
            for &f in fractions {
                let k = ((f * grp.channels as f64).round() as usize).clamp(1, grp.channels - 1);
                let mut cut: Vec<usize> = idx[..k].to_vec();
                cut.sort_unstable();
                let mut m = model.clone();
                remove_channels(&mut m, &[(grp, cut)])?;
                points.push((k, accuracy(&m, val)?));
            }
            curves.push(Curve { order, points });
        }
        let mean = |c: &Curve| {
            c.points[1..].iter().map(|p| p.1).sum::<f64>() / (c.points.len() - 1).max(1) as f64
        };
        let (m, r, l) = (mean(&curves[0]), mean(&curves[1]), mean(&curves[2]));
        out.push(LayerAblation {
            layer: grp.root.clone(),
            channels: grp.channels,
            criterion: criterion.name().into(),
            ranking: most.iter().map(|&c| (c, scores[c])).collect(),
            curves,
            better_than_random: m < r && l > r,
        });
    }
    Ok(out)
}
