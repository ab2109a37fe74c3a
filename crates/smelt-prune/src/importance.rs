//! Importance criteria: how much each weight (or, summed over its slices, each channel)
//! matters. Scores are kept in the result so reports and interpretability reuse them.

use crate::targets::WeightTarget;
use smelt_engine::{for_each_run, Feed};
use smelt_ir::Model;
use smelt_tensor::{bail, Result};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Criterion {
    /// |w| (single weights); for channels the L1 norm of their slices.
    L1,
    /// w^2; for channels the L2 norm of their slices.
    L2,
    /// |w| x the L2 norm of the input feature it multiplies, over calibration data (Wanda).
    Wanda,
    /// Seeded uniform scores: the baseline every criterion must beat.
    Random { seed: u64 },
    /// First-order Taylor |w x dL/dw| summed over labelled batches (Molchanov et al.): the
    /// loss change removing the weight would cause, to first order. The caller computes the
    /// scores (they need a loss and labels: `smelt_train::taylor_scores`) and passes them in
    /// `Options::gradient_scores`.
    Taylor,
}

impl Criterion {
    pub fn parse(s: &str, seed: u64) -> Result<Criterion> {
        Ok(match s {
            "magnitude" | "l1" => Criterion::L1,
            "l2" => Criterion::L2,
            "wanda" => Criterion::Wanda,
            "random" => Criterion::Random { seed },
            "taylor" => Criterion::Taylor,
            _ => bail!(
                Input,
                "unknown criterion '{s}' (expected magnitude, l1, l2, wanda, random or taylor)"
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Criterion::L1 => "l1",
            Criterion::L2 => "l2",
            Criterion::Wanda => "wanda",
            Criterion::Random { .. } => "random",
            Criterion::Taylor => "taylor",
        }
    }

    pub fn needs_data(self) -> bool {
        self == Criterion::Wanda
    }
}

/// Per-element scores computed outside this crate (Taylor), by weight name.
pub type Scores = HashMap<String, Vec<f32>>;

/// The given scores of `weight`, which must cover its `len` elements.
pub fn given_scores<'a>(given: Option<&'a Scores>, weight: &str, len: usize) -> Result<&'a [f32]> {
    let Some(g) = given else {
        bail!(
            Input,
            "the taylor criterion needs gradient scores (labelled --calib data)"
        );
    };
    match g.get(weight) {
        Some(v) if v.len() == len => Ok(v),
        Some(v) => bail!(
            Shape,
            "gradient scores of '{weight}' have {} elements, the weight {len}",
            v.len()
        ),
        None => bail!(
            Input,
            "no gradient scores for '{weight}' (is it trainable?)"
        ),
    }
}

/// A reproducible uniform number in [0, 1) for element `i` of the tensor named `name`.
pub fn random_score(seed: u64, name: &str, i: usize) -> f32 {
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let mut z = h.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    // splitmix64 finaliser
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// One score per element of the weight `w` of `t`. `norms` are the input-feature norms
/// (needed by Wanda).
pub fn element_scores(
    c: Criterion,
    t: &WeightTarget,
    w: &[f32],
    norms: Option<&[f32]>,
    given: Option<&Scores>,
) -> Result<Vec<f32>> {
    Ok(match c {
        Criterion::Taylor => given_scores(given, &t.weight, w.len())?.to_vec(),
        Criterion::L1 => w.iter().map(|x| x.abs()).collect(),
        Criterion::L2 => w.iter().map(|x| x * x).collect(),
        Criterion::Random { seed } => (0..w.len())
            .map(|i| random_score(seed, &t.weight, i))
            .collect(),
        Criterion::Wanda => {
            let Some(norms) = norms else {
                bail!(
                    Input,
                    "the wanda criterion needs calibration data (--calib)"
                );
            };
            w.iter()
                .enumerate()
                .map(|(i, x)| {
                    let k = t.input_channel(i);
                    x.abs() * norms.get(k).copied().unwrap_or(0.0)
                })
                .collect()
        }
    })
}

/// Per-feature L2 norms of every target's input over the calibration feeds: features on axis
/// 1 for Conv inputs (NCHW), on the last axis for Gemm/MatMul.
pub fn input_norms(
    model: &Model,
    targets: &[WeightTarget],
    feeds: &[Feed],
) -> Result<HashMap<String, Vec<f32>>> {
    // Conv features are on axis 1 (NCHW); Gemm/MatMul features on the last axis.
    let axes: HashMap<String, usize> = targets
        .iter()
        .map(|t| (t.input.clone(), if t.op == "Conv" { 1 } else { usize::MAX }))
        .collect();
    axis_norms(model, &axes, feeds)
}

/// L2 norm of every index along `axes[value]` of each value (`usize::MAX`: the last axis),
/// over all calibration feeds.
pub fn axis_norms(
    model: &Model,
    axes: &HashMap<String, usize>,
    feeds: &[Feed],
) -> Result<HashMap<String, Vec<f32>>> {
    if feeds.is_empty() {
        bail!(
            Input,
            "activation-aware pruning needs calibration data: the set is empty"
        );
    }
    let mut values: Vec<String> = axes.keys().cloned().collect();
    values.sort();
    let mut sums: HashMap<String, Vec<f64>> = HashMap::new();
    for_each_run(model, &values, feeds, |_, cap| {
        for name in &values {
            let Some(x) = cap.get(name) else { continue };
            let shape = x.shape();
            if shape.is_empty() {
                continue;
            }
            let axis = axes[name].min(shape.len() - 1);
            let (n, inner) = (shape[axis], shape[axis + 1..].iter().product::<usize>());
            let s = sums.entry(name.clone()).or_insert_with(|| vec![0.0; n]);
            if s.len() != n {
                bail!(
                    Input,
                    "value '{name}' changed its size along axis {axis} between batches"
                );
            }
            for (i, v) in x.to_f32_vec()?.iter().enumerate() {
                s[(i / inner) % n] += (*v as f64) * (*v as f64);
            }
        }
        Ok(())
    })?;
    Ok(sums
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().map(|s| s.sqrt() as f32).collect()))
        .collect())
}
