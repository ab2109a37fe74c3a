//! Gradients of whole real models against finite differences: MNIST-8 (every op it uses
//! chained, through the training loss) and MiniLM (the transformer's ops chained).

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

/// Peak of the test images. Not 255: on 0-255 blobs MNIST-8's logits run into the thousands
/// and the loss past 1000, where float32 rounding (about 1e-4) is as large as the loss change
/// a small step makes, and a point's estimate depended on the convolution's order of sums.
const PEAK: f32 = 8.0;
#[test]
fn mnist8_gradients_match_finite_differences() {
    let model = smelt_onnx::load(&assets().join("mnist-8/model.onnx")).unwrap();
    let model = smelt_train::prepare(model).unwrap();
    let params = smelt_train::trainable(&model);
    // 3 weights, 3 biases.
    assert_eq!(params.len(), 6, "{params:?}");
    // Four real-looking inputs: smooth blobs, fixed labels.
    let x: Vec<f32> = (0..4 * 784)
        .map(|i| {
            let (b, p) = (i / 784, i % 784);
            let (r, c) = ((p / 28) as f32, (p % 28) as f32);
            let d = (r - 10.0 - b as f32 * 2.0).powi(2) + (c - 14.0 + b as f32).powi(2);
            PEAK * (-d / 40.0).exp()
        })
        .collect();
    let x = Tensor::from_vec(vec![4, 1, 28, 28], x).unwrap();
    let y = [3i64, 7, 1, 0];
    let input = model.graph.runtime_inputs().next().unwrap().name.clone();
    let output = model.graph.outputs[0].name.clone();
    // Backward reads every value of the file's graph: the reference session keeps them all
    // (the running one fuses some away, e.g. a Conv's bias Add and Relu).
    let mut s = Session::reference(model.clone()).unwrap();
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
    let (loss0, dl) = smelt_train::loss::cross_entropy(&outs[0].1, &y).unwrap();
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
            // The loss difference over the step, and the step.
            let mut fd = |h: f32| -> (f64, f64) {
                let mut diff = 0f64;
                for sign in [1.0f32, -1.0] {
                    let mut w = w0.clone();
                    w.as_mut_slice::<f32>().unwrap()[j] += sign * h;
                    s.set_initializer(p, w).unwrap();
                    diff += sign as f64 * loss(&s);
                }
                s.set_initializer(p, w0.clone()).unwrap();
                (diff, 2.0 * h as f64)
            };
            let ((d1, h1), (d2, h2)) = (fd(1e-2 * scale), fd(2.5e-3 * scale));
            // The float32 loss moves by about 1e-7 of itself from rounding alone: a difference
            // within a few such steps is rounding, not slope, and the kernels' order of sums
            // would decide the estimate.
            if d2.abs() < 1e-6 * loss0 {
                continue;
            }
            let (n1, n2) = (d1 / h1, d2 / h2);
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
        eprintln!("{p}: {checked} points checked");
        assert!(checked >= 2, "{p}: only {checked} smooth points");
    }
}

/// The transformer chain: MiniLM (embeddings through Gather, fused LayerNormalization,
/// attention with Softmax and the mask's Where, Gelu through Erf) with weights in float.
/// The objective is a fixed random projection of the last hidden state; sampled elements of
/// a spread of weights, the word embeddings included, are checked against finite differences.
#[test]
fn minilm_gradients_match_finite_differences() {
    let int8 = smelt_onnx::load(&assets().join("minilm-int8/model.onnx")).unwrap();
    let (model, _) = smelt_quant::dequantize_weights(int8).unwrap();
    let model = smelt_train::prepare(model).unwrap();
    let mut params = smelt_train::trainable(&model);
    params.sort();
    assert!(params.len() > 100, "{}", params.len());
    let g = &model.graph;
    let embedding = params
        .iter()
        .find(|p| {
            g.consumers(p)
                .iter()
                .any(|&c| g.nodes[c].op_type == "Gather")
                && g.initializers[*p].shape()[0] > 30000
        })
        .expect("word embeddings are trainable")
        .clone();
    let ids = [101i64, 2023, 2003, 1037, 3231, 6251, 1012, 102];
    let seq = ids.len();
    let feeds = vec![
        (
            "input_ids",
            Tensor::from_vec(vec![1, seq], ids.to_vec()).unwrap(),
        ),
        (
            "attention_mask",
            Tensor::from_vec(vec![1, seq], vec![1i64, 1, 1, 1, 1, 1, 1, 0]).unwrap(),
        ),
        (
            "token_type_ids",
            Tensor::from_vec(vec![1, seq], vec![0i64; seq]).unwrap(),
        ),
    ];
    let mut s = Session::unfolded(model.clone()).unwrap();
    let out_name = g.outputs[0].name.clone();
    let (outs, cap) = s
        .run_with(
            &feeds,
            &RunOptions {
                capture_all: true,
                ..Default::default()
            },
        )
        .unwrap();
    let n_out = outs[0].1.numel();
    let r: Vec<f32> = (0..n_out)
        .map(|i| ((i as u64 * 2654435761 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let objective = |s: &Session| -> f64 {
        let y = s.run(&feeds).unwrap().remove(0).1;
        y.as_slice::<f32>()
            .unwrap()
            .iter()
            .zip(&r)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    let mut values: HashMap<String, Tensor> = cap;
    for (k, t) in &feeds {
        values.insert(k.to_string(), t.clone());
    }
    values.extend(outs.clone());
    let seed = Tensor::from_vec(outs[0].1.shape().to_vec(), r.clone()).unwrap();
    // A spread of weights: every 12th (LayerNorm scales and biases, projections, FFN) and the
    // word embeddings.
    let mut chosen: Vec<String> = params.iter().step_by(12).cloned().collect();
    chosen.push(embedding.clone());
    let grads = grad::backward(&model, &values, &[(out_name, seed)], &chosen).unwrap();
    let mut checked = 0;
    for p in &chosen {
        let w0 = model.graph.initializers[p].clone();
        let gv = grads[p].as_slice::<f32>().unwrap().to_vec();
        assert_eq!(gv.len(), w0.numel(), "{p}");
        // The two largest-gradient elements: small ones drown in float32 rounding.
        let mut order: Vec<usize> = (0..gv.len()).collect();
        order.sort_by(|&a, &b| gv[b].abs().total_cmp(&gv[a].abs()));
        for &j in order.iter().take(2) {
            let h = 1e-2 * w0.as_slice::<f32>().unwrap()[j].abs().max(0.05);
            let mut num = 0f64;
            for sign in [1.0f32, -1.0] {
                let mut w = w0.clone();
                w.as_mut_slice::<f32>().unwrap()[j] += sign * h;
                s.set_initializer(p, w).unwrap();
                num += sign as f64 * objective(&s);
            }
            s.set_initializer(p, w0.clone()).unwrap();
            let num = num / (2.0 * h as f64);
            let a = gv[j] as f64;
            assert!(
                (a - num).abs() <= 2e-2 + 3e-2 * a.abs().max(num.abs()),
                "{p}[{j}]: analytic {a} vs numeric {num}"
            );
            checked += 1;
        }
    }
    // Rows of the embedding table no token reads get nothing.
    let emb = grads[&embedding].as_slice::<f32>().unwrap();
    let width = model.graph.initializers[&embedding].shape()[1];
    assert!(
        emb[..width].iter().all(|v| *v == 0.0),
        "row 0 ([PAD]) is not read"
    );
    assert!(emb[101 * width..102 * width].iter().any(|v| *v != 0.0));
    eprintln!(
        "minilm: {checked} weight elements checked in {} tensors",
        chosen.len()
    );
}
