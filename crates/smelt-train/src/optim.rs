//! Optimizers and learning-rate schedules.

use smelt_tensor::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// SGD with (heavy-ball) momentum and L2 weight decay.
    Sgd { momentum: f32 },
    /// Adam with decoupled weight decay (Loshchilov & Hutter).
    AdamW { beta1: f32, beta2: f32, eps: f32 },
}

impl Optimizer {
    pub fn parse(s: &str, momentum: f32) -> Result<Optimizer> {
        Ok(match s {
            "sgd" => Optimizer::Sgd { momentum },
            "adamw" | "adam" => Optimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            _ => bail!(Input, "unknown optimizer '{s}' (expected sgd or adamw)"),
        })
    }
}

/// Optimizer state for one parameter.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: u32,
}

/// One update of `w` from its gradient `g`.
pub fn step(opt: Optimizer, st: &mut State, w: &mut [f32], g: &[f32], lr: f32, wd: f32) {
    if st.m.len() != w.len() {
        st.m = vec![0.0; w.len()];
        st.v = vec![0.0; w.len()];
    }
    st.step += 1;
    match opt {
        Optimizer::Sgd { momentum } => {
            for ((w, &g), m) in w.iter_mut().zip(g).zip(&mut st.m) {
                *m = momentum * *m + g + wd * *w;
                *w -= lr * *m;
            }
        }
        Optimizer::AdamW { beta1, beta2, eps } => {
            let (b1, b2) = (
                1.0 - beta1.powi(st.step as i32),
                1.0 - beta2.powi(st.step as i32),
            );
            for (((w, &g), m), v) in w.iter_mut().zip(g).zip(&mut st.m).zip(&mut st.v) {
                *m = beta1 * *m + (1.0 - beta1) * g;
                *v = beta2 * *v + (1.0 - beta2) * g * g;
                *w -= lr * ((*m / b1) / ((*v / b2).sqrt() + eps) + wd * *w);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    /// Multiply by `gamma` every `every` steps.
    Step {
        every: usize,
        gamma: f32,
    },
    /// Linear warm-up over `warmup` steps, then cosine decay to zero at the last step.
    Cosine {
        warmup: usize,
    },
}

impl Schedule {
    /// The learning rate at `step` of `total`, for base rate `lr`.
    pub fn rate(self, lr: f32, step: usize, total: usize) -> f32 {
        match self {
            Schedule::Constant => lr,
            Schedule::Step { every, gamma } => lr * gamma.powi((step / every.max(1)) as i32),
            Schedule::Cosine { warmup } => {
                if step < warmup {
                    return lr * (step + 1) as f32 / warmup as f32;
                }
                let t = (step - warmup) as f32 / (total.saturating_sub(warmup)).max(1) as f32;
                lr * 0.5 * (1.0 + (std::f32::consts::PI * t.min(1.0)).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimizers_descend_a_quadratic() {
        for opt in [
            Optimizer::Sgd { momentum: 0.9 },
            Optimizer::parse("adamw", 0.0).unwrap(),
        ] {
            let mut w = vec![3.0f32, -2.0];
            let mut st = State::default();
            for _ in 0..2000 {
                let g: Vec<f32> = w.iter().map(|x| 2.0 * x).collect();
                step(opt, &mut st, &mut w, &g, 0.01, 0.0);
            }
            assert!(w.iter().all(|x| x.abs() < 0.05), "{opt:?}: {w:?}");
        }
    }

    #[test]
    fn schedules() {
        let c = Schedule::Cosine { warmup: 10 };
        assert!((c.rate(1.0, 0, 100) - 0.1).abs() < 1e-6);
        assert!((c.rate(1.0, 10, 100) - 1.0).abs() < 1e-6);
        assert!(c.rate(1.0, 99, 100) < 0.01);
        assert_eq!(
            Schedule::Step {
                every: 10,
                gamma: 0.5
            }
            .rate(1.0, 25, 100),
            0.25
        );
    }
}
