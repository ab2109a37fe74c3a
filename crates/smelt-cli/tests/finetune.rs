//! Fine-tuning acceptance on MNIST-8: an 80%-sparse model recovers accuracy on the train
//! split while its pruned weights stay exactly zero; quantization-aware training writes QDQ
//! models that onnxruntime scores the same; bad input is refused.

mod common;
use common::*;
use std::path::Path;

fn zeros(model: &Path) -> usize {
    let m = smelt_onnx::load(model).unwrap();
    m.graph
        .initializers
        .values()
        .filter(|t| t.rank() >= 2)
        .filter_map(|t| {
            t.as_slice::<f32>()
                .ok()
                .map(|v| v.iter().filter(|x| **x == 0.0).count())
        })
        .sum()
}

#[test]
fn mnist8_80_percent_sparse_recovers_and_stays_sparse() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let pruned = dir.path().join("m80.onnx");
    let masks = dir.path().join("m80.masks.safetensors");
    let tuned = dir.path().join("m80-ft.onnx");
    let mnist = a.join("mnist");
    run_json(
        &[
            "prune",
            "--sparsity",
            "0.8",
            "--scope",
            "global",
            "--bench-runs",
            "0",
        ],
        &[&a.join("mnist-8/model.onnx"), Path::new("-o"), &pruned],
    );
    let before = smelt_accuracy(&pruned);
    let v = run_json(
        &[
            "finetune",
            "--split",
            "train",
            "--limit",
            "12800",
            "--val-limit",
            "2000",
            "--epochs",
            "1",
            "--lr",
            "1e-4",
            "--seed",
            "1",
        ],
        &[
            &pruned,
            Path::new("-o"),
            &tuned,
            Path::new("--data"),
            &mnist,
            Path::new("--val"),
            &mnist,
            Path::new("--masks"),
            &masks,
        ],
    );
    let after = smelt_accuracy(&tuned);
    eprintln!("mnist-8 80% sparse: accuracy {before} -> {after} after 1 epoch on 12,800 train images ({})", v["epochs"]);
    assert!(after > before + 0.05 && after > 0.95, "{before} -> {after}");
    // Exactly the pruned weights are zero: as many as before, and the masks still hold.
    assert_eq!(zeros(&tuned), zeros(&pruned));
    let m = smelt_prune::Masks::load(&masks).unwrap();
    let t = smelt_onnx::load(&tuned).unwrap();
    for (name, mask) in &m.0 {
        let w = t.graph.initializers[name].as_slice::<f32>().unwrap();
        assert!(
            w.iter().zip(&mask.keep).all(|(x, k)| *k || *x == 0.0),
            "{name}"
        );
    }
}

/// Runs `smelt finetune --qat SCHEME` on MNIST-8 for `steps` steps of 64 train images.
fn qat(dir: &Path, scheme: &str, steps: &str, lr: &str) -> std::path::PathBuf {
    let a = assets();
    let out = dir.join(format!("{scheme}-qat.onnx"));
    run_json(
        &[
            "finetune",
            "--split",
            "train",
            "--qat",
            scheme,
            "--epochs",
            "1",
            "--max-steps",
            steps,
            "--lr",
            lr,
            "--seed",
            "1",
        ],
        &[
            &a.join("mnist-8/model.onnx"),
            Path::new("-o"),
            &out,
            Path::new("--data"),
            &a.join("mnist"),
        ],
    );
    out
}

#[test]
fn qat_w4a8_exports_qdq_that_onnxruntime_scores_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let out = qat(dir.path(), "w4a8", "300", "1e-4");
    let m = smelt_onnx::load(&out).unwrap();
    // Weights are int4 codes again, not float.
    let int4 = m
        .graph
        .initializers
        .values()
        .filter(|t| t.dtype() == smelt_tensor::DType::I4 && t.rank() >= 2)
        .count();
    assert_eq!(int4, 3, "three int4 weights");
    let (ours, ort) = (smelt_accuracy(&out), ort_mnist_accuracy(&out));
    eprintln!("mnist-8 W4A8 QAT (300 steps): smelt {ours}, onnxruntime {ort}");
    assert!(ours >= 0.985, "{ours}");
    assert!(
        (ours - ort).abs() <= 0.0005,
        "smelt {ours} vs onnxruntime {ort}"
    );
}

#[test]
fn qat_w8a8_reaches_the_float_accuracy_in_the_form_onnxruntime_fuses() {
    let dir = tempfile::tempdir().unwrap();
    let out = qat(dir.path(), "w8a8", "300", "3e-5");
    // Re-quantized int32 biases match the trained scales, so every layer still fuses.
    let ops = ort_optimized_ops(&out);
    assert_eq!(ops.get("QLinearConv"), Some(&2), "{ops:?}");
    assert_eq!(ops.get("QGemm"), Some(&1), "{ops:?}");
    let (ours, ort) = (smelt_accuracy(&out), ort_mnist_accuracy(&out));
    eprintln!("mnist-8 W8A8 QAT (300 steps): smelt {ours}, onnxruntime {ort}");
    assert!(ours >= 0.989, "{ours}");
    assert!(
        (ours - ort).abs() <= 0.0005,
        "smelt {ours} vs onnxruntime {ort}"
    );
}

/// The engine can train, not only nudge: a LeNet-style CNN initialised at random learns
/// MNIST in one epoch.
#[test]
fn a_random_cnn_trains_from_scratch() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let (init, out) = (
        dir.path().join("cnn.onnx"),
        dir.path().join("cnn-trained.onnx"),
    );
    smelt_onnx::save(&nets::mnist_cnn(0), &init).unwrap();
    let before = smelt_accuracy(&init);
    let v = run_json(
        &[
            "finetune", "--split", "train", "--epochs", "1", "--lr", "0.05", "--warmup", "100",
            "--seed", "0",
        ],
        &[
            &init,
            Path::new("-o"),
            &out,
            Path::new("--data"),
            &a.join("mnist"),
        ],
    );
    let after = smelt_accuracy(&out);
    eprintln!(
        "random CNN: accuracy {before} -> {after} after 1 epoch ({})",
        v["epochs"]
    );
    assert!(before < 0.3, "{before}");
    assert!(after >= 0.98, "{after}");
}

/// A run stopped after its first epoch and resumed from the checkpoint ends byte-identical
/// to the same run done in one go (optimizer moments, step count and shuffles all restored).
#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train = |epochs: &str, out: &Path, ck: &Path, resume: bool| {
        let mut flags = vec![
            "finetune",
            "--split",
            "train",
            "--limit",
            "640",
            "--epochs",
            epochs,
            "--lr",
            "1e-4",
            "--optimizer",
            "adamw",
            "--schedule",
            "constant",
        ];
        if resume {
            flags.push("--resume");
        }
        run_json(
            &flags,
            &[
                &a.join("mnist-8/model.onnx"),
                Path::new("-o"),
                out,
                Path::new("--data"),
                &a.join("mnist"),
                Path::new("--checkpoint"),
                ck,
            ],
        )
    };
    let (ck1, ck2) = (d.join("ck-straight"), d.join("ck-resumed"));
    let v = train("2", &d.join("straight.onnx"), &ck1, false);
    assert_eq!(v["epochs"].as_array().unwrap().len(), 2);
    // Only the latest checkpoint is kept.
    assert!(ck1.join("epoch-2/state.safetensors").is_file());
    assert!(!ck1.join("epoch-1").exists());
    train("1", &d.join("first.onnx"), &ck2, false);
    assert!(ck2.join("epoch-1/model.onnx").is_file());
    let v = train("2", &d.join("resumed.onnx"), &ck2, true);
    // The resumed run reports both epochs: the first from the checkpoint.
    assert_eq!(v["epochs"].as_array().unwrap().len(), 2);
    assert_eq!(
        std::fs::read(d.join("straight.onnx")).unwrap(),
        std::fs::read(d.join("resumed.onnx")).unwrap()
    );
}

/// Issue 5's unstructured target: MNIST-8 pruned gradually to 80% (global magnitude, Zhu &
/// Gupta's cubic schedule over the first half of the run) while it trains for two epochs
/// reaches >= 0.988 (fp32: 0.9891); the sparsity is exactly 80%, the masks are written beside
/// the output, and the output's zeros are exactly the masked weights. (0.9898 at lr 0.2;
/// seeds 1 and 2 give 0.9880 and 0.9893. At lr 0.3 seed 0 gave 0.9891 or 0.9878 depending on
/// the convolution kernel's order of float sums; pruning first and then fine-tuning gets
/// 0.9874.)
#[test]
fn gradual_pruning_to_80_percent_while_training_keeps_accuracy() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g80.onnx");
    let v = run_json(
        &[
            "finetune",
            "--split",
            "train",
            "--epochs",
            "2",
            "--lr",
            "0.2",
            "--loss-temperature",
            "1000",
            "--prune-to",
            "0.8",
            "--prune-scope",
            "global",
            "--prune-until",
            "0.5",
        ],
        &[
            &a.join("mnist-8/model.onnx"),
            Path::new("-o"),
            &out,
            Path::new("--data"),
            &a.join("mnist"),
        ],
    );
    assert_eq!(v["sparsity"].as_f64().unwrap(), 0.8);
    let masks = dir.path().join("g80.masks.safetensors");
    assert_eq!(v["masks"].as_str().unwrap(), masks.display().to_string());
    let m = smelt_prune::Masks::load(&masks).unwrap();
    assert_eq!(m.0.len(), 3, "two convolutions and the classifier");
    let t = smelt_onnx::load(&out).unwrap();
    let (mut total, mut zero) = (0, 0);
    for (name, mask) in &m.0 {
        let w = t.graph.initializers[name].as_slice::<f32>().unwrap();
        for (x, k) in w.iter().zip(&mask.keep) {
            assert_eq!(*x == 0.0, !*k, "{name}");
            total += 1;
            zero += (*x == 0.0) as usize;
        }
    }
    assert_eq!(
        (zero, total),
        (4768, 5960),
        "exactly 80% of the weights are zero"
    );
    let acc = smelt_accuracy(&out);
    eprintln!("mnist-8 gradual 80% global over 2 epochs: {acc}");
    assert!(acc >= 0.988, "{acc}");
}

/// Issue 5's structured target: MNIST-8 with half its channels removed (Taylor importance,
/// 0.54 before fine-tuning) recovers to >= 0.985 in two epochs. The loss is taken on logits
/// / 300: MNIST-8's logits are in the hundreds, so plain cross-entropy is saturated for
/// almost every sample and its gradient comes from a few confidently wrong ones.
#[test]
fn mnist8_half_the_channels_recovers() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let (pruned, tuned) = (dir.path().join("c50.onnx"), dir.path().join("c50-ft.onnx"));
    let mnist = a.join("mnist");
    run_json(
        &[
            "prune",
            "--pattern",
            "channels",
            "--sparsity",
            "0.5",
            "--criterion",
            "taylor",
            "--split",
            "train",
            "--limit",
            "1024",
            "--bench-runs",
            "0",
        ],
        &[
            &a.join("mnist-8/model.onnx"),
            Path::new("-o"),
            &pruned,
            Path::new("--calib"),
            &mnist,
        ],
    );
    let before = smelt_accuracy(&pruned);
    run_json(
        &[
            "finetune",
            "--split",
            "train",
            "--epochs",
            "2",
            "--loss-temperature",
            "300",
            "--lr",
            "0.1",
        ],
        &[
            &pruned,
            Path::new("-o"),
            &tuned,
            Path::new("--data"),
            &mnist,
        ],
    );
    let (after, ort) = (smelt_accuracy(&tuned), ort_mnist_accuracy(&tuned));
    eprintln!("mnist-8 50% channels (taylor): {before} -> {after} (onnxruntime {ort})");
    assert!(after >= 0.985, "{after}");
    assert!((after - ort).abs() <= 0.0005, "{after} vs {ort}");
}

#[test]
fn finetune_refuses_bad_input() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.onnx");
    let model = a.join("mnist-8/model.onnx");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--optimizer", "lbfgs"], "unknown optimizer"),
        (vec!["--lr", "1e9", "--limit", "256"], "lower --lr"),
        (
            vec!["--checkpoint", "/nonexistent-smelt-ck", "--resume"],
            "no checkpoint to resume",
        ),
    ];
    for (extra, needle) in cases {
        let o = smelt()
            .arg("finetune")
            .arg(&model)
            .arg("-o")
            .arg(&out)
            .arg("--data")
            .arg(a.join("mnist"))
            .args(["--split", "train"])
            .args(&extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {err}");
        assert!(
            err.contains(needle),
            "{extra:?}: expected '{needle}' in {err}"
        );
        assert!(!out.exists());
    }
    // Masks that do not belong to the model.
    let bad = dir.path().join("bad.masks.safetensors");
    let mut m = smelt_prune::Masks::default();
    m.0.insert(
        "nosuch".into(),
        smelt_prune::Mask {
            shape: vec![1],
            keep: vec![true],
        },
    );
    std::fs::write(&bad, m.to_safetensors().unwrap()).unwrap();
    let o = smelt()
        .arg("finetune")
        .arg(&model)
        .arg("-o")
        .arg(&out)
        .arg("--data")
        .arg(a.join("mnist"))
        .arg("--masks")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("'nosuch', which is not a"));
}
