//! The opset upgrade pass against real data: every ONNX node test smelt passes at an opset
//! below 21 must still pass after upgrading to 21 (or be refused by name), and real models
//! must give the same numbers before and after.

use smelt_engine::Session;
use smelt_ir::passes::UpgradeOpset;
use smelt_ir::{Attr, Dim, Graph, Model, Node, OpsetImport, Pass, ValueInfo};
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
    // The suite is mostly written at recent opsets; the DFT-17 tests are among the few whose
    // old form means something else at 21. The hand-built models below cover the rest.
    assert!(
        naive_breaks >= 4,
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

// ---------------------------------------------------------------------------------------------
// Real models

fn run(model: &Model, feed: &[(&str, Tensor)]) -> Vec<(String, Tensor)> {
    let s = Session::new(model.clone()).expect("session");
    s.run(feed).expect("run")
}

#[test]
fn mnist8_upgrades_to_21_with_identical_outputs() {
    let dir = assets().join("mnist-8");
    let model = smelt_onnx::load(&dir.join("model.onnx")).unwrap();
    assert_eq!(model.onnx_opset(), 8);
    let x = smelt_onnx::load_tensor(&dir.join("test_data_set_0/input_0.pb")).unwrap();
    let want = smelt_onnx::load_tensor(&dir.join("test_data_set_0/output_0.pb")).unwrap();
    let input = model.graph.runtime_inputs().next().unwrap().name.clone();
    let before = run(&model, &[(&input, x.clone())]);
    let (up, rec) = UpgradeOpset { to: 21 }.run(model).unwrap();
    assert_eq!(up.onnx_opset(), 21);
    assert_eq!(up.ir_version, 10);
    assert!(rec
        .changes
        .iter()
        .any(|c| c == "default-domain opset 8 -> 21"));
    let up =
        smelt_onnx::decode(&smelt_onnx::encode(&up).unwrap(), None, &Default::default()).unwrap();
    let after = run(&up, &[(&input, x)]);
    compare(&want, &after[0].1).unwrap();
    assert_eq!(before, after, "outputs changed bit-wise");
}

#[test]
fn minilm_upgrades_to_21_with_identical_outputs() {
    let model = smelt_onnx::load(&assets().join("minilm-int8/model.onnx")).unwrap();
    assert_eq!(model.onnx_opset(), 17);
    let (b, l) = (2usize, 12usize);
    let mut seed = 12345u64;
    let ids: Vec<i64> = (0..b * l)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) % 1000) as i64
        })
        .collect();
    let int = |name: &str| {
        model
            .graph
            .value_info(name)
            .and_then(|v| v.dtype)
            .unwrap_or(DType::I64)
    };
    let t = |name: &str, v: Vec<i64>| {
        (
            name.to_string(),
            Tensor::from_vec(vec![b, l], v)
                .unwrap()
                .cast(int(name))
                .unwrap(),
        )
    };
    let feed = [
        t("input_ids", ids),
        t("attention_mask", vec![1; b * l]),
        t("token_type_ids", vec![0; b * l]),
    ];
    let feed: Vec<(&str, Tensor)> = feed.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let before = run(&model, &feed);
    let (up, _) = UpgradeOpset { to: 21 }.run(model).unwrap();
    assert_eq!(up.onnx_opset(), 21);
    let after = run(&up, &feed);
    assert!(!before.is_empty());
    assert_eq!(before, after, "outputs changed bit-wise");
}

// ---------------------------------------------------------------------------------------------
// Hand-built old-opset nodes: the suite rarely uses old forms, so each rewrite is checked here,
// by running the old model (the engine implements old semantics per opset) against the
// upgraded one, or against the same computation written natively at the new opset.

fn vi(name: &str, t: &Tensor) -> ValueInfo {
    ValueInfo::new(
        name,
        t.dtype(),
        t.shape().iter().map(|&d| Dim::Fixed(d)).collect(),
    )
}

/// A one-node model: `feed` are runtime inputs (declared with shapes), `inits` constants.
fn one_node(opset: i64, node: Node, feed: &[(&str, Tensor)], inits: &[(&str, Tensor)]) -> Model {
    let mut g = Graph {
        inputs: feed.iter().map(|(n, t)| vi(n, t)).collect(),
        outputs: node
            .outputs
            .iter()
            .map(|o| ValueInfo {
                name: o.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    for (n, t) in inits {
        g.initializers.insert(n.to_string(), t.clone());
    }
    g.nodes.push(node);
    Model {
        ir_version: 3,
        opsets: vec![OpsetImport {
            domain: String::new(),
            version: opset,
        }],
        graph: g,
        ..Default::default()
    }
}

fn floats(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_add(0x9E3779B97F4A7C15);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(shape.to_vec(), v).unwrap()
}

fn i64t(v: &[i64]) -> Tensor {
    Tensor::from_vec(vec![v.len()], v.to_vec()).unwrap()
}

fn f32t(v: &[f32]) -> Tensor {
    Tensor::from_vec(vec![v.len()], v.to_vec()).unwrap()
}

fn upgraded(model: &Model, to: i64) -> Model {
    let (m, _) = upgrade(model.clone(), to).unwrap_or_else(|e| panic!("upgrade failed: {e}"));
    assert_eq!(m.onnx_opset(), to);
    m
}

/// Old model vs its upgrade, bit for bit; also checks the upgraded graph is really different.
fn same_after_upgrade(model: Model, feed: &[(&str, Tensor)], to: i64) {
    let before = run(&model, feed);
    let up = upgraded(&model, to);
    let after = run(&up, feed);
    assert_eq!(
        before,
        after,
        "{:?} changed its outputs",
        model.graph.nodes[0].label()
    );
}

fn node(op: &str, ins: &[&str], outs: &[&str], attrs: Vec<(&str, Attr)>) -> Node {
    let mut n = Node::new(op, "n", ins, outs);
    for (k, v) in attrs {
        n.attrs.insert(k.to_string(), v);
    }
    n
}

fn s(v: &str) -> Attr {
    Attr::String(v.as_bytes().to_vec())
}

#[test]
fn softmax_family_keeps_its_2d_meaning() {
    let x = floats(&[2, 3, 4], 1);
    for op in ["Softmax", "LogSoftmax", "Hardmax"] {
        for axis in [None, Some(0), Some(1), Some(2), Some(-1), Some(-2)] {
            let attrs = axis
                .map(|a| vec![("axis", Attr::Int(a))])
                .unwrap_or_default();
            let m = one_node(
                11,
                node(op, &["x"], &["y"], attrs),
                &[("x", x.clone())],
                &[],
            );
            same_after_upgrade(m, &[("x", x.clone())], 21);
        }
    }
    // Without a declared rank the pass cannot tell the last axis: it takes the general route.
    let mut m = one_node(
        12,
        node("Softmax", &["x"], &["y"], vec![]),
        &[("x", x.clone())],
        &[],
    );
    m.graph.inputs[0].shape = None;
    same_after_upgrade(m.clone(), &[("x", x.clone())], 13);
    let up = upgraded(&m, 13);
    let ops: Vec<&str> = up.graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Shape", "Flatten", "Softmax", "Reshape"]);
    // Only raising the number would change the result (axis 1 of 3 is not the last).
    let mut naive = m;
    naive.opsets[0].version = 13;
    assert_ne!(run(&naive, &[("x", x.clone())]), run(&up, &[("x", x)]));
}

#[test]
fn attributes_that_became_inputs() {
    let x = floats(&[2, 1, 3, 4], 2);
    let feed = [("x", x.clone())];
    let cases: Vec<(i64, Node)> = vec![
        (
            11,
            node(
                "Squeeze",
                &["x"],
                &["y"],
                vec![("axes", Attr::Ints(vec![1]))],
            ),
        ),
        (11, node("Squeeze", &["x"], &["y"], vec![])),
        (
            12,
            node(
                "Unsqueeze",
                &["x"],
                &["y"],
                vec![("axes", Attr::Ints(vec![0, -1]))],
            ),
        ),
        (
            12,
            node(
                "ReduceSum",
                &["x"],
                &["y"],
                vec![("axes", Attr::Ints(vec![2])), ("keepdims", Attr::Int(0))],
            ),
        ),
        (12, node("ReduceSum", &["x"], &["y"], vec![])),
        (
            17,
            node(
                "ReduceMean",
                &["x"],
                &["y"],
                vec![("axes", Attr::Ints(vec![0, 3]))],
            ),
        ),
        (
            17,
            node(
                "ReduceMax",
                &["x"],
                &["y"],
                vec![("axes", Attr::Ints(vec![-1]))],
            ),
        ),
        (
            13,
            node(
                "ReduceLogSumExp",
                &["x"],
                &["y"],
                vec![("axes", Attr::Ints(vec![2]))],
            ),
        ),
        (
            12,
            node(
                "Split",
                &["x"],
                &["a", "b"],
                vec![("axis", Attr::Int(3)), ("split", Attr::Ints(vec![1, 3]))],
            ),
        ),
        (
            12,
            node("Split", &["x"], &["a", "b"], vec![("axis", Attr::Int(3))]),
        ),
        (
            1,
            node("Split", &["x"], &["a", "b"], vec![("axis", Attr::Int(0))]),
        ),
        (
            9,
            node(
                "Slice",
                &["x"],
                &["y"],
                vec![
                    ("starts", Attr::Ints(vec![1, -3])),
                    ("ends", Attr::Ints(vec![3, i64::MAX])),
                    ("axes", Attr::Ints(vec![2, 3])),
                ],
            ),
        ),
        (
            9,
            node(
                "Slice",
                &["x"],
                &["y"],
                vec![
                    ("starts", Attr::Ints(vec![0, 0, 1])),
                    ("ends", Attr::Ints(vec![1, 1, 2])),
                ],
            ),
        ),
        (
            10,
            node(
                "Pad",
                &["x"],
                &["y"],
                vec![
                    ("pads", Attr::Ints(vec![0, 0, 1, 2, 0, 0, 2, 1])),
                    ("value", Attr::Float(1.5)),
                ],
            ),
        ),
        (
            10,
            node(
                "Pad",
                &["x"],
                &["y"],
                vec![
                    ("pads", Attr::Ints(vec![0, 0, 1, 2, 0, 0, 1, 1])),
                    ("mode", s("reflect")),
                ],
            ),
        ),
        (
            1,
            node(
                "Pad",
                &["x"],
                &["y"],
                vec![("paddings", Attr::Ints(vec![0, 0, 1, 0, 0, 0, 0, 2]))],
            ),
        ),
        (
            10,
            node(
                "Clip",
                &["x"],
                &["y"],
                vec![("min", Attr::Float(-0.5)), ("max", Attr::Float(0.75))],
            ),
        ),
        (
            10,
            node("Clip", &["x"], &["y"], vec![("max", Attr::Float(0.25))]),
        ),
        (
            9,
            node("TopK", &["x"], &["v", "i"], vec![("k", Attr::Int(2))]),
        ),
        (
            11,
            node("Dropout", &["x"], &["y"], vec![("ratio", Attr::Float(0.3))]),
        ),
        (
            7,
            node(
                "Dropout",
                &["x"],
                &["y", "mask"],
                vec![("ratio", Attr::Float(0.3))],
            ),
        ),
        (3, node("Concat", &["x", "x"], &["y"], vec![])),
        (
            4,
            node(
                "Reshape",
                &["x"],
                &["y"],
                vec![("shape", Attr::Ints(vec![2, -1, 2]))],
            ),
        ),
        (
            5,
            node(
                "Dropout",
                &["x"],
                &["y", "mask"],
                vec![("is_test", Attr::Int(1))],
            ),
        ),
        (
            5,
            node(
                "Relu",
                &["x"],
                &["y"],
                vec![("consumed_inputs", Attr::Ints(vec![0]))],
            ),
        ),
    ];
    for (opset, n) in cases {
        let mut m = one_node(opset, n, &feed, &[]);
        // A Dropout mask nobody reads is dropped; one that is read is refused (tested below).
        m.graph.outputs.retain(|o| o.name != "mask");
        same_after_upgrade(m, &feed, 21);
    }
    // Split-1's lengths as a float input: an int64 input at 13+, an attribute before; also
    // when computed at run time (then cast).
    let split = |opset, lens: Tensor, runtime: bool| {
        let n = node(
            "Split",
            &["x", "lens"],
            &["a", "b"],
            vec![("axis", Attr::Int(3))],
        );
        let l = [("lens", lens)];
        match runtime {
            true => one_node(opset, n, &[feed[0].clone(), l[0].clone()], &[]),
            false => one_node(opset, n, &feed, &l),
        }
    };
    let want = run(&split(21, i64t(&[3, 1]), false), &feed);
    let old = split(1, f32t(&[3.0, 1.0]), false);
    assert_eq!(run(&upgraded(&old, 21), &feed), want);
    assert_eq!(run(&upgraded(&old, 12), &feed), want);
    let old = split(1, f32t(&[3.0, 1.0]), true);
    let feed2 = [feed[0].clone(), ("lens", f32t(&[3.0, 1.0]))];
    assert_eq!(run(&upgraded(&old, 21), &feed2), want);
    assert!(UpgradeOpset { to: 12 }.run(old).is_err());
}

#[test]
fn resize_and_upsample() {
    // Sizes where floor and ceil of x_out / scale differ, so the rounding choice is tested.
    let x = floats(&[1, 2, 5, 7], 3);
    let feed = [("x", x.clone())];
    let up_scales = [("s", f32t(&[1.0, 1.0, 2.0, 1.5]))];
    let down_scales = [("s", f32t(&[1.0, 1.0, 0.6, 0.43]))];
    for (mode, scales) in [
        ("nearest", &up_scales),
        ("nearest", &down_scales),
        ("linear", &up_scales),
        ("linear", &down_scales),
    ] {
        let m = one_node(
            10,
            node("Resize", &["x", "s"], &["y"], vec![("mode", s(mode))]),
            &feed,
            scales,
        );
        same_after_upgrade(m.clone(), &feed, 21);
        same_after_upgrade(m, &feed, 12);
    }
    for mode in ["nearest", "linear"] {
        let m = one_node(
            9,
            node("Upsample", &["x", "s"], &["y"], vec![("mode", s(mode))]),
            &feed,
            &up_scales,
        );
        same_after_upgrade(m, &feed, 21);
        let m = one_node(
            7,
            node(
                "Upsample",
                &["x"],
                &["y"],
                vec![
                    ("mode", s(mode)),
                    ("scales", Attr::Floats(vec![1.0, 1.0, 2.0, 3.0])),
                ],
            ),
            &feed,
            &[],
        );
        same_after_upgrade(m.clone(), &feed, 21);
        same_after_upgrade(m, &feed, 9);
    }
    // Upsample with scales computed at run time still becomes a Resize.
    let m = one_node(
        9,
        node("Upsample", &["x", "s"], &["y"], vec![]),
        &[("x", x.clone()), ("s", f32t(&[1.0, 1.0, 2.0, 2.0]))],
        &[],
    );
    same_after_upgrade(
        m,
        &[("x", x.clone()), ("s", f32t(&[1.0, 1.0, 2.0, 2.0]))],
        21,
    );
}

#[test]
fn other_changed_ops() {
    // BatchNormalization with legacy attributes.
    let x = floats(&[2, 3, 2, 2], 4);
    let p = |seed| floats(&[3], seed);
    let var = Tensor::from_vec(vec![3], vec![0.5f32, 1.0, 2.0]).unwrap();
    let inits = [("sc", p(5)), ("b", p(6)), ("m", p(7)), ("v", var)];
    let bn = node(
        "BatchNormalization",
        &["x", "sc", "b", "m", "v"],
        &["y"],
        vec![
            ("is_test", Attr::Int(1)),
            ("spatial", Attr::Int(1)),
            ("consumed_inputs", Attr::Ints(vec![0, 0, 0, 1, 1])),
        ],
    );
    same_after_upgrade(
        one_node(5, bn, &[("x", x.clone())], &inits),
        &[("x", x.clone())],
        21,
    );

    // Scatter -> ScatterElements.
    let data = floats(&[3, 3], 8);
    let idx = Tensor::from_vec(vec![2, 3], vec![1i64, 0, 2, 0, 2, 1]).unwrap();
    let upd = floats(&[2, 3], 9);
    let m = one_node(
        10,
        node(
            "Scatter",
            &["d", "i", "u"],
            &["y"],
            vec![("axis", Attr::Int(0))],
        ),
        &[("d", data.clone())],
        &[("i", idx), ("u", upd)],
    );
    same_after_upgrade(m, &[("d", data)], 21);

    // GroupNormalization-18: one scale per group becomes one per channel.
    let x = floats(&[2, 4, 3], 10);
    let m = one_node(
        18,
        node(
            "GroupNormalization",
            &["x", "sc", "b"],
            &["y"],
            vec![("num_groups", Attr::Int(2))],
        ),
        &[("x", x.clone())],
        &[("sc", f32t(&[0.5, 2.0])), ("b", f32t(&[0.1, -0.3]))],
    );
    same_after_upgrade(m, &[("x", x)], 21);

    // DFT-17 axis default 1 (rank 4 input, where the new default -2 differs).
    let x = floats(&[2, 4, 3, 1], 11);
    let m = one_node(
        17,
        node("DFT", &["x"], &["y"], vec![]),
        &[("x", x.clone())],
        &[],
    );
    same_after_upgrade(m, &[("x", x)], 21);

    // GridSample-16 mode names.
    let x = floats(&[1, 1, 3, 4], 12);
    let grid = floats(&[1, 2, 2, 2], 13);
    for mode in ["bilinear", "bicubic", "nearest"] {
        let m = one_node(
            16,
            node("GridSample", &["x", "g"], &["y"], vec![("mode", s(mode))]),
            &[("x", x.clone())],
            &[("g", grid.clone())],
        );
        same_after_upgrade(m, &[("x", x.clone())], 21);
    }

    // RoiAlign-10's implicit coordinate mode.
    let x = floats(&[1, 2, 5, 5], 14);
    let rois = Tensor::from_vec(vec![1, 4], vec![0.5f32, 0.7, 3.2, 4.1]).unwrap();
    let bi = i64t(&[0]);
    let m = one_node(
        10,
        node(
            "RoiAlign",
            &["x", "r", "bi"],
            &["y"],
            vec![
                ("output_height", Attr::Int(2)),
                ("output_width", Attr::Int(2)),
            ],
        ),
        &[("x", x.clone())],
        &[("r", rois), ("bi", bi)],
    );
    same_after_upgrade(m, &[("x", x)], 21);
}

/// Old forms the engine itself never ran: compared with the same computation written at 21.
#[test]
fn legacy_forms_match_their_modern_spelling() {
    // Add-6 with broadcast=1 at axis 1: B [3, 4] aligns with A's dims 1 and 2.
    let a = floats(&[2, 3, 4, 5], 15);
    let b = floats(&[3, 4], 16);
    let m = one_node(
        6,
        node(
            "Add",
            &["a", "b"],
            &["y"],
            vec![("broadcast", Attr::Int(1)), ("axis", Attr::Int(1))],
        ),
        &[("a", a.clone())],
        &[("b", b.clone())],
    );
    let want = one_node(
        21,
        node("Add", &["a", "b"], &["y"], vec![]),
        &[("a", a.clone())],
        &[("b", b.clone().reshape(vec![3, 4, 1]).unwrap())],
    );
    let up = upgraded(&m, 21);
    assert_eq!(
        run(&up, &[("a", a.clone())]),
        run(&want, &[("a", a.clone())])
    );

    // Cast-1 with a type name.
    let x = Tensor::from_vec(vec![3], vec![1.7f32, -2.2, 3.0]).unwrap();
    let m = one_node(
        5,
        node("Cast", &["x"], &["y"], vec![("to", s("INT32"))]),
        &[("x", x.clone())],
        &[],
    );
    let out = run(&upgraded(&m, 21), &[("x", x)]);
    assert_eq!(
        out[0].1,
        Tensor::from_vec(vec![3], vec![1i32, -2, 3]).unwrap()
    );

    // LpPool-1's float p.
    let x = floats(&[1, 1, 4, 4], 17);
    let pool = |p: Attr, opset| {
        one_node(
            opset,
            node(
                "LpPool",
                &["x"],
                &["y"],
                vec![("p", p), ("kernel_shape", Attr::Ints(vec![2, 2]))],
            ),
            &[("x", x.clone())],
            &[],
        )
    };
    let up = upgraded(&pool(Attr::Float(3.0), 1), 21);
    assert_eq!(
        run(&up, &[("x", x.clone())]),
        run(&pool(Attr::Int(3), 21), &[("x", x.clone())])
    );
}

#[test]
fn subgraphs_are_upgraded_too() {
    let x = floats(&[1, 3], 18);
    let branch = |axes: Vec<i64>, out: &str| Graph {
        outputs: vec![ValueInfo {
            name: out.into(),
            ..Default::default()
        }],
        nodes: vec![Node::new("Squeeze", "sq", &["x"], &[out]).with_attr("axes", Attr::Ints(axes))],
        ..Default::default()
    };
    let mut m = one_node(
        11,
        node(
            "If",
            &["c"],
            &["y"],
            vec![
                ("then_branch", Attr::Graph(Box::new(branch(vec![0], "t")))),
                ("else_branch", Attr::Graph(Box::new(branch(vec![-2], "e")))),
            ],
        ),
        &[("x", x.clone())],
        &[("c", Tensor::scalar(true))],
    );
    m.graph.nodes[0].name = "if".into();
    same_after_upgrade(m.clone(), &[("x", x.clone())], 21);
    let up = upgraded(&m, 21);
    let Some(Attr::Graph(g)) = up.graph.nodes[0].attrs.get("then_branch") else {
        panic!("then_branch lost");
    };
    assert_eq!(g.nodes[0].inputs.len(), 2, "axes became an input");
    assert!(g.nodes[0].attrs.is_empty());
}

#[test]
fn meaning_changes_it_cannot_express_are_refused() {
    let x = floats(&[2, 3], 19);
    let feed = [("x", x)];
    let refuse = |opset: i64, n: Node, inits: &[(&str, Tensor)], want: &str| {
        let m = one_node(opset, n, &feed, inits);
        let e = UpgradeOpset { to: 21 }.run(m).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Unsupported(_)), "{msg}");
        assert!(msg.contains(want), "{msg}");
    };
    refuse(
        8,
        node(
            "Scan",
            &["", "x"],
            &["y"],
            vec![("num_scan_inputs", Attr::Int(1))],
        ),
        &[],
        "cannot upgrade Scan node 'n' from opset 8 to 21",
    );
    refuse(
        5,
        node("Tile", &["x", "t", "a"], &["y"], vec![]),
        &[("t", i64t(&[2])), ("a", i64t(&[0]))],
        "Tile node 'n'",
    );
    refuse(
        8,
        node(
            "BatchNormalization",
            &["x", "x", "x", "x", "x"],
            &["y"],
            vec![("spatial", Attr::Int(0))],
        ),
        &[],
        "spatial=0",
    );
    refuse(
        7,
        node("Dropout", &["x"], &["y", "mask"], vec![]),
        &[],
        "mask output is read",
    );
    refuse(
        8,
        node("ImageScaler", &["x"], &["y"], vec![]),
        &[],
        "not an ONNX operator",
    );
    refuse(
        8,
        node("MeanVarianceNormalization", &["x"], &["y"], vec![]),
        &[],
        "only exists from opset 9",
    );
    // Nearest Resize-10 rounds by scale direction: needs the scales.
    let m = one_node(
        10,
        node("Resize", &["x", "s"], &["y"], vec![]),
        &[
            ("x", floats(&[1, 1, 2, 2], 1)),
            ("s", f32t(&[1.0, 1.0, 2.0, 2.0])),
        ],
        &[],
    );
    let e = UpgradeOpset { to: 21 }.run(m).unwrap_err().to_string();
    assert!(
        e.contains("Resize node 'n'") && e.contains("run time"),
        "{e}"
    );
    // Beyond what the pass knows.
    let m = one_node(13, node("Relu", &["x"], &["y"], vec![]), &feed, &[]);
    assert!(UpgradeOpset { to: 22 }.run(m.clone()).is_err());
    // Already there: untouched.
    let (same, rec) = UpgradeOpset { to: 13 }.run(m.clone()).unwrap();
    assert_eq!(same, m);
    assert!(rec.changes.is_empty());
}
