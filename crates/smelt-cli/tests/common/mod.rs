//! Shared test support: real assets (fetched on demand, failing loudly), the onnxruntime
//! reference, and .npy files for exchanging tensors with it.
#![allow(dead_code)]

pub mod nets;

use smelt_tensor::Tensor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn script_output(script: &str, env_var: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env_var) {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let out = Command::new(repo_root().join(script))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed (assets are required, run it by hand to see why):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The asset cache; runs scripts/fetch-assets.sh (cached, checksummed) once per test binary.
pub fn assets() -> &'static Path {
    static A: OnceLock<PathBuf> = OnceLock::new();
    A.get_or_init(|| script_output("scripts/fetch-assets.sh", "SMELT_ASSETS"))
}

/// The Python with onnxruntime; runs scripts/setup-python.sh once per test binary.
pub fn python() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| script_output("scripts/setup-python.sh", "SMELT_PYTHON"))
}

pub fn smelt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smelt"))
}

/// Op counts of onnxruntime's optimized graph of `model`: which QDQ patterns it fused.
pub fn ort_optimized_ops(model: &Path) -> std::collections::BTreeMap<String, u64> {
    let out = Command::new(python())
        .arg(repo_root().join("scripts/ort_run.py"))
        .arg(model)
        .arg("--optimized-ops")
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "onnxruntime failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("op counts as JSON")
}

/// Runs `model` in onnxruntime on the given inputs; returns outputs by name.
pub fn ort_run(model: &Path, inputs: &[(&str, &Tensor)], dir: &Path) -> Vec<(String, Tensor)> {
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("scripts/ort_run.py")).arg(model);
    for (name, t) in inputs {
        let p = dir.join(format!("in_{name}.npy"));
        write_npy(&p, t);
        cmd.arg("--input").arg(format!("{name}={}", p.display()));
    }
    let out_dir = dir.join("ort_out");
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = cmd
        .arg("--output-dir")
        .arg(&out_dir)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "onnxruntime failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model = smelt_onnx::load(model).unwrap();
    model
        .graph
        .outputs
        .iter()
        .map(|o| {
            let f: String = o
                .name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            (o.name.clone(), read_npy(&out_dir.join(format!("{f}.npy"))))
        })
        .collect()
}

pub fn write_npy(path: &Path, t: &Tensor) {
    smelt_data::npy::write(path, t).unwrap_or_else(|e| panic!("{e}"));
}

pub fn read_npy(path: &Path) -> Tensor {
    smelt_data::npy::read(path).unwrap_or_else(|e| panic!("{e}"))
}

/// Largest row-wise normwise relative difference: max |a - b| over a row divided by max |b|
/// over that row. (Elementwise relative error is meaningless for logits near zero when others
/// in the same row are in the thousands, as MNIST-8's are on 0..255 inputs.)
pub fn max_rel_diff(a: &[f32], b: &[f32], row: usize) -> f32 {
    assert_eq!(a.len(), b.len());
    a.chunks(row)
        .zip(b.chunks(row))
        .map(|(x, y)| {
            let scale = y
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()))
                .max(f32::MIN_POSITIVE);
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max)
                / scale
        })
        .fold(0.0, f32::max)
}

/// Runs `smelt ARGS PATHS... --json` and returns its JSON; fails the test on a non-zero exit.
pub fn run_json(args: &[&str], paths: &[&Path]) -> serde_json::Value {
    let mut c = smelt();
    c.args(args);
    for p in paths {
        c.arg(p);
    }
    let out = c.arg("--json").output().unwrap();
    assert!(
        out.status.success(),
        "smelt {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `smelt eval` top-1 accuracy of an MNIST model on the 10,000 test images.
pub fn smelt_accuracy(model: &Path) -> f64 {
    let v = run_json(
        &["eval"],
        &[model, Path::new("--data"), &assets().join("mnist")],
    );
    assert_eq!(v["samples"], 10000);
    v["accuracy"].as_f64().unwrap()
}

/// The MiniLM graph with its int8 weights restored to fp32 (`convert --dequantize-weights`).
pub fn minilm_fp32(dir: &Path) -> PathBuf {
    let out = dir.join("minilm-fp32.onnx");
    run_json(
        &["convert", "--dequantize-weights"],
        &[
            &assets().join("minilm-int8/model.onnx"),
            Path::new("-o"),
            &out,
        ],
    );
    out
}

/// onnxruntime's top-1 accuracy of an MNIST model on the 10,000 test images.
pub fn ort_mnist_accuracy(model: &Path) -> f64 {
    let o = Command::new(python())
        .arg(repo_root().join("scripts/ort_eval.py"))
        .arg(model)
        .args(["--task", "mnist", "--data"])
        .arg(assets().join("mnist"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["samples"], 10000);
    r["accuracy"].as_f64().unwrap()
}
