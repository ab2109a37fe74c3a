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

/// Without a recipe a budget chooses: every ready recipe is tried and measured, the smallest
/// that keeps the accuracy wins; an impossible budget writes nothing.
#[test]
fn budget_search_keeps_the_smallest_candidate_that_meets_it() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b.onnx");
    let common = |extra: &[&str]| {
        let mut c = smelt();
        c.arg("compress")
            .arg(a.join("mnist-8/model.onnx"))
            .arg("-o")
            .arg(&out)
            .arg("--data")
            .arg(a.join("mnist"))
            .arg("--val")
            .arg(a.join("mnist"))
            .args(["--split", "train", "--limit", "2000", "--val-limit", "2000"])
            .args(["--bench-runs", "3", "--json"])
            .args(extra);
        c.output().unwrap()
    };
    let o = common(&["--max-accuracy-drop", "0.5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cands = v["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 4, "{cands:?}");
    let accepted: Vec<&serde_json::Value> =
        cands.iter().filter(|c| c["accepted"] == true).collect();
    assert!(!accepted.is_empty());
    // The chosen one is the smallest accepted, and within the budget.
    let smallest = accepted
        .iter()
        .min_by_key(|c| c["after"]["bytes"].as_u64().unwrap())
        .unwrap();
    assert_eq!(v["recipe"]["name"], smallest["recipe"]);
    let drop = v["before"]["accuracy"].as_f64().unwrap() - v["after"]["accuracy"].as_f64().unwrap();
    assert!(drop <= 0.005 + 1e-9, "{drop}");
    for c in cands.iter().filter(|c| c["accepted"] == false) {
        assert!(
            c["verdict"].as_str().unwrap().starts_with("rejected"),
            "{c}"
        );
    }
    std::fs::remove_file(&out).unwrap();
    let o = common(&["--target-size", "100"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no candidate met the budget"));
    assert!(!out.exists(), "nothing written");
}
