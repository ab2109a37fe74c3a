//! Runs every test of the ONNX node suite (onnx==1.22.0 wheel, fetched by
//! scripts/fetch-assets.sh) through smelt's engine and classifies it:
//! pass, mismatch (ran, wrong numbers), unsupported (an op/dtype/attribute smelt lacks),
//! error (smelt rejected a valid model), crash (a panic: always a bug).
//!
//! usage: smelt-conformance [--suite DIR] [--filter SUBSTR] [--report FILE] [--check tools/conformance/passing.txt]
//!                          [--write-passing FILE] [-v]
//! With --check, fails (exit 1) if the pass count is below the floor in that file's first line
//! or any test listed there no longer passes.

use smelt_engine::Session;
use smelt_tensor::{Data, Error, Tensor};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Status {
    Pass,
    Mismatch,
    Unsupported,
    Error,
    Crash,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut suite: Option<PathBuf> = None;
    let mut filter = String::new();
    let mut report: Option<PathBuf> = None;
    let mut check: Option<PathBuf> = None;
    let mut write_passing: Option<PathBuf> = None;
    let mut verbose = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--suite" => suite = args.next().map(PathBuf::from),
            "--filter" => filter = args.next().unwrap_or_default(),
            "--report" => report = args.next().map(PathBuf::from),
            "--check" => check = args.next().map(PathBuf::from),
            "--write-passing" => write_passing = args.next().map(PathBuf::from),
            "-v" | "--verbose" => verbose = true,
            other => {
                eprintln!("smelt-conformance: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let suite = suite.unwrap_or_else(|| assets_dir().join("onnx-node-tests"));
    let mut tests: Vec<PathBuf> = match std::fs::read_dir(&suite) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("model.onnx").is_file())
            .collect(),
        Err(e) => {
            eprintln!(
                "smelt-conformance: cannot read the suite at {}: {e}; run scripts/fetch-assets.sh",
                suite.display()
            );
            std::process::exit(2);
        }
    };
    tests.sort();
    tests.retain(|p| p.file_name().unwrap().to_string_lossy().contains(&filter));
    if tests.is_empty() {
        eprintln!("smelt-conformance: no tests found in {}", suite.display());
        std::process::exit(2);
    }
    // Panics inside a test are caught and counted; keep their messages out of the summary.
    std::panic::set_hook(Box::new(|_| {}));
    let mut lines = Vec::new();
    let mut passing = Vec::new();
    let mut counts = [0usize; 5];
    for t in &tests {
        let name = t.file_name().unwrap().to_string_lossy().to_string();
        let (st, msg) = match std::panic::catch_unwind(|| run_test(t)) {
            Ok(r) => r,
            Err(_) => (Status::Crash, "panicked".to_string()),
        };
        counts[st as usize] += 1;
        if st == Status::Pass {
            passing.push(name.clone());
        }
        let line = format!("{:<12} {name}  {msg}", format!("{st:?}").to_lowercase());
        if verbose {
            println!("{line}");
        }
        lines.push(line);
    }
    let total = tests.len();
    println!(
        "conformance: {} tests: {} pass, {} mismatch, {} unsupported, {} error, {} crash",
        total, counts[0], counts[1], counts[2], counts[3], counts[4]
    );
    if let Some(r) = report {
        let _ = std::fs::write(&r, lines.join("\n") + "\n");
    }
    if let Some(w) = write_passing {
        let body = format!("{}\n{}\n", counts[0], passing.join("\n"));
        let _ = std::fs::write(&w, body);
    }
    if let Some(c) = check {
        let text = std::fs::read_to_string(&c).unwrap_or_else(|e| {
            eprintln!("smelt-conformance: cannot read {}: {e}", c.display());
            std::process::exit(2)
        });
        let mut it = text.lines();
        let floor: usize = it.next().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
        let lost: Vec<&str> = it
            .filter(|l| !l.is_empty() && !passing.iter().any(|p| p == l))
            .collect();
        let mut ok = true;
        if counts[0] < floor {
            eprintln!(
                "conformance: pass count {} is below the floor {floor}",
                counts[0]
            );
            ok = false;
        }
        if !lost.is_empty() && filter.is_empty() {
            eprintln!(
                "conformance: {} tests that passed before now fail: {}",
                lost.len(),
                lost.join(", ")
            );
            ok = false;
        }
        if counts[4] > 0 {
            eprintln!("conformance: {} tests crashed (panics are bugs)", counts[4]);
            ok = false;
        }
        if !ok {
            std::process::exit(1);
        }
        println!("conformance: floor {floor} holds");
    }
}

fn assets_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SMELT_ASSETS") {
        return PathBuf::from(d);
    }
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache")
        });
    cache.join("smelt/assets")
}

fn classify(e: &Error) -> Status {
    match e {
        Error::Unsupported(_) => Status::Unsupported,
        _ => Status::Error,
    }
}

fn run_test(dir: &Path) -> (Status, String) {
    let model = match smelt_onnx::load(&dir.join("model.onnx")) {
        Ok(m) => m,
        Err(e) => return (classify(&e), format!("load: {e}")),
    };
    let inputs: Vec<String> = model
        .graph
        .runtime_inputs()
        .map(|v| v.name.clone())
        .collect();
    let outputs: Vec<String> = model.graph.outputs.iter().map(|v| v.name.clone()).collect();
    let session = match Session::new(model) {
        Ok(s) => s,
        Err(e) => return (classify(&e), e.to_string()),
    };
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    sets.sort();
    if sets.is_empty() {
        return (Status::Error, "no test data sets".into());
    }
    for set in sets {
        let mut feed = Vec::new();
        for (i, name) in inputs.iter().enumerate() {
            match smelt_onnx::load_tensor(&set.join(format!("input_{i}.pb"))) {
                Ok(t) => feed.push((name.as_str(), t)),
                Err(e) => return (Status::Unsupported, format!("input {i}: {e}")),
            }
        }
        let outs = match session.run(&feed) {
            Ok(o) => o,
            Err(e) => return (classify(&e), e.to_string()),
        };
        for (i, name) in outputs.iter().enumerate() {
            let want = match smelt_onnx::load_tensor(&set.join(format!("output_{i}.pb"))) {
                Ok(t) => t,
                Err(e) => return (Status::Unsupported, format!("expected output {i}: {e}")),
            };
            let Some((_, got)) = outs.iter().find(|(n, _)| n == name) else {
                return (Status::Error, format!("output {name} missing"));
            };
            if let Err(m) = compare(&want, got) {
                return (Status::Mismatch, format!("output {name}: {m}"));
            }
        }
    }
    (Status::Pass, String::new())
}

/// The ONNX backend tests' tolerance: |got - want| <= atol + rtol * |want|, NaN equals NaN.
fn compare(want: &Tensor, got: &Tensor) -> Result<(), String> {
    if want.shape() != got.shape() {
        return Err(format!(
            "shape {:?}, expected {:?}",
            got.shape(),
            want.shape()
        ));
    }
    if want.dtype() != got.dtype() {
        return Err(format!("dtype {}, expected {}", got.dtype(), want.dtype()));
    }
    if let (Data::Str(a), Data::Str(b)) = (want.data(), got.data()) {
        return if a == b {
            Ok(())
        } else {
            Err("strings differ".into())
        };
    }
    let (rtol, atol) = match want.dtype() {
        smelt_tensor::DType::F16 | smelt_tensor::DType::BF16 => (1e-2, 1e-3),
        _ => (1e-3, 1e-5),
    };
    let a = want.to_f64_vec().map_err(|e| e.to_string())?;
    let b = got.to_f64_vec().map_err(|e| e.to_string())?;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let ok = (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= atol + rtol * x.abs();
        if !ok {
            return Err(format!("element {i}: got {y}, expected {x}"));
        }
    }
    Ok(())
}
