//! `smelt compress` and `smelt demo`: recipes run end to end on MNIST-8, the report is
//! written with its charts, and bad recipes are refused.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// `smelt compress` of MNIST-8 into `out`, with MNIST's training and test images as --data
/// and --val.
fn compress_mnist(out: &Path) -> Command {
    let a = assets();
    let mut c = smelt();
    c.arg("compress")
        .arg(a.join("mnist-8/model.onnx"))
        .arg("-o")
        .arg(out)
        .arg("--data")
        .arg(a.join("mnist"))
        .arg("--val")
        .arg(a.join("mnist"));
    c
}

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
            Path::new("--ort-python"),
            python(),
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
    // Latency at batch 1 and 32, in smelt's engine and in onnxruntime.
    let latency = v["latency"].as_array().unwrap();
    assert_eq!(latency.len(), 2);
    for l in latency {
        for k in [0, 1] {
            assert!(l["ort_ms"][k].as_f64().unwrap() > 0.0, "{l}");
        }
    }
    // Peak memory: the original holds float weights and activations; the result is smaller.
    let peak = |m: &serde_json::Value| m["peak_bytes"].as_u64().unwrap();
    assert!(peak(&v["before"]) > 24_000 && peak(&v["after"]) < peak(&v["before"]));
    // The per-layer table: both convolutions and the Gemm, int8 weights, about half zeros
    // in the pruned layers (global ranking), a real quantization error.
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "{layers:?}");
    for l in layers {
        assert_eq!(l["bits"], 8, "{l}");
        assert!(l["sqnr_db"].as_f64().unwrap() > 30.0, "{l}");
    }
    let sparsity: f64 = layers.iter().map(|l| l["sparsity"].as_f64().unwrap()).sum();
    assert!(sparsity > 0.9, "{layers:?}");
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
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b.onnx");
    let common = |extra: &[&str]| {
        let mut c = compress_mnist(&out);
        c.args(["--split", "train", "--limit", "2000", "--val-limit", "2000"])
            .args(["--bench-runs", "3", "--json"])
            .args(extra);
        c.output().unwrap()
    };
    let o = common(&["--max-accuracy-drop", "0.5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cands = v["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 7, "{cands:?}");
    assert_eq!(cands[6]["recipe"], "int4-int8-per-layer");
    let accepted: Vec<&serde_json::Value> =
        cands.iter().filter(|c| c["accepted"] == true).collect();
    assert!(!accepted.is_empty());
    // The chosen one is, among the accepted, smaller and faster if any is both, then the
    // smallest.
    let before_bytes = v["before"]["bytes"].as_u64().unwrap();
    let key = |c: &serde_json::Value| {
        let l = &c["latency_ms"];
        let faster = l[1].as_f64().unwrap() < l[0].as_f64().unwrap() / 1.15;
        let bytes = c["after"]["bytes"].as_u64().unwrap();
        (!(faster && bytes < before_bytes), bytes)
    };
    let best = accepted.iter().map(|c| key(c)).min().unwrap();
    // (Equal keys are told apart by latency, which is noise between equal-speed models.)
    let chosen = accepted
        .iter()
        .find(|c| c["recipe"] == v["recipe"]["name"])
        .unwrap();
    assert_eq!(key(chosen), best, "{cands:?}");
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

/// Ctrl-C during a search: the best candidate so far stays in the output, the report says it
/// is partial, the exit code is 130, and no temporary file is left.
#[test]
fn an_interrupted_search_keeps_the_best_so_far() {
    let dir = tempfile::tempdir().unwrap();
    let (out, report) = (dir.path().join("best.onnx"), dir.path().join("report"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut child = compress_mnist(&out)
        .args([
            "--split",
            "train",
            "--val-limit",
            "1000",
            "--bench-runs",
            "2",
        ])
        .args(["--max-accuracy-drop", "5", "--candidates"])
        .arg(format!(
            "{},{}",
            root.join("int4-weight-only.toml").display(),
            root.join("channels30-int4.toml").display()
        ))
        .arg("--report")
        .arg(&report)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first candidate is accepted within seconds; the second fine-tunes on 60,000 images
    // for a minute, and is interrupted.
    let started = std::time::Instant::now();
    while !report.join("report.json").exists() {
        assert!(started.elapsed().as_secs() < 120, "no partial report");
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let m = smelt_onnx::load(&out).unwrap();
    assert!(m
        .graph
        .nodes
        .iter()
        .any(|n| n.op_type == "DequantizeLinear"));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    assert_eq!(v["recipe"]["name"], "int4-weight-only", "{v}");
    assert!(
        v["partial"].as_str().unwrap().contains("interrupted"),
        "{v}"
    );
    let verdicts: Vec<&str> = v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(verdicts.len(), 2, "{verdicts:?}");
    assert!(verdicts[0].starts_with("meets the budget"), "{verdicts:?}");
    assert_eq!(verdicts[1], "interrupted while running");
    assert!(std::fs::read_to_string(report.join("report.html"))
        .unwrap()
        .contains("partial report"));
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["best.onnx", "report"], "no temporary files left");
}

/// A fidelity budget on MiniLM (no labels): per-layer int4/int8 gives a model smaller than
/// int8 everywhere, within the budget on sentences the choice never saw, and says why each
/// layer kept its bits.
#[test]
fn fidelity_search_mixes_int4_and_int8_on_minilm() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let fp32 = minilm_fp32(dir.path());
    let out = dir.path().join("mixed.onnx");
    let o = smelt()
        .arg("compress")
        .arg(&fp32)
        .arg("-o")
        .arg(&out)
        .arg("--data")
        .arg(a.join("brown"))
        .arg("--tokenizer")
        .arg(a.join("minilm/tokenizer.json"))
        .args([
            "--limit",
            "32",
            "--min-fidelity",
            "0.995",
            "--bench-runs",
            "0",
        ])
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cands = v["candidates"].as_array().unwrap();
    let bytes_of = |name: &str| {
        cands.iter().find(|c| c["recipe"] == name).unwrap()["after"]["bytes"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(v["recipe"]["name"], "int4-int8-per-layer", "{cands:?}");
    let after = &v["after"];
    assert!(after["bytes"].as_u64().unwrap() < bytes_of("int8-weight-only"));
    assert!(after["fidelity"].as_f64().unwrap() >= 0.995, "{after}");
    let layers = v["precision"].as_array().unwrap();
    let at = |bits: u64| layers.iter().filter(|l| l["bits"] == bits).count();
    assert!(at(4) > 0 && at(8) > 0, "{layers:?}");
    for l in layers.iter().filter(|l| l["bits"] == 8) {
        assert!(
            l["reason"].as_str().unwrap().starts_with("kept at 8 bits"),
            "{l}"
        );
    }
    // On other sentences the result stays close to the original.
    let e = smelt()
        .arg("eval")
        .arg(&out)
        .arg("--reference")
        .arg(&fp32)
        .arg("--data")
        .arg(a.join("brown"))
        .arg("--tokenizer")
        .arg(a.join("minilm/tokenizer.json"))
        .args(["--skip", "32", "--limit", "32", "--json"])
        .output()
        .unwrap();
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let f: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    assert!(f["cosine"].as_f64().unwrap() >= 0.99, "{f}");
}

/// A candidate that misses only the accuracy budget is tried again with its recovery
/// fine-tuning (here quantization-aware training in place of the quantize stage).
#[test]
fn a_missed_accuracy_budget_is_recovered_by_fine_tuning() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("w4-tensor.toml");
    std::fs::write(
        &recipe,
        "name = \"w4-tensor\"\n[[stage]]\nkind = \"quantize\"\nweight_type = \"int4\"\n\
         granularity = \"tensor\"\n[recovery]\nkind = \"finetune\"\nqat = \"w4a8\"\n\
         max_steps = 300\nlr = 1e-4\n",
    )
    .unwrap();
    let out = dir.path().join("r.onnx");
    let o = compress_mnist(&out)
        .args(["--split", "train", "--bench-runs", "0", "--json"])
        .args(["--max-accuracy-drop", "0.05", "--candidates"])
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = v["candidates"].as_array().unwrap();
    assert_eq!(c.len(), 2, "{c:?}");
    assert!(c[0]["verdict"].as_str().unwrap().contains("loses"), "{c:?}");
    assert_eq!(c[1]["recipe"], "w4-tensor+finetune");
    assert_eq!(v["recipe"]["name"], "w4-tensor+finetune");
    assert_eq!(v["stages"][0]["kind"], "finetune");
    let drop = v["before"]["accuracy"].as_f64().unwrap() - v["after"]["accuracy"].as_f64().unwrap();
    assert!(drop <= 0.0005 + 1e-9, "{drop}");
}

/// Channel pruning with `per_layer = true` shares the channels out by measured sensitivity:
/// MNIST-8's first convolution loses fewer than the second, and the pruned model is more
/// accurate than with the same fraction everywhere.
#[test]
fn per_layer_channel_shares_beat_a_uniform_fraction() {
    let dir = tempfile::tempdir().unwrap();
    let mut acc = Vec::new();
    for per_layer in [false, true] {
        let recipe = dir.path().join(format!("p-{per_layer}.toml"));
        std::fs::write(
            &recipe,
            format!(
                "name = \"p\"\n[[stage]]\nkind = \"prune\"\npattern = \"channels\"\n\
                 criterion = \"taylor\"\nsparsity = 0.5\nper_layer = {per_layer}\n"
            ),
        )
        .unwrap();
        let out = dir.path().join(format!("p-{per_layer}.onnx"));
        let o = compress_mnist(&out)
            .args([
                "--split",
                "train",
                "--limit",
                "2000",
                "--bench-runs",
                "0",
                "--json",
            ])
            .arg("--recipe")
            .arg(&recipe)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let summary = v["stages"][0]["summary"].as_str().unwrap().to_string();
        if per_layer {
            assert!(
                summary.contains("Convolution28 38%") && summary.contains("Convolution110 62%"),
                "{summary}"
            );
        }
        acc.push(v["after"]["accuracy"].as_f64().unwrap());
    }
    assert!(acc[1] > acc[0] + 0.05, "{acc:?}");
}

/// Greedy ranking (on training images) holds for both of MNIST-8's convolutions under
/// ablation on held-out test images: with half the channels removed, the most important first
/// is clearly below the mean of random draws and the least important first clearly above.
/// (Magnitude fails this for the first convolution, whose channels come in redundant pairs.)
#[test]
fn greedy_channel_ranking_beats_random_under_ablation() {
    let dir = tempfile::tempdir().unwrap();
    let o = compress_mnist(&dir.path().join("g.onnx"))
        .args([
            "--split",
            "train",
            "--limit",
            "1000",
            "--bench-runs",
            "0",
            "--ablation",
            "--ablation-criterion",
            "greedy",
            "--json",
            "--recipe",
        ])
        .arg(repo_root().join("recipes/int8-static.toml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ablation = v["ablation"].as_array().unwrap();
    assert_eq!(ablation.len(), 2);
    for a in ablation {
        assert_eq!(a["better_than_random"], true, "{a}");
        let half = |c: usize| {
            a["curves"][c]["points"].as_array().unwrap().last().unwrap()[1]
                .as_f64()
                .unwrap()
        };
        let (most, random, least) = (half(0), half(1), half(2));
        assert!(most + 0.05 < random && random + 0.05 < least, "{a}");
        // The random baseline is a mean of draws that differ, within their range.
        let spread = a["curves"][1]["spread"].as_array().unwrap();
        let points = a["curves"][1]["points"].as_array().unwrap();
        assert_eq!(spread.len(), points.len());
        let f = |v: &serde_json::Value, i: usize| v[i].as_f64().unwrap();
        for (p, r) in points.iter().zip(spread) {
            assert!(f(r, 0) <= f(p, 1) && f(p, 1) <= f(r, 1), "{p} {r}");
        }
        let last = spread.last().unwrap();
        assert!(
            f(last, 1) - f(last, 0) > 0.01,
            "ten draws removing half the channels all scored the same"
        );
    }
}
