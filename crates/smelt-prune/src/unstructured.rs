//! Unstructured pruning (single weights, layer-wise or ranked globally) and semi-structured
//! N:M patterns. Both only zero weights: the graph keeps its shapes, the masks say what was cut.

use crate::mask::{Mask, Masks};
use crate::targets::WeightTarget;
use smelt_tensor::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Every layer loses the same fraction.
    Layer,
    /// One ranking over all layers: layers with many unimportant weights lose more.
    Global,
}

/// Cuts the `k` lowest-scored elements: ties broken by index, so results are reproducible.
fn keep_top(scores: &[f32], k: usize) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut keep = vec![true; scores.len()];
    for &i in idx.iter().take(k) {
        keep[i] = false;
    }
    keep
}

fn check_fraction(s: f64, what: &str) -> Result<()> {
    if !(0.0..1.0).contains(&s) {
        bail!(Input, "{what} {s} is outside [0, 1)");
    }
    Ok(())
}

/// Masks for `targets` given their element scores. `sparsity(t)` is the fraction to cut in
/// layer `t` (its override, else the default); with `Scope::Global` the layers without an
/// override share one ranking that cuts `global` of their weights in total.
pub fn masks(
    targets: &[WeightTarget],
    scores: &[Vec<f32>],
    scope: Scope,
    global: f64,
    overrides: &[Option<f64>],
) -> Result<Masks> {
    check_fraction(global, "sparsity")?;
    let mut out = Masks::default();
    let mut pooled: Vec<(f32, usize, usize)> = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        let s = overrides[ti].unwrap_or(global);
        check_fraction(s, &format!("sparsity of {}", t.layer))?;
        if scope == Scope::Global && overrides[ti].is_none() {
            pooled.extend(scores[ti].iter().enumerate().map(|(i, &v)| (v, ti, i)));
            continue;
        }
        let k = (s * t.numel() as f64).round() as usize;
        out.0.insert(
            t.weight.clone(),
            Mask {
                shape: t.shape.clone(),
                keep: keep_top(&scores[ti], k),
            },
        );
    }
    if !pooled.is_empty() {
        let k = (global * pooled.len() as f64).round() as usize;
        pooled.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        let mut keep: Vec<Option<Vec<bool>>> = vec![None; targets.len()];
        for &(_, ti, _) in &pooled {
            keep[ti].get_or_insert_with(|| vec![true; targets[ti].numel()]);
        }
        for &(_, ti, i) in pooled.iter().take(k) {
            keep[ti].as_mut().unwrap()[i] = false;
        }
        for (ti, k) in keep.into_iter().enumerate() {
            if let Some(k) = k {
                out.0.insert(
                    targets[ti].weight.clone(),
                    Mask {
                        shape: targets[ti].shape.clone(),
                        keep: k,
                    },
                );
            }
        }
    }
    Ok(out)
}

/// N:M masks: in every run of `m` consecutive weights along the input axis, the `m - n`
/// lowest-scored are cut. Returns the masks and, for layers whose input axis is not a multiple
/// of `m`, the reason they were left dense.
pub fn n_of_m(
    targets: &[WeightTarget],
    scores: &[Vec<f32>],
    n: usize,
    m: usize,
) -> Result<(Masks, Vec<(String, String)>)> {
    if m == 0 || n == 0 || n >= m {
        bail!(Input, "N:M pattern needs 0 < N < M, got {n}:{m}");
    }
    let mut out = Masks::default();
    let mut skipped = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        let len = t.shape[t.in_axis];
        if len % m != 0 {
            skipped.push((
                t.layer.clone(),
                format!("input axis has {len} features, not a multiple of {m}"),
            ));
            continue;
        }
        let stride: usize = t.shape[t.in_axis + 1..].iter().product();
        let outer = t.numel() / (len * stride);
        let mut keep = vec![true; t.numel()];
        let mut group: Vec<usize> = Vec::with_capacity(m);
        for o in 0..outer {
            for s in 0..stride {
                for g0 in (0..len).step_by(m) {
                    group.clear();
                    group.extend((g0..g0 + m).map(|i| (o * len + i) * stride + s));
                    let sc = &scores[ti];
                    group.sort_by(|&a, &b| sc[a].total_cmp(&sc[b]).then(a.cmp(&b)));
                    for &i in &group[..m - n] {
                        keep[i] = false;
                    }
                }
            }
        }
        out.0.insert(
            t.weight.clone(),
            Mask {
                shape: t.shape.clone(),
                keep,
            },
        );
    }
    Ok((out, skipped))
}

/// Gradual pruning (Zhu & Gupta, 2017): the sparsity at `step` rises from `initial` to `final_`
/// between `start` and `end` along a cubic, fast at first while the network can still adapt.
pub fn cubic_schedule(step: usize, start: usize, end: usize, initial: f64, final_: f64) -> f64 {
    if step <= start || end <= start {
        return if step >= end { final_ } else { initial };
    }
    if step >= end {
        return final_;
    }
    let t = (step - start) as f64 / (end - start) as f64;
    final_ + (initial - final_) * (1.0 - t).powi(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str, shape: &[usize], out_axis: usize, in_axis: usize) -> WeightTarget {
        WeightTarget {
            node: 0,
            layer: name.into(),
            op: "MatMul".into(),
            weight: name.into(),
            shape: shape.to_vec(),
            out_axis,
            in_axis,
            input: "x".into(),
            groups: 1,
        }
    }

    #[test]
    fn layer_and_global_cut_exact_counts() {
        let ts = vec![target("a", &[2, 2], 1, 0), target("b", &[2, 3], 1, 0)];
        let scores = vec![
            vec![4.0, 3.0, 2.0, 1.0],
            vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0],
        ];
        let m = masks(&ts, &scores, Scope::Layer, 0.5, &[None, None]).unwrap();
        assert_eq!(m.0["a"].keep, vec![true, true, false, false]);
        assert_eq!(m.0["b"].keep, vec![false, false, false, true, true, true]);
        // Globally, the 5 lowest of 10 are all of 'a' and the lowest of 'b'.
        let m = masks(&ts, &scores, Scope::Global, 0.5, &[None, None]).unwrap();
        assert_eq!(m.0["a"].keep, vec![false; 4]);
        assert_eq!(m.0["b"].keep, vec![false, true, true, true, true, true]);
        // An override takes its layer out of the global ranking.
        let m = masks(&ts, &scores, Scope::Global, 0.5, &[Some(0.25), None]).unwrap();
        assert_eq!(m.0["a"].keep, vec![true, true, true, false]);
        assert_eq!(m.0["b"].keep, vec![false, false, false, true, true, true]);
        assert!(masks(&ts, &scores, Scope::Layer, 1.0, &[None, None]).is_err());
    }

    #[test]
    fn two_of_four_along_the_input_axis() {
        // [K=4, N=2]: groups run down each column.
        let ts = vec![target("w", &[4, 2], 1, 0)];
        let scores = vec![vec![1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0]];
        let (m, skipped) = n_of_m(&ts, &scores, 2, 4).unwrap();
        assert!(skipped.is_empty());
        // column 0 scores 1,2,3,4 keeps rows 2,3; column 1 scores 8,7,6,5 keeps rows 0,1.
        assert_eq!(
            m.0["w"].keep,
            vec![false, true, false, true, true, false, true, false]
        );
        let (_, skipped) = n_of_m(&[target("v", &[3, 2], 1, 0)], &[vec![0.0; 6]], 2, 4).unwrap();
        assert_eq!(skipped.len(), 1);
    }

    #[test]
    fn cubic_schedule_ends_at_target() {
        assert_eq!(cubic_schedule(0, 0, 10, 0.0, 0.8), 0.0);
        assert!((cubic_schedule(10, 0, 10, 0.0, 0.8) - 0.8).abs() < 1e-12);
        let mid = cubic_schedule(5, 0, 10, 0.0, 0.8);
        assert!(mid > 0.4 && mid < 0.8, "{mid}"); // front-loaded
    }
}
