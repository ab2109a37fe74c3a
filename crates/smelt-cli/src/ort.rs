//! onnxruntime's latency of a model and its compressed form, for the reports: the output must
//! run fast in onnxruntime too, not only in smelt's engine. onnxruntime is a Python package,
//! so this runs `scripts/ort_bench.py` (compiled into the binary) with a Python the user names.
//! The two models are timed in separate processes, in alternation over three rounds: within
//! one process, the idle threads of one session spin and slow the other (measured on MNIST-8:
//! 2.6x one time, 0.8x the next).

use smelt_ir::{Model, Pass};
use smelt_tensor::{bail, Error, Result};
use std::path::Path;
use std::process::Command;

const BENCH: &str = include_str!("../../../scripts/ort_bench.py");

/// Fails, naming the problem, unless `python` imports onnxruntime and numpy: checked before a
/// long run rather than at its end.
pub fn check(python: &Path) -> Result<()> {
    python_stdout(
        python,
        &["-c", "import onnxruntime, numpy"],
        "cannot import onnxruntime and numpy",
    )
    .map(drop)
}

/// The standard output of `python ARGS`; a failure names `what` went wrong and the last line
/// Python printed to stderr.
fn python_stdout<S: AsRef<std::ffi::OsStr>>(
    python: &Path,
    args: &[S],
    what: &str,
) -> Result<Vec<u8>> {
    let out = Command::new(python)
        .args(args)
        .output()
        .map_err(|e| Error::Input(format!("--ort-python {}: {e}", python.display())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            Input,
            "--ort-python {} {what}: {}",
            python.display(),
            err.lines().last().unwrap_or("no message")
        );
    }
    Ok(out.stdout)
}

/// Median ms in onnxruntime of (`before`, `after`) at each of `batches`, on the threads smelt
/// uses. The models are written once for all batch sizes.
pub fn latency_pairs(
    python: &Path,
    before: &Model,
    after: &Model,
    batches: &[usize],
    runs: usize,
) -> Result<Vec<(f64, f64)>> {
    let dir = tempfile::tempdir().map_err(|e| Error::io("a temporary folder", e))?;
    let script = dir.path().join("ort_bench.py");
    std::fs::write(&script, BENCH).map_err(|e| Error::io(script.display().to_string(), e))?;
    let save = |m: &Model, name: &str| -> Result<std::path::PathBuf> {
        // A fixed batch of 1 is made dynamic, as smelt's own timing does.
        let m = smelt_ir::passes::DynamicBatch::default()
            .run(m.clone())
            .map_or_else(|_| m.clone(), |r| r.0);
        let p = dir.path().join(name);
        smelt_onnx::save(&m, &p)?;
        Ok(p)
    };
    let (b, a) = (save(before, "before.onnx")?, save(after, "after.onnx")?);
    let runs = runs.max(1).to_string();
    let threads = rayon::current_num_threads().to_string();
    let median = |model: &Path, batch: &str| -> Result<f64> {
        let args: [&std::ffi::OsStr; 8] = [
            script.as_os_str(),
            model.as_os_str(),
            "--batch".as_ref(),
            batch.as_ref(),
            "--runs".as_ref(),
            runs.as_ref(),
            "--threads".as_ref(),
            threads.as_ref(),
        ];
        let out = python_stdout(python, &args, "could not time the model in onnxruntime")?;
        let v: serde_json::Value = serde_json::from_slice(&out)
            .map_err(|e| Error::Invalid(format!("onnxruntime timing output: {e}")))?;
        v["median_ms"]
            .as_f64()
            .ok_or_else(|| Error::Invalid(format!("onnxruntime timing output: {v}")))
    };
    let mid = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[1]
    };
    batches
        .iter()
        .map(|batch| {
            let batch = batch.to_string();
            let (mut tb, mut ta) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                tb.push(median(&b, &batch)?);
                ta.push(median(&a, &batch)?);
            }
            Ok((mid(tb), mid(ta)))
        })
        .collect()
}
