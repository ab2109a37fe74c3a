//! Gradients of a whole real model (MNIST-8, every op it uses chained) against finite
//! differences of the training loss, for sampled weights of every layer.

use smelt_engine::{grad, RunOptions, Session};
use smelt_tensor::Tensor;
use std::collections::HashMap;
use std::path::PathBuf;

fn assets() -> PathBuf {
    let dir = std::env::var_os("SMELT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/smelt/assets")
        });
    assert!(
        dir.is_dir(),
        "assets missing at {}: run scripts/fetch-assets.sh",
        dir.display()
    );
    dir
}

#[test]
fn mnist8_gradients_match_finite_differences() {
    let model = smelt_onnx::load(&assets().join("mnist-8/model.onnx")).unwrap();
    let model = smelt_train::prepare(model).unwrap();
    let params = smelt_train::trainable(&model);
    assert_eq!(params.len(), 6, "{params:?}"); // 3 weights, 3 biases
                                               // Four real-looking inputs: smooth blobs in 0..255, fixed labels.
    let x: Vec<f32> = (0..4 * 784)
        .map(|i| {
            let (b, p) = (i / 784, i % 784);
            let (r, c) = ((p / 28) as f32, (p % 28) as f32);
            let d = (r - 10.0 - b as f32 * 2.0).powi(2) + (c - 14.0 + b as f32).powi(2);
            255.0 * (-d / 40.0).exp()
        })
        .collect();
    let x = Tensor::from_vec(vec![4, 1, 28, 28], x).unwrap();
    let y = [3i64, 7, 1, 0];
    let input = model.graph.runtime_inputs().next().unwrap().name.clone();
    let output = model.graph.outputs[0].name.clone();
    let mut s = Session::new(model.clone()).unwrap();
    let loss = |s: &Session| -> f64 {
        let out = s.run(&[(input.as_str(), x.clone())]).unwrap();
        smelt_train::loss::cross_entropy(&out[0].1, &y).unwrap().0
    };
    let (outs, cap) = s
        .run_with(
            &[(input.as_str(), x.clone())],
            &RunOptions {
                capture_all: true,
                ..Default::default()
            },
        )
        .unwrap();
    let (_, dl) = smelt_train::loss::cross_entropy(&outs[0].1, &y).unwrap();
    let mut values: HashMap<String, Tensor> = cap;
    values.insert(input.clone(), x.clone());
    values.extend(outs);
    let grads = grad::backward(&model, &values, &[(output, dl)], &params).unwrap();
    for p in &params {
        let w0 = model.graph.initializers[p].clone();
        let g = grads[p].as_slice::<f32>().unwrap().to_vec();
        // The largest-gradient element and a few spread ones.
        let big = (0..g.len()).fold(0, |b, i| if g[i].abs() > g[b].abs() { i } else { b });
        let mut checked = 0;
        for j in [
            big,
            g.len() / 3,
            g.len() / 2,
            g.len() - 1,
            g.len() / 5,
            2 * g.len() / 3,
        ] {
            let scale = w0.as_slice::<f32>().unwrap()[j].abs().max(0.05);
            let mut fd = |h: f32| -> f64 {
                let mut num = 0f64;
                for sign in [1.0f32, -1.0] {
                    let mut w = w0.clone();
                    w.as_mut_slice::<f32>().unwrap()[j] += sign * h;
                    s.set_initializer(p, w).unwrap();
                    num += sign as f64 * loss(&s);
                }
                s.set_initializer(p, w0.clone()).unwrap();
                num / (2.0 * h as f64)
            };
            let (n1, n2) = (fd(1e-2 * scale), fd(2.5e-3 * scale));
            // A ReLU or max-pool switch inside the step makes the two estimates disagree:
            // the loss is not differentiable there, so the point says nothing.
            if (n1 - n2).abs() > 0.05 * n1.abs().max(n2.abs()) + 1e-4 {
                continue;
            }
            let a = g[j] as f64;
            assert!(
                (a - n2).abs() <= 1e-3 + 3e-2 * a.abs().max(n2.abs()),
                "{p}[{j}]: analytic {a} vs numeric {n2}"
            );
            checked += 1;
        }
        assert!(checked >= 2, "{p}: only {checked} smooth points");
    }
}
