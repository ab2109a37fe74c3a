//! The opset upgrade pass against real data: every ONNX node test smelt passes at an opset
//! below 21 must still pass after upgrading to 21 (or be refused by name), and real models
//! must give the same numbers before and after.

use smelt_engine::Session;
use smelt_ir::passes::UpgradeOpset;
use smelt_ir::{Model, Pass};
use smelt_tensor::{DType, Data, Error, Tensor};
use std::path::{Path, PathBuf};

/// `$SMELT_ASSETS`, else `${XDG_CACHE_HOME:-$HOME/.cache}/smelt/assets`; panics when missing so
/// the tests fail instead of skipping.
fn assets() -> PathBuf {
    let dir = match std::env::var_os("SMELT_ASSETS") {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .expect("neither XDG_CACHE_HOME nor HOME is set")
            .join("smelt/assets"),
    };
    assert!(
        dir.is_dir(),
        "test assets not found at {}: run scripts/fetch-assets.sh",
        dir.display()
    );
    dir
}

/// Upgrades and round-trips through the file format, so rewritten nodes are valid on disk.
/// Also returns the node rewrites the pass reported (beyond the opset/IR version lines).
fn upgrade(model: Model, to: i64) -> Result<(Model, Vec<String>), Error> {
    let (m, rec) = UpgradeOpset { to }.run(model)?;
    let bytes = smelt_onnx::encode(&m)?;
    let m = smelt_onnx::decode(&bytes, None, &Default::default())?;
    let rewrites = rec
        .changes
        .into_iter()
        .filter(|c| !c.starts_with("default-domain opset") && !c.starts_with("IR version"))
        .collect();
    Ok((m, rewrites))
}

/// The conformance runner's tolerance: |got - want| <= atol + rtol * |want|, NaN equals NaN.
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
        DType::F16 | DType::BF16 => (1e-2, 1e-3),
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

/// Runs `model` on every test_data_set_* under `dir` and checks the expected outputs.
fn check_data_sets(model: Model, dir: &Path) -> Result<(), String> {
    let inputs: Vec<String> = model
        .graph
        .runtime_inputs()
        .map(|v| v.name.clone())
        .collect();
    let outputs: Vec<String> = model.graph.outputs.iter().map(|v| v.name.clone()).collect();
    let session = Session::new(model).map_err(|e| format!("session: {e}"))?;
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    sets.sort();
    if sets.is_empty() {
        return Err("no test data sets".into());
    }
    for set in sets {
        let mut feed = Vec::new();
        for (i, name) in inputs.iter().enumerate() {
            let t = smelt_onnx::load_tensor(&set.join(format!("input_{i}.pb")))
                .map_err(|e| format!("input {i}: {e}"))?;
            feed.push((name.as_str(), t));
        }
        let outs = session.run(&feed).map_err(|e| format!("run: {e}"))?;
        for (i, name) in outputs.iter().enumerate() {
            let want = smelt_onnx::load_tensor(&set.join(format!("output_{i}.pb")))
                .map_err(|e| format!("expected output {i}: {e}"))?;
            let Some((_, got)) = outs.iter().find(|(n, _)| n == name) else {
                return Err(format!("output {name} missing"));
            };
            compare(&want, got).map_err(|m| format!("output {name}: {m}"))?;
        }
    }
    Ok(())
}

/// Ops the pass refuses in the suite, with the reason: each is a real meaning change it
/// cannot express exactly (see the pass's docs).
const EXPECTED_REFUSALS: &[&str] = &[];

#[test]
fn node_suite_still_passes_after_upgrading_to_21() {
    let suite = assets().join("onnx-node-tests");
    let listed = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("passing.txt"))
        .expect("tools/conformance/passing.txt");
    let mut checked = 0;
    let mut rewritten = 0;
    // Tests whose rewritten nodes matter: only bumping the opset number breaks them.
    let mut naive_breaks = 0;
    let mut refused: Vec<String> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for name in listed.lines().skip(1).filter(|l| !l.is_empty()) {
        let dir = suite.join(name);
        let model = smelt_onnx::load(&dir.join("model.onnx"))
            .unwrap_or_else(|e| panic!("{name}: a passing test no longer loads: {e}"));
        if model.onnx_opset() >= 21 {
            continue;
        }
        let mut naive = model.clone();
        match upgrade(model, 21) {
            Ok((m, rewrites)) => {
                assert_eq!(m.onnx_opset(), 21, "{name}");
                checked += 1;
                if !rewrites.is_empty() {
                    rewritten += 1;
                    for o in naive.opsets.iter_mut().filter(|o| o.domain.is_empty()) {
                        o.version = 21;
                    }
                    eprintln!("  {name}: {}", rewrites.join(" / "));
                    if check_data_sets(naive, &dir).is_err() {
                        eprintln!("    ^ breaks with only the opset raised");
                        naive_breaks += 1;
                    }
                }
                if let Err(e) = check_data_sets(m, &dir) {
                    failures.push(format!("{name}: {e}"));
                }
            }
            Err(Error::Unsupported(msg)) => refused.push(format!("{name}: {msg}")),
            Err(e) => failures.push(format!("{name}: upgrade failed: {e}")),
        }
    }
    eprintln!(
        "upgrade-opset over the node suite: {checked} upgraded and checked ({rewritten} with \
         rewritten nodes, {naive_breaks} of which fail with only the opset number raised), \
         {} refused, {} failed",
        refused.len(),
        failures.len()
    );
    for r in &refused {
        eprintln!("  refused {r}");
    }
    assert!(
        failures.is_empty(),
        "{} tests fail after the upgrade:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked >= 880, "only {checked} tests upgraded");
    assert!(
        naive_breaks >= 20,
        "only {naive_breaks} tests depend on the rewrites"
    );
    let unexpected: Vec<&String> = refused
        .iter()
        .filter(|r| {
            !EXPECTED_REFUSALS
                .iter()
                .any(|e| r.starts_with(&format!("{e}:")))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected refusals: {unexpected:#?}"
    );
}
