//! Fine-tuning acceptance on MNIST-8: an 80%-sparse model recovers accuracy on the train
//! split while its pruned weights stay exactly zero, and bad input is refused.

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

#[test]
fn finetune_refuses_bad_input() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.onnx");
    let model = a.join("mnist-8/model.onnx");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--optimizer", "lbfgs"], "unknown optimizer"),
        (vec!["--lr", "1e9", "--limit", "256"], "lower --lr"),
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
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a trainable weight"));
}
