//! Accuracy against labels, and fidelity of one model's outputs against another's.

use smelt_tensor::{bail, Result, Tensor};

/// Index of the largest value in each row of `[N, C]` logits (first one on ties; NaN never wins).
pub fn top1(logits: &Tensor) -> Result<Vec<usize>> {
    if logits.rank() != 2 {
        bail!(
            Shape,
            "top1 needs [N, C] logits, got shape {:?}",
            logits.shape()
        );
    }
    let c = logits.shape()[1];
    if c == 0 {
        bail!(
            Shape,
            "top1 needs at least one class, got shape {:?}",
            logits.shape()
        );
    }
    let v = logits.to_f64_vec()?;
    Ok(v.chunks_exact(c).map(argmax).collect())
}

fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    let mut best_v = f64::NEG_INFINITY;
    let mut seen = false;
    for (i, &x) in row.iter().enumerate() {
        if !x.is_nan() && (!seen || x > best_v) {
            best = i;
            best_v = x;
            seen = true;
        }
    }
    best
}

/// Refuses labels that no class of a `classes`-way output can match: an accuracy counted
/// against them would be silently wrong. `first` is the index of `labels[0]` in the dataset.
pub fn check_labels(labels: &[i64], classes: usize, first: usize) -> Result<()> {
    if let Some((i, &y)) = labels
        .iter()
        .enumerate()
        .find(|(_, &y)| y < 0 || y as u64 >= classes as u64)
    {
        bail!(
            Input,
            "label {y} of sample {} is outside the model's {classes} classes",
            first + i
        );
    }
    Ok(())
}

/// Fraction of predictions equal to their label, over the common length (0 when empty).
pub fn accuracy(pred: &[usize], labels: &[i64]) -> f64 {
    let n = pred.len().min(labels.len());
    if n == 0 {
        return 0.0;
    }
    let hits = pred
        .iter()
        .zip(labels)
        .filter(|(&p, &l)| i64::try_from(p).is_ok_and(|p| p == l))
        .count();
    hits as f64 / n as f64
}

/// How closely outputs `b` follow reference outputs `a`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fidelity {
    /// Top-1 agreement along the last axis; `None` unless every output compared was `[N, C]`.
    pub agreement: Option<f64>,
    /// Mean over rows of the cosine similarity (rows are the first axis, flattened).
    pub cosine: f64,
    /// Largest absolute element difference (NaN if any difference was NaN).
    pub max_abs_diff: f64,
}

/// Accumulates [`Fidelity`] batch by batch, so callers need not keep every output.
#[derive(Clone, Debug, Default)]
pub struct FidelityAccumulator {
    rows: usize,
    cos_sum: f64,
    agree_rows: usize,
    agree_hits: usize,
    all_rank2: bool,
    max_abs_diff: f64,
    nan_diff: bool,
    batches: usize,
}

impl FidelityAccumulator {
    pub fn new() -> Self {
        FidelityAccumulator {
            all_rank2: true,
            ..Default::default()
        }
    }

    /// Adds one pair of outputs of the same shape: reference `a`, candidate `b`.
    pub fn add(&mut self, a: &Tensor, b: &Tensor) -> Result<()> {
        if a.shape() != b.shape() {
            bail!(
                Shape,
                "fidelity: output shapes differ: {:?} vs {:?}",
                a.shape(),
                b.shape()
            );
        }
        let av = a.to_f64_vec()?;
        let bv = b.to_f64_vec()?;
        // A scalar or vector output is one row; otherwise rows are the first axis.
        let (rows, width) = if a.rank() <= 1 {
            (1, av.len())
        } else {
            (a.shape()[0], a.shape()[1..].iter().product())
        };
        if width > 0 {
            for (ra, rb) in av.chunks_exact(width).zip(bv.chunks_exact(width)) {
                self.cos_sum += cosine(ra, rb);
                if a.rank() == 2 {
                    self.agree_hits += usize::from(argmax(ra) == argmax(rb));
                }
            }
            self.rows += rows;
        }
        if a.rank() == 2 {
            self.agree_rows += rows;
        } else {
            self.all_rank2 = false;
        }
        for (x, y) in av.iter().zip(&bv) {
            let d = (x - y).abs();
            if d.is_nan() {
                // Equal infinities are not a difference; anything else NaN is.
                if x != y {
                    self.nan_diff = true;
                }
            } else if d > self.max_abs_diff {
                self.max_abs_diff = d;
            }
        }
        self.batches += 1;
        Ok(())
    }

    pub fn finish(&self) -> Result<Fidelity> {
        if self.batches == 0 || self.rows == 0 {
            bail!(Input, "fidelity: no outputs to compare");
        }
        Ok(Fidelity {
            agreement: (self.all_rank2 && self.agree_rows > 0)
                .then(|| self.agree_hits as f64 / self.agree_rows as f64),
            cosine: self.cos_sum / self.rows as f64,
            max_abs_diff: if self.nan_diff {
                f64::NAN
            } else {
                self.max_abs_diff
            },
        })
    }
}

/// Cosine similarity; two zero rows are identical (1), one zero row shares nothing (0).
fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    match (na == 0.0, nb == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        // sqrt of the product keeps identical rows at exactly 1.
        _ => (dot / (na * nb).sqrt()).clamp(-1.0, 1.0),
    }
}

/// Compares batches of outputs pairwise (`a[i]` against `b[i]`).
pub fn fidelity(a: &[Tensor], b: &[Tensor]) -> Result<Fidelity> {
    if a.len() != b.len() {
        bail!(
            Input,
            "fidelity: {} reference batches but {} candidate batches",
            a.len(),
            b.len()
        );
    }
    let mut acc = FidelityAccumulator::new();
    for (x, y) in a.iter().zip(b) {
        acc.add(x, y)?;
    }
    acc.finish()
}

/// [batch, tokens, width] -> [batch, width], averaging the tokens the mask keeps (all when
/// there is no mask): how sentence-embedding models like MiniLM are read.
pub fn mean_pool(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let &[b, s, h] = x.shape() else {
        bail!(
            Shape,
            "mean pooling needs a [batch, tokens, width] output, got {:?}",
            x.shape()
        );
    };
    let v = x.to_f32_vec()?;
    let m = match mask {
        Some(m) if m.shape() == [b, s] => m.to_f64_vec()?,
        Some(m) => bail!(
            Shape,
            "attention mask {:?} does not fit output {:?}",
            m.shape(),
            x.shape()
        ),
        None => vec![1.0; b * s],
    };
    let mut out = vec![0.0f32; b * h];
    for i in 0..b {
        let w: f64 = m[i * s..(i + 1) * s].iter().sum();
        for t in 0..s {
            let k = m[i * s + t];
            if k == 0.0 {
                continue;
            }
            for j in 0..h {
                out[i * h + j] += (k * v[(i * s + t) * h + j] as f64 / w.max(1e-12)) as f32;
            }
        }
    }
    Tensor::from_vec(vec![b, h], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    #[test]
    fn mean_pool_skips_masked_tokens() {
        // Two sentences of 3 tokens, width 2; the second has one padding token.
        let x = t(
            &[2, 3, 2],
            &[
                1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 1.0, 3.0, 5.0, 100.0, -100.0,
            ],
        );
        let mask = Tensor::from_vec(vec![2, 3], vec![1i64, 1, 1, 1, 1, 0]).unwrap();
        let p = mean_pool(&x, Some(&mask)).unwrap();
        assert_eq!(p.shape(), &[2, 2]);
        assert_eq!(p.to_f32_vec().unwrap(), vec![3.0, 4.0, 2.0, 3.0]);
        let all = mean_pool(&x, None).unwrap().to_f32_vec().unwrap();
        assert!((all[2] - 104.0 / 3.0).abs() < 1e-4);
        assert!(mean_pool(&t(&[2, 2], &[0.0; 4]), None).is_err());
        assert!(mean_pool(&x, Some(&t(&[2, 2], &[1.0; 4]))).is_err());
    }

    #[test]
    fn top1_and_accuracy() {
        let l = t(
            &[3, 3],
            &[0.1, 0.7, 0.2, 5.0, 5.0, -1.0, f32::NAN, -3.0, -2.0],
        );
        assert_eq!(top1(&l).unwrap(), vec![1, 0, 2]);
        assert!((accuracy(&[1, 0, 2], &[1, 1, 2]) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(accuracy(&[], &[]), 0.0);
        assert!(top1(&t(&[3], &[1.0, 2.0, 3.0])).is_err());
        assert!(top1(&t(&[2, 0], &[])).is_err());
        let ints = Tensor::from_vec(vec![1, 3], vec![3i64, 9, 1]).unwrap();
        assert_eq!(top1(&ints).unwrap(), vec![1]);
    }

    #[test]
    fn fidelity_numbers() {
        // Batch 1: row 0 identical; row 1 is [1,0] vs [0,1] (cosine 0, argmax differs).
        let a1 = t(&[2, 2], &[1.0, 2.0, 1.0, 0.0]);
        let b1 = t(&[2, 2], &[1.0, 2.0, 0.0, 1.0]);
        // Batch 2: [3,4] vs [4,3]: cosine 24/25, argmax 1 vs 0; max diff 1.
        let a2 = t(&[1, 2], &[3.0, 4.0]);
        let b2 = t(&[1, 2], &[4.0, 3.0]);
        let f = fidelity(&[a1.clone(), a2.clone()], &[b1.clone(), b2.clone()]).unwrap();
        assert!((f.cosine - (1.0 + 0.0 + 0.96) / 3.0).abs() < 1e-12, "{f:?}");
        assert!((f.agreement.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(f.max_abs_diff, 1.0);

        let same = fidelity(std::slice::from_ref(&a1), std::slice::from_ref(&a1)).unwrap();
        assert_eq!(
            same,
            Fidelity {
                agreement: Some(1.0),
                cosine: 1.0,
                max_abs_diff: 0.0
            }
        );

        // Rank-3 outputs: no agreement; rows are flattened [2, 2] blocks.
        let a3 = t(&[1, 2, 2], &[1.0, 0.0, 0.0, 0.0]);
        let b3 = t(&[1, 2, 2], &[0.0, 0.0, 0.0, 2.0]);
        let f = fidelity(&[a3], &[b3]).unwrap();
        assert_eq!(f.agreement, None);
        assert_eq!(f.cosine, 0.0);
        assert_eq!(f.max_abs_diff, 2.0);

        let nan = t(&[1, 2], &[f32::NAN, 0.0]);
        assert!(fidelity(std::slice::from_ref(&a2), &[nan])
            .unwrap()
            .max_abs_diff
            .is_nan());
        assert!(fidelity(&[a1], &[b2]).is_err());
        assert!(fidelity(&[a2], &[]).is_err());
        assert!(fidelity(&[], &[]).is_err());
    }
}
