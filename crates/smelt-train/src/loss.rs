//! Losses on a batch of outputs: the value and its gradient with respect to the outputs.

use smelt_tensor::{bail, Result, Tensor};

/// Mean softmax cross-entropy of logits `[N, C]` against integer labels, and d loss / d logits.
pub fn cross_entropy(logits: &Tensor, labels: &[i64]) -> Result<(f64, Tensor)> {
    let (n, c) = rows(logits)?;
    if labels.len() != n {
        bail!(Shape, "{} labels for a batch of {n}", labels.len());
    }
    let z = logits.as_slice::<f32>()?;
    let mut grad = vec![0f32; n * c];
    let mut total = 0f64;
    for (i, &y) in labels.iter().enumerate() {
        if y < 0 || y as usize >= c {
            bail!(Input, "label {y} is outside the model's {c} classes");
        }
        let row = &z[i * c..(i + 1) * c];
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
        total += sum.ln() - (row[y as usize] - m) as f64;
        for (j, g) in grad[i * c..(i + 1) * c].iter_mut().enumerate() {
            let p = ((row[j] - m) as f64).exp() / sum;
            *g = ((p - f64::from(u8::from(j == y as usize))) / n as f64) as f32;
        }
    }
    Ok((total / n as f64, Tensor::from_vec(vec![n, c], grad)?))
}

/// Cross-entropy on `logits / t` (with its gradient with respect to the unscaled logits).
pub fn cross_entropy_scaled(logits: &Tensor, labels: &[i64], t: f32) -> Result<(f64, Tensor)> {
    if t == 1.0 {
        return cross_entropy(logits, labels);
    }
    let scaled: Vec<f32> = logits.as_slice::<f32>()?.iter().map(|v| v / t).collect();
    let (l, d) = cross_entropy(&Tensor::from_vec(logits.shape().to_vec(), scaled)?, labels)?;
    let d: Vec<f32> = d.as_slice::<f32>()?.iter().map(|v| v / t).collect();
    Ok((l, Tensor::from_vec(logits.shape().to_vec(), d)?))
}

/// Knowledge distillation (Hinton et al.): KL(teacher || student) on logits softened by
/// temperature `t`, scaled by t^2 so its gradient keeps the size of a hard-label loss.
pub fn distill(student: &Tensor, teacher: &Tensor, t: f32) -> Result<(f64, Tensor)> {
    let (n, c) = rows(student)?;
    if teacher.shape() != student.shape() {
        bail!(
            Shape,
            "teacher outputs {:?}, student {:?}",
            teacher.shape(),
            student.shape()
        );
    }
    let (s, q) = (student.as_slice::<f32>()?, teacher.as_slice::<f32>()?);
    let softmax = |row: &[f32]| -> Vec<f64> {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f64> = row.iter().map(|&v| (((v - m) / t) as f64).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.into_iter().map(|v| v / sum).collect()
    };
    let mut grad = vec![0f32; n * c];
    let mut total = 0f64;
    for i in 0..n {
        let ps = softmax(&s[i * c..(i + 1) * c]);
        let pt = softmax(&q[i * c..(i + 1) * c]);
        for j in 0..c {
            if pt[j] > 0.0 {
                total += pt[j] * (pt[j].ln() - ps[j].max(1e-30).ln());
            }
            // d/ds of t^2 * KL = t * (p_s - p_t)
            grad[i * c + j] = (t as f64 * (ps[j] - pt[j]) / n as f64) as f32;
        }
    }
    Ok((
        (t * t) as f64 * total / n as f64,
        Tensor::from_vec(vec![n, c], grad)?,
    ))
}

/// Feature matching (FitNets, Romero et al. 2015): the mean squared error between a student's
/// intermediate value and the teacher's, divided by the teacher's mean square so that layers of
/// any scale weigh alike. Returns the loss and its gradient with respect to the student's value.
pub fn feature_match(student: &Tensor, teacher: &Tensor) -> Result<(f64, Tensor)> {
    let (loss, grad) = mse(student, teacher)?;
    let t = teacher.as_slice::<f32>()?;
    let power = t.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / t.len().max(1) as f64;
    // A dead layer (all zeros in the teacher) still gets a bounded, well-defined target.
    let norm = power.max(1e-12);
    let g: Vec<f32> = grad
        .as_slice::<f32>()?
        .iter()
        .map(|&v| (v as f64 / norm) as f32)
        .collect();
    Ok((loss / norm, Tensor::from_vec(student.shape().to_vec(), g)?))
}

/// Mean squared error against a target of the same shape.
pub fn mse(out: &Tensor, target: &Tensor) -> Result<(f64, Tensor)> {
    if out.shape() != target.shape() {
        bail!(
            Shape,
            "output {:?}, target {:?}",
            out.shape(),
            target.shape()
        );
    }
    let (a, b) = (out.as_slice::<f32>()?, target.as_slice::<f32>()?);
    let n = a.len().max(1) as f64;
    let loss = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / n;
    let g: Vec<f32> = a
        .iter()
        .zip(b)
        .map(|(x, y)| (2.0 * (x - y) as f64 / n) as f32)
        .collect();
    Ok((loss, Tensor::from_vec(out.shape().to_vec(), g)?))
}

fn rows(t: &Tensor) -> Result<(usize, usize)> {
    let s = t.shape();
    if s.len() < 2 {
        bail!(Shape, "expected [batch, classes] outputs, got {s:?}");
    }
    Ok((s[0], s[1..].iter().product()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd(f: impl Fn(&Tensor) -> f64, x: &Tensor, g: &Tensor) {
        let h = 1e-3f32;
        for j in 0..x.numel() {
            let (mut p, mut m) = (x.clone(), x.clone());
            p.as_mut_slice::<f32>().unwrap()[j] += h;
            m.as_mut_slice::<f32>().unwrap()[j] -= h;
            let num = (f(&p) - f(&m)) / (2.0 * h as f64);
            let a = g.as_slice::<f32>().unwrap()[j] as f64;
            assert!(
                (a - num).abs() < 1e-3 + 1e-2 * num.abs(),
                "{j}: {a} vs {num}"
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = Tensor::from_vec(vec![2, 3], vec![0.5f32, -1.0, 2.0, 0.1, 0.2, -0.3]).unwrap();
        let t = Tensor::from_vec(vec![2, 3], vec![1.0f32, 0.0, -1.0, 0.5, 0.5, 2.0]).unwrap();
        let (l, g) = cross_entropy(&x, &[2, 0]).unwrap();
        assert!(l > 0.0);
        fd(|x| cross_entropy(x, &[2, 0]).unwrap().0, &x, &g);
        fd(
            |x| distill(x, &t, 2.0).unwrap().0,
            &x,
            &distill(&x, &t, 2.0).unwrap().1,
        );
        fd(|x| mse(x, &t).unwrap().0, &x, &mse(&x, &t).unwrap().1);
        // Distilling from itself costs nothing.
        assert!(distill(&x, &x, 3.0).unwrap().0.abs() < 1e-12);
        fd(
            |x| feature_match(x, &t).unwrap().0,
            &x,
            &feature_match(&x, &t).unwrap().1,
        );
        assert!(feature_match(&t, &t).unwrap().0.abs() < 1e-12);
    }
}
