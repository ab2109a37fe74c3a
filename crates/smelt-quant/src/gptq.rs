//! GPTQ (Frantar et al. 2023): quantize a layer's weights one input row at a time and push
//! each row's rounding error onto the rows not yet quantized, weighted by the inverse
//! Hessian of the layer's squared output error, H = 2 X^T X over calibration inputs X. Rows
//! that correlate with the rounded one absorb its error, so the layer's output moves far less
//! than under round-to-nearest, at the same bits and group size.

use crate::calibrate::{for_each_run, Feed};
use crate::params::{Affine, ErrorStats};
use crate::scheme::{Granularity, WeightScheme};
use crate::weights::{choose_affine, QuantizedWeight};
use rayon::prelude::*;
use smelt_engine::kernels::gemm::sgemm;
use smelt_ir::Model;
use smelt_tensor::{bail, Result, Tensor};
use std::collections::HashMap;

/// 2 X^T X / rows of each value (rows = all leading axes, K = last axis), over the feeds.
pub fn hessians(
    model: &Model,
    values: &[String],
    feeds: &[Feed],
) -> Result<HashMap<String, (usize, Vec<f64>)>> {
    let mut acc: HashMap<String, (usize, Vec<f64>, usize)> = HashMap::new();
    for_each_run(model, values, feeds, |_, cap| {
        let parts: Vec<(String, usize, Vec<f32>, usize)> = values
            .par_iter()
            .map(|v| -> Result<_> {
                let t = &cap[v];
                let k = *t.shape().last().unwrap_or(&1);
                let x = t.to_f32_vec()?;
                if let Some(bad) = x.iter().find(|v| !v.is_finite()) {
                    bail!(
                        Input,
                        "activation '{v}' holds {bad} on the calibration data"
                    );
                }
                let rows = x.len() / k.max(1);
                let mut h = vec![0.0f32; k * k];
                sgemm(k, rows, k, &x, true, &x, false, &mut h, 1.0, 0.0, None)?;
                Ok((v.clone(), k, h, rows))
            })
            .collect::<Result<_>>()?;
        for (v, k, h, rows) in parts {
            let e = acc.entry(v).or_insert_with(|| (k, vec![0.0; k * k], 0));
            for (a, b) in e.1.iter_mut().zip(&h) {
                *a += *b as f64;
            }
            e.2 += rows;
        }
        Ok(())
    })?;
    Ok(acc
        .into_iter()
        .map(|(v, (k, mut h, rows))| {
            let f = 2.0 / rows.max(1) as f64;
            h.iter_mut().for_each(|x| *x *= f);
            (v, (k, h))
        })
        .collect())
}

/// In-place lower Cholesky factor of an n x n SPD matrix; false if not positive definite.
fn cholesky(a: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        let mut d = a[j * n + j];
        for p in 0..j {
            d -= a[j * n + p] * a[j * n + p];
        }
        if d <= 0.0 || !d.is_finite() {
            return false;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        let (head, tail) = a.split_at_mut((j + 1) * n);
        let row_j = &head[j * n..j * n + j];
        tail.par_chunks_mut(n).for_each(|row_i| {
            let mut s = row_i[j];
            for p in 0..j {
                s -= row_i[p] * row_j[p];
            }
            row_i[j] = s / d;
        });
        for p in j + 1..n {
            a[j * n + p] = 0.0;
        }
    }
    true
}

/// Upper factor U with H^-1 = U^T U, from the lower Cholesky factor L of H.
fn inverse_upper(l: &[f64], n: usize) -> Vec<f64> {
    // Linv (lower) by forward substitution, column by column.
    let mut linv = vec![0.0; n * n];
    linv.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        // Row i of Linv: solve sum_p Linv[i][p] L[p][j] = delta_ij for j = i down to 0.
        row[i] = 1.0 / l[i * n + i];
        for j in (0..i).rev() {
            let mut s = 0.0;
            for p in j + 1..=i {
                s += row[p] * l[p * n + j];
            }
            row[j] = -s / l[j * n + j];
        }
    });
    // H^-1 = Linv^T Linv.
    let mut hinv = vec![0.0; n * n];
    hinv.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, r) in row.iter_mut().enumerate() {
            let mut s = 0.0;
            for p in i.max(j)..n {
                s += linv[p * n + i] * linv[p * n + j];
            }
            *r = s;
        }
    });
    let ok = cholesky(&mut hinv, n);
    debug_assert!(ok);
    // hinv now holds lower L2 with H^-1 = L2 L2^T; U = L2^T.
    let mut u = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            u[j * n + i] = hinv[i * n + j];
        }
    }
    u
}

/// Quantizes a MatMul weight `w` [K, N] (channels along N, blocks along K) with GPTQ,
/// given the Hessian `h` [K, K] of its input.
pub fn gptq(w: &Tensor, h: &[f64], scheme: &WeightScheme) -> Result<QuantizedWeight> {
    let &[k, n] = w.shape() else {
        bail!(Shape, "GPTQ needs a 2-D [K, N] weight, got {:?}", w.shape());
    };
    if h.len() != k * k {
        bail!(
            Shape,
            "Hessian of {} values does not fit a weight with K = {k}",
            h.len()
        );
    }
    let orig = w.to_f32_vec()?;
    if let Some(i) = orig.iter().position(|v| !v.is_finite()) {
        bail!(Invalid, "weight element {i} is {} (not finite)", orig[i]);
    }
    // Rows in order of decreasing input energy ("act order"): the rows that matter most are
    // rounded first, while the most rows remain to absorb their error. Group scales are then
    // fixed up front from the original weights ("static groups").
    let mut perm: Vec<usize> = (0..k).collect();
    perm.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
    let mut wt: Vec<f64> = vec![0.0; k * n];
    for (r, &o) in perm.iter().enumerate() {
        for c in 0..n {
            wt[r * n + c] = orig[o * n + c] as f64;
        }
    }
    let mut hm = vec![0.0f64; k * k];
    for (i, &pi) in perm.iter().enumerate() {
        for (j, &pj) in perm.iter().enumerate() {
            hm[i * k + j] = h[pi * k + pj];
        }
    }
    for i in 0..k {
        if hm[i * k + i] == 0.0 {
            // An input that is always zero: its weights never matter.
            hm[i * k + i] = 1.0;
            wt[i * n..(i + 1) * n].iter_mut().for_each(|v| *v = 0.0);
        }
    }
    let mean_diag = (0..k).map(|i| hm[i * k + i]).sum::<f64>() / k as f64;
    let mut damp = 0.01 * mean_diag;
    let l = loop {
        let mut a = hm.clone();
        for i in 0..k {
            a[i * k + i] += damp;
        }
        if cholesky(&mut a, k) {
            break a;
        }
        damp *= 10.0;
        if damp > 1e6 * mean_diag.max(1e-12) {
            bail!(
                Invalid,
                "the input Hessian is not positive definite, even damped"
            );
        }
    };
    let u = inverse_upper(&l, k);
    let qtype = scheme.qtype;
    let range = if scheme.symmetric {
        qtype.symmetric_range()
    } else {
        qtype.range()
    };
    let (block, nb) = match scheme.granularity {
        Granularity::Block(b) => (b, k.div_ceil(b)),
        _ => (k, 1),
    };
    let per_tensor = scheme.granularity == Granularity::PerTensor;
    let mut params: Vec<Affine> = Vec::new();
    if per_tensor {
        params.push(choose_affine(&orig, qtype, scheme.symmetric, scheme.clip));
    } else {
        let mut buf = Vec::new();
        for g in 0..nb {
            for c in 0..n {
                buf.clear();
                buf.extend((g * block..((g + 1) * block).min(k)).map(|r| orig[r * n + c]));
                params.push(choose_affine(&buf, qtype, scheme.symmetric, scheme.clip));
            }
        }
    }
    let mut codes = vec![0i32; k * n];
    let mut err = vec![0.0f64; n];
    for r in 0..k {
        let o = perm[r];
        let d = u[r * k + r];
        for c in 0..n {
            let a = if per_tensor {
                params[0]
            } else {
                params[(o / block) * n + c]
            };
            let q = a.quantize(wt[r * n + c] as f32, range);
            codes[o * n + c] = q;
            err[c] = (wt[r * n + c] - a.dequantize(q) as f64) / d;
        }
        // Later rows absorb this row's error.
        let (_, rest) = wt.split_at_mut((r + 1) * n);
        let urow = &u[r * k..(r + 1) * k];
        rest.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            let f = urow[r + 1 + i];
            if f != 0.0 {
                for (x, e) in row.iter_mut().zip(&err) {
                    *x -= f * e;
                }
            }
        });
    }
    let qw = QuantizedWeight {
        qtype,
        shape: vec![k, n],
        error: ErrorStats::default(),
        scale_shape: if per_tensor {
            vec![]
        } else if nb > 1 {
            vec![nb, n]
        } else {
            vec![n]
        },
        axis: if per_tensor {
            None
        } else if nb > 1 {
            Some(0)
        } else {
            Some(1)
        },
        block: (nb > 1).then_some(block),
        codes,
        params,
    };
    let approx = qw.dequantized()?.to_f32_vec()?;
    Ok(QuantizedWeight {
        error: ErrorStats::between(&orig, &approx),
        ..qw
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::QType;
    use crate::weights::{quantize_weight, Axes};

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    #[test]
    fn gptq_lowers_output_error_versus_round_to_nearest() {
        // Correlated inputs (a shared component plus noise), as real activations are.
        let (rows, k, n) = (256, 64, 16);
        let mut r = Rng(7);
        let mut x = vec![0.0f32; rows * k];
        for i in 0..rows {
            let common = r.next() * 3.0;
            for j in 0..k {
                x[i * k + j] = common * (j as f32 / k as f32) + r.next();
            }
        }
        let w: Vec<f32> = (0..k * n).map(|_| r.next()).collect();
        let wt = Tensor::from_vec(vec![k, n], w.clone()).unwrap();
        let mut h32 = vec![0.0f32; k * k];
        sgemm(k, rows, k, &x, true, &x, false, &mut h32, 1.0, 0.0, None).unwrap();
        let h: Vec<f64> = h32.iter().map(|&v| 2.0 * v as f64 / rows as f64).collect();
        let scheme = WeightScheme {
            qtype: QType::I4,
            granularity: Granularity::Block(16),
            ..Default::default()
        };
        let out_err = |q: &[f32]| {
            let (mut y, mut yq) = (vec![0.0f32; rows * n], vec![0.0f32; rows * n]);
            sgemm(rows, k, n, &x, false, &w, false, &mut y, 1.0, 0.0, None).unwrap();
            sgemm(rows, k, n, &x, false, q, false, &mut yq, 1.0, 0.0, None).unwrap();
            y.iter()
                .zip(&yq)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
        };
        let g = gptq(&wt, &h, &scheme).unwrap();
        let rtn = quantize_weight(
            &wt,
            &scheme,
            Axes {
                channel_axis: 1,
                reduce_axis: 0,
            },
        )
        .unwrap();
        let (eg, er) = (
            out_err(&g.dequantized().unwrap().to_f32_vec().unwrap()),
            out_err(&rtn.dequantized().unwrap().to_f32_vec().unwrap()),
        );
        assert!(
            eg < 0.8 * er,
            "GPTQ output error {eg} vs round-to-nearest {er}"
        );
        assert!(g.codes.iter().all(|&c| (-7..=7).contains(&c)));
        assert_eq!(g.scale_shape, vec![4, 16]);
    }

    #[test]
    fn cholesky_inverse_factor_is_exact_on_a_small_matrix() {
        // H = [[4, 2], [2, 3]]: H^-1 = [[3, -2], [-2, 4]] / 8.
        let mut l = vec![4.0, 2.0, 2.0, 3.0];
        assert!(cholesky(&mut l, 2));
        let u = inverse_upper(&l, 2);
        let hinv = [
            u[0] * u[0],
            u[0] * u[1],
            u[0] * u[1],
            u[1] * u[1] + u[3] * u[3],
        ];
        for (a, b) in hinv
            .iter()
            .zip([3.0 / 8.0, -2.0 / 8.0, -2.0 / 8.0, 4.0 / 8.0])
        {
            assert!((a - b).abs() < 1e-12, "{hinv:?}");
        }
    }
}
