//! Pruning acceptance: MNIST-8 unstructured (layer-wise and global) and 2:4 with their masks,
//! structured channel pruning of MNIST-8 and of a residual/depthwise CNN built here (valid
//! ONNX that onnxruntime runs with the engine's numbers, FLOPs cut), MiniLM heads and FFN
//! neurons, residual block removal, and refusals.

mod common;
use common::*;
use smelt_data::{Preprocess, Split};
use smelt_engine::Session;
use smelt_tensor::Tensor;
use std::path::Path;

fn prune(input: &Path, output: &Path, extra: &[&str]) -> serde_json::Value {
    let out = smelt()
        .arg("prune")
        .arg(input)
        .arg("-o")
        .arg(output)
        .args(extra)
        .args(["--bench-runs", "3", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prune {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn prune_fails(input: &Path, output: &Path, extra: &[&str], needle: &str) {
    let out = smelt()
        .arg("prune")
        .arg(input)
        .arg("-o")
        .arg(output)
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
    assert!(
        err.contains(needle),
        "{extra:?}: expected '{needle}' in: {err}"
    );
    assert!(!err.contains("internal error"), "{err}");
    assert!(!output.exists(), "{extra:?} left {}", output.display());
}

fn weight(model: &Path, name: &str) -> Tensor {
    smelt_onnx::load(model).unwrap().graph.initializers[name].clone()
}

#[test]
fn mnist8_unstructured_layer_and_global_masks_are_exact() {
    let a = assets();
    let fp32 = a.join("mnist-8/model.onnx");
    let dir = tempfile::tempdir().unwrap();
    for scope in ["layer", "global"] {
        let out = dir.path().join(format!("{scope}.onnx"));
        let v = prune(&fp32, &out, &["--sparsity", "0.5", "--scope", scope]);
        let masks = smelt_prune::Masks::load(Path::new(v["masks"].as_str().unwrap())).unwrap();
        assert_eq!(masks.0.len(), 3, "{v}");
        let (mut zeros, mut total) = (0, 0);
        for (name, m) in &masks.0 {
            let w = weight(&out, name);
            assert_eq!(w.shape(), m.shape.as_slice());
            for (x, k) in w.as_slice::<f32>().unwrap().iter().zip(&m.keep) {
                // Pruned weights are exactly zero; kept ones are the original values.
                if !k {
                    assert_eq!(x.to_bits(), 0, "{name}");
                }
            }
            let cut = m.keep.iter().filter(|k| !**k).count();
            if scope == "layer" {
                assert_eq!(cut, m.keep.len() / 2, "{name}");
            }
            zeros += cut;
            total += m.keep.len();
        }
        assert_eq!(zeros, total / 2, "{scope}: {zeros} of {total}");
        let acc = smelt_accuracy(&out);
        eprintln!("mnist-8 50% unstructured magnitude ({scope}): accuracy {acc} before fine-tuning (fp32 0.9891)");
        assert!(acc >= 0.97, "{scope}: {acc}");
        assert_eq!(v["before"]["flops"], v["after"]["flops"]);
        assert!(v["after"]["nonzero_params"].as_u64() < v["before"]["nonzero_params"].as_u64());
    }
}

#[test]
fn mnist8_two_of_four_holds_on_the_written_file() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nm.onnx");
    let v = prune(&a.join("mnist-8/model.onnx"), &out, &["--pattern", "2:4"]);
    let m = smelt_onnx::load(&out).unwrap();
    let mut checked = 0;
    for l in v["layers"].as_array().unwrap() {
        let w = &m.graph.initializers[l["weight"].as_str().unwrap()];
        let x = w.as_slice::<f32>().unwrap();
        // Conv [O, I, kh, kw]: groups run along I; MatMul B [K, N]: along K.
        let s = w.shape();
        let in_axis = if s.len() == 4 { 1 } else { 0 };
        let len = s[in_axis];
        let stride: usize = s[in_axis + 1..].iter().product();
        let outer = x.len() / (len * stride);
        for o in 0..outer {
            for st in 0..stride {
                for g0 in (0..len).step_by(4) {
                    let nz = (g0..g0 + 4)
                        .filter(|i| x[(o * len + i) * stride + st] != 0.0)
                        .count();
                    assert!(
                        nz <= 2,
                        "{}: group at {o},{g0},{st} has {nz} non-zeros",
                        l["weight"]
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 0);
    // The first conv has one input channel: left dense, and said so.
    let skipped = v["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{v}");
    eprintln!(
        "mnist-8 2:4: accuracy {} before fine-tuning",
        smelt_accuracy(&out)
    );
}

/// Engine and onnxruntime outputs of `model` on `x` agree.
fn engine_matches_onnxruntime(model: &Path, input: &str, x: &Tensor) {
    let s = Session::new(smelt_onnx::load(model).unwrap()).unwrap();
    let ours = s.run(&[(input, x.clone())]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let theirs = ort_run(model, &[(input, x)], dir.path());
    let (a, b) = (
        ours[0].1.as_slice::<f32>().unwrap(),
        theirs[0].1.as_slice::<f32>().unwrap(),
    );
    let d = max_rel_diff(a, b, ours[0].1.shape()[1]);
    assert!(d <= 1e-4, "{}: engine vs onnxruntime {d}", model.display());
}

#[test]
fn structured_channels_shrink_mnist8_and_a_residual_depthwise_cnn() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    // MNIST-8: both convs lose half their channels; the classifier output must stay 10.
    let out = dir.path().join("mnist-ch.onnx");
    let v = prune(
        &a.join("mnist-8/model.onnx"),
        &out,
        &["--pattern", "channels"],
    );
    let flops = v["after"]["flops"].as_f64().unwrap() / v["before"]["flops"].as_f64().unwrap();
    assert!(flops <= 0.55, "FLOPs ratio {flops}");
    assert_eq!(v["groups"].as_array().unwrap().len(), 2, "{v}");
    let ds = smelt_data::load_idx_dir(
        &a.join("mnist"),
        Split::Test,
        Some(64),
        &Preprocess::default(),
    )
    .unwrap();
    engine_matches_onnxruntime(&out, "Input3", &ds.batch(0, 1));
    eprintln!(
        "mnist-8 50% channels: FLOPs x{flops:.3}, accuracy {} before fine-tuning",
        smelt_accuracy(&out)
    );

    // The residual CNN: the stem's channels run through every block's Add and into the
    // classifier; each block's expansion channels through a depthwise conv.
    let cnn = dir.path().join("cnn.onnx");
    smelt_onnx::save(&nets::residual_cnn(7, 2), &cnn).unwrap();
    let out = dir.path().join("cnn-ch.onnx");
    let py = python().to_str().unwrap();
    let v = prune(
        &cnn,
        &out,
        &[
            "--pattern",
            "channels",
            "--bench-batch",
            "32",
            "--ort-python",
            py,
        ],
    );
    // Both models were timed in onnxruntime too (no speed is asserted: machines are noisy).
    for side in ["before", "after"] {
        assert!(v[side]["ort_latency_ms"].as_f64().unwrap() > 0.0, "{v}");
    }
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(
        groups.len(),
        3,
        "stem/residual stream + one expansion group per block: {v}"
    );
    for g in groups {
        assert_eq!(
            g["removed"].as_array().unwrap().len() * 2,
            g["channels"].as_u64().unwrap() as usize
        );
    }
    // Only the classifier, whose outputs are the model's, stays whole.
    let refused = v["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{v}");
    assert_eq!(refused[0]["node"], "Gemm node 'classifier'");
    let flops = v["after"]["flops"].as_f64().unwrap() / v["before"]["flops"].as_f64().unwrap();
    assert!(flops <= 0.55, "FLOPs ratio {flops}");
    let m = smelt_onnx::load(&out).unwrap();
    let dw: Vec<i64> = m
        .graph
        .nodes
        .iter()
        .filter_map(|n| n.attr_int("group").ok().flatten().filter(|g| *g > 1))
        .collect();
    assert_eq!(dw, vec![48, 48], "depthwise groups follow their channels");
    let x = nets::Rng::new(3).tensor(&[4, 3, 32, 32], 1.0, 0.0);
    engine_matches_onnxruntime(&out, "x", &x);
    eprintln!(
        "residual CNN 50% channels: FLOPs x{flops:.3}, latency at batch 32 {:.3} -> {:.3} ms \
         (engine), {:.3} -> {:.3} ms (onnxruntime)",
        v["before"]["latency_ms"],
        v["after"]["latency_ms"],
        v["before"]["ort_latency_ms"],
        v["after"]["ort_latency_ms"]
    );
}

#[test]
fn residual_block_removal_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let cnn = dir.path().join("cnn.onnx");
    smelt_onnx::save(&nets::residual_cnn(7, 2), &cnn).unwrap();
    let out = dir.path().join("cnn-1block.onnx");
    let v = prune(
        &cnn,
        &out,
        &["--pattern", "none", "--remove-block", "block1_add"],
    );
    let removed = v["blocks_removed"].as_array().unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0]["nodes"].as_array().unwrap().len(), 8, "{v}");
    let m = smelt_onnx::load(&out).unwrap();
    assert!(m.graph.nodes.iter().all(|n| n.name != "block1_add"));
    assert_eq!(
        m.graph.nodes.len(),
        smelt_onnx::load(&cnn).unwrap().graph.nodes.len() - 9
    );
    let x = nets::Rng::new(5).tensor(&[2, 3, 32, 32], 1.0, 0.0);
    engine_matches_onnxruntime(&out, "x", &x);

    // Refusals name the node; nothing is written.
    let bad = dir.path().join("bad.onnx");
    prune_fails(
        &cnn,
        &bad,
        &["--pattern", "none", "--remove-block", "nosuch"],
        "names no residual block",
    );
    prune_fails(
        &cnn,
        &bad,
        &["--pattern", "channels", "--layer", "classifier=0.5"],
        "the channels reach the model output 'logits'",
    );
    prune_fails(
        &cnn,
        &bad,
        &["--criterion", "taylor"],
        "needs labelled calibration data",
    );
    prune_fails(&cnn, &bad, &["--criterion", "wanda"], "--calib");
    prune_fails(&cnn, &bad, &["--sparsity", "1.0"], "outside [0, 1)");
    prune_fails(&cnn, &bad, &["--pattern", "3:2"], "0 < N < M");
    prune_fails(&cnn, &bad, &["--exclude", "nosuch"], "matches no node");
    let before = std::fs::read(&cnn).unwrap();
    let o = smelt()
        .arg("prune")
        .arg(&cnn)
        .arg("-o")
        .arg(&cnn)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite"));
    assert_eq!(
        std::fs::read(&cnn).unwrap(),
        before,
        "the input is untouched"
    );
}

/// Mean-pooled cosine of `model` to `reference` in onnxruntime on the first 200 Brown sentences.
fn ort_cosine(model: &Path, reference: &Path) -> f64 {
    let a = assets();
    let o = std::process::Command::new(python())
        .arg(repo_root().join("scripts/ort_eval.py"))
        .arg(model)
        .args(["--task", "minilm", "--reference"])
        .arg(reference)
        .arg("--data")
        .arg(a.join("brown"))
        .arg("--tokenizer")
        .arg(a.join("minilm/tokenizer.json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    r["cosine_mean"].as_f64().unwrap()
}

#[test]
fn minilm_heads_and_ffn_neurons() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let fp32 = minilm_fp32(dir.path());
    let brown = a.join("brown").display().to_string();
    let tok = a.join("minilm/tokenizer.json").display().to_string();
    let mut cos = Vec::new();
    for criterion in ["magnitude", "wanda"] {
        let out = dir.path().join(format!("minilm-{criterion}.onnx"));
        let mut args = vec![
            "--pattern",
            "channels",
            "--heads",
            "2",
            "--sparsity",
            "0.25",
        ];
        // Activation norms from sentences 200..328: the evaluation reads the first 200.
        args.extend([
            "--criterion",
            criterion,
            "--calib",
            &brown,
            "--tokenizer",
            &tok,
        ]);
        args.extend(["--skip", "200", "--limit", "128"]);
        let v = prune(&fp32, &out, &args);
        let groups = v["groups"].as_array().unwrap();
        let heads: Vec<_> = groups
            .iter()
            .filter(|g| g["unit"].as_u64() == Some(32))
            .collect();
        let ffn: Vec<_> = groups
            .iter()
            .filter(|g| g["channels"].as_u64() == Some(1536))
            .collect();
        assert_eq!((heads.len(), ffn.len()), (6, 6), "{v}");
        for h in &heads {
            assert_eq!(h["removed"].as_array().unwrap().len(), 2);
        }
        for f in &ffn {
            assert_eq!(f["removed"].as_array().unwrap().len(), 384);
        }
        // The hidden size feeds LayerNorm: refused, by name.
        let refused = v["refused"].as_array().unwrap();
        assert!(
            refused.iter().all(|r| r["node"]
                .as_str()
                .unwrap()
                .starts_with("LayerNormalization")),
            "{v}"
        );
        // onnxruntime loads and runs the smaller model; its cosine to the original is reported.
        let c = ort_cosine(&out, &fp32);
        let params =
            v["after"]["params"].as_f64().unwrap() / v["before"]["params"].as_f64().unwrap();
        eprintln!(
            "minilm -2 heads/layer, -25% FFN ({criterion}): mean-pooled cosine {c:.4} (onnxruntime, \
             before fine-tuning), params x{params:.3}"
        );
        assert!(params < 0.92, "{params}");
        cos.push(c);
    }
    // Activation-aware scores keep the embeddings markedly closer (0.87 vs 0.75 measured).
    assert!(cos[1] > cos[0] + 0.05 && cos[1] > 0.85, "{cos:?}");
    prune_fails(
        &fp32,
        &dir.path().join("bad.onnx"),
        &["--pattern", "channels", "--layer", "node_MatMul_104=0.5"],
        "LayerNormalization node 'node_layer_norm_1'",
    );
}

/// First-order Taylor importance (|w x dL/dw| over 1,024 labelled train images) chooses
/// better channels to remove than their magnitude on MNIST-8.
#[test]
fn taylor_channels_beat_magnitude_on_mnist8() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let model = a.join("mnist-8/model.onnx");
    let mnist = a.join("mnist");
    let mut acc = Vec::new();
    for criterion in ["taylor", "l1"] {
        let out = dir.path().join(format!("{criterion}.onnx"));
        let v = prune(
            &model,
            &out,
            &[
                "--pattern",
                "channels",
                "--sparsity",
                "0.5",
                "--criterion",
                criterion,
                "--calib",
                mnist.to_str().unwrap(),
                "--split",
                "train",
                "--limit",
                "1024",
            ],
        );
        assert_eq!(v["criterion"], criterion);
        acc.push(smelt_accuracy(&out));
    }
    eprintln!(
        "mnist-8 50% channels: taylor {}, magnitude (l1) {}",
        acc[0], acc[1]
    );
    assert!(acc[0] > acc[1] + 0.02, "{acc:?}");
}
