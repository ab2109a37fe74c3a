//! Same command, inputs and seed: byte-identical outputs, run to run and at 1 or 2 threads.
//! And an interrupted command never leaves a partial model behind.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// The tests here run one at a time: the kill test times runs, and the others would skew it.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `smelt ARGS -o OUT --threads T` and returns the bytes of OUT.
fn output_of(args: &[&str], out: &Path, threads: usize) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    let o = smelt()
        .args(args)
        .arg("-o")
        .arg(out)
        .args(["--threads", &threads.to_string()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?} --threads {threads} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(out).unwrap()
}

fn check_deterministic(name: &str, args: &[&str]) {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(format!("{name}.onnx"));
    let first = output_of(args, &out, 1);
    assert_eq!(
        first,
        output_of(args, &out, 1),
        "{name}: two runs at 1 thread differ"
    );
    assert_eq!(
        first,
        output_of(args, &out, 2),
        "{name}: 1 and 2 threads differ"
    );
}

fn mnist8() -> String {
    assets().join("mnist-8/model.onnx").display().to_string()
}

fn mnist() -> String {
    assets().join("mnist").display().to_string()
}

#[test]
fn quantize_is_deterministic() {
    let (m, d) = (mnist8(), mnist());
    check_deterministic(
        "static",
        &[
            "quantize",
            &m,
            "--calib",
            &d,
            "--split",
            "train",
            "--limit",
            "200",
            "--observer",
            "entropy",
            "--bias-correction",
        ],
    );
}

#[test]
fn prune_is_deterministic() {
    let (m, d) = (mnist8(), mnist());
    check_deterministic("magnitude", &["prune", &m, "--sparsity", "0.5"]);
    check_deterministic(
        "taylor-channels",
        &[
            "prune",
            &m,
            "--pattern",
            "channels",
            "--criterion",
            "taylor",
            "--data",
            &d,
            "--limit",
            "128",
            "--bench-runs",
            "0",
        ],
    );
}

#[test]
fn finetune_is_deterministic() {
    let (m, d) = (mnist8(), mnist());
    check_deterministic(
        "finetune",
        &[
            "finetune", &m, "--data", &d, "--split", "train", "--limit", "512", "--batch", "64",
            "--epochs", "1", "--lr", "0.01", "--seed", "3",
        ],
    );
}

/// A model file is complete if smelt loads it and it has the original's inputs and outputs.
fn assert_complete_or_absent(out: &Path, what: &str) {
    if out.exists() {
        let m = smelt_onnx::load(out)
            .unwrap_or_else(|e| panic!("{what}: a partial output was left behind: {e}"));
        assert_eq!(m.graph.outputs.len(), 1, "{what}");
    }
}

/// Kills smelt (SIGKILL: nothing can be cleaned up) at moments spread over a full run of each
/// command, including the end where the model is written: the destination holds either nothing
/// or a complete model, never a prefix of one.
#[test]
fn killed_runs_never_leave_a_partial_model() {
    let (m, d) = (mnist8(), mnist());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let commands: [Vec<&str>; 2] = [
        vec![
            "quantize",
            &m,
            "--calib",
            &d,
            "--limit",
            "300",
            "--observer",
            "entropy",
        ],
        vec![
            "finetune", &m, "--data", &d, "--split", "train", "--limit", "640", "--batch", "64",
            "--epochs", "2",
        ],
    ];
    let spawn = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_smelt"))
            .args(args)
            .arg("-o")
            .arg(&out)
            .args(["--threads", "1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let _one_at_a_time = serial();
    let mut interrupted = 0;
    for args in &commands {
        // The shorter of two full runs, so that most kills land before the end.
        let mut full = std::time::Duration::MAX;
        for _ in 0..2 {
            let _ = std::fs::remove_file(&out);
            let t = std::time::Instant::now();
            assert!(spawn(args).wait().unwrap().success(), "{args:?}");
            full = full.min(t.elapsed());
            assert_complete_or_absent(&out, args[0]);
        }
        for k in 0..10 {
            let _ = std::fs::remove_file(&out);
            let mut child = spawn(args);
            let at = full.mul_f64(0.05 + 0.09 * k as f64);
            std::thread::sleep(at);
            let _ = child.kill();
            let status = child.wait().unwrap();
            interrupted += usize::from(!status.success());
            assert_complete_or_absent(&out, &format!("{} killed after {at:?}", args[0]));
        }
    }
    // Most runs must really have been cut short, or the test proves nothing.
    assert!(
        interrupted >= 10,
        "only {interrupted} of 20 runs were interrupted"
    );
}
