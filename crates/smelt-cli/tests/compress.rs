//! `smelt compress` and `smelt demo`: recipes run end to end on MNIST-8, the report is
//! written with its charts, and bad recipes are refused.

mod common;
use common::*;
use std::path::Path;

#[test]
fn demo_runs_offline_and_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = smelt()
        .args(["demo", "--bench-runs", "3", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for row in [
        "accuracy",
        "non-zero params",
        "file bytes",
        "latency, batch 32",
    ] {
        assert!(stdout.contains(row), "{row} missing from:\n{stdout}");
    }
    let html = std::fs::read_to_string(out.join("report/report.html")).unwrap();
    // Two trade-off charts and one ablation chart per MNIST-8 convolution.
    assert_eq!(html.matches("<svg").count(), 4, "four charts");
    assert!(
        html.matches("<circle").count() >= 8,
        "a point per stage in each chart"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report/report.json")).unwrap()).unwrap();
    let (before, after) = (&v["before"], &v["after"]);
    assert!(before["accuracy"].as_f64().unwrap() > 0.97);
    assert!(after["accuracy"].as_f64().unwrap() > 0.96);
    assert!(after["bytes"].as_u64().unwrap() * 2 < before["bytes"].as_u64().unwrap());
    assert_eq!(v["stages"].as_array().unwrap().len(), 3);
    let ablation = v["ablation"].as_array().unwrap();
    assert_eq!(ablation.len(), 2, "both convolutions ranked and ablated");
    for a in ablation {
        let curves = a["curves"].as_array().unwrap();
        assert_eq!(curves.len(), 3);
        // Removing the most important half of the second convolution's channels hurts more
        // than removing the least important half.
        if a["channels"] == 16 {
            let last = |c: usize| {
                curves[c]["points"].as_array().unwrap().last().unwrap()[1]
                    .as_f64()
                    .unwrap()
            };
            assert!(last(0) < last(2), "{a}");
        }
    }
    // The compressed model is a valid model onnxruntime runs.
    let m = smelt_onnx::load(&out.join("mnist-8-compressed.onnx")).unwrap();
    assert!(m.graph.nodes.iter().any(|n| n.op_type == "QuantizeLinear"));
}

#[test]
fn compress_applies_a_recipe_from_the_repo() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("c.onnx");
    let v = run_json(
        &[
            "compress",
            "--split",
            "train",
            "--limit",
            "2000",
            "--val-limit",
            "2000",
            "--bench-runs",
            "2",
        ],
        &[
            &a.join("mnist-8/model.onnx"),
            Path::new("-o"),
            &out,
            Path::new("--recipe"),
            &repo_root().join("recipes/prune50-int8.toml"),
            Path::new("--data"),
            &a.join("mnist"),
            Path::new("--val"),
            &a.join("mnist"),
        ],
    );
    let stages = v["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 3);
    // Pruning halves the non-zero weights (biases stay); quantization then shrinks the file.
    let nz = stages[0]["after"]["nonzero"].as_f64().unwrap();
    assert!(nz < 0.52 * v["before"]["nonzero"].as_f64().unwrap(), "{nz}");
    assert!(v["after"]["bytes"].as_u64().unwrap() * 2 < v["before"]["bytes"].as_u64().unwrap());
    assert!(
        v["after"]["accuracy"].as_f64().unwrap() > 0.97,
        "{}",
        v["after"]
    );
    assert_eq!(v["latency"].as_array().unwrap().len(), 2);
    let ours = smelt_accuracy(&out);
    assert!(ours > 0.975, "{ours}");
}

#[test]
fn bad_recipes_are_refused() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.onnx");
    for (text, needle) in [
        (
            "[[stage]]\nkind = \"prune\"\nsparsity = 0.5\nsparsty = 1\n",
            "unknown field",
        ),
        ("[[stage]]\nkind = \"melt\"\n", "unknown variant"),
        ("name = \"nothing\"\n", "no [[stage]]"),
        (
            "[[stage]]\nkind = \"quantize\"\n[[stage]]\nkind = \"finetune\"\n",
            "quantize last",
        ),
        ("[[stage]\n", "recipe"),
    ] {
        let r = dir.path().join("r.toml");
        std::fs::write(&r, text).unwrap();
        let o = smelt()
            .arg("compress")
            .arg(a.join("mnist-8/model.onnx"))
            .arg("-o")
            .arg(&out)
            .arg("--recipe")
            .arg(&r)
            .arg("--data")
            .arg(a.join("mnist"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{text}: {err}");
        assert!(err.contains(needle), "{text}: expected '{needle}' in {err}");
        assert!(!out.exists());
    }
}
