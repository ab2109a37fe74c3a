//! A corpus of broken models and inputs: each must give one clear `error:` line naming the
//! problem and a non-zero exit, never a panic and never an out-of-memory abort.

mod common;
use common::*;
use prost::Message;
use smelt_ir::{Dim, Graph, Model, Node, OpsetImport, ValueInfo};
use smelt_onnx::proto;
use smelt_tensor::{DType, Tensor};
use std::path::Path;

/// x[1,4] -> Relu -> Neg -> y, valid unless a case breaks it.
fn tiny() -> Model {
    let mut g = Graph {
        name: "tiny".into(),
        inputs: vec![ValueInfo::new(
            "x",
            DType::F32,
            vec![Dim::Fixed(1), Dim::Fixed(4)],
        )],
        outputs: vec![ValueInfo::new(
            "y",
            DType::F32,
            vec![Dim::Fixed(1), Dim::Fixed(4)],
        )],
        ..Default::default()
    };
    g.nodes.push(Node::new("Relu", "relu", &["x"], &["h"]));
    g.nodes.push(Node::new("Neg", "neg", &["h"], &["y"]));
    Model {
        ir_version: 8,
        opsets: vec![OpsetImport {
            domain: String::new(),
            version: 17,
        }],
        graph: g,
        ..Default::default()
    }
}

fn write_model(dir: &Path, name: &str, m: &Model) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, smelt_onnx::encode(m).unwrap()).unwrap();
    p
}

/// Runs smelt with `args`, asserts a clean failure whose single error line contains `want`.
fn assert_fails(args: &[&std::ffi::OsStr], want: &str) {
    let out = smelt().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure for {args:?}, stderr: {err}"
    );
    assert_eq!(out.status.code(), Some(1), "exit code for {args:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "panic for {args:?}: {err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one error line expected, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        err.contains(want),
        "error for {args:?} should mention {want:?}, got: {err}"
    );
}

fn inspect(p: &Path, want: &str) {
    assert_fails(&["inspect".as_ref(), p.as_os_str()], want);
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(assets().join("mnist-8/model.onnx")).unwrap();
    let p = dir.path().join("trunc.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    inspect(&p, "invalid model");
}

#[test]
fn random_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("random.onnx");
    let mut state = 12345u64;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            (state >> 56) as u8
        })
        .collect();
    std::fs::write(&p, bytes).unwrap();
    inspect(&p, "invalid model");
}

#[test]
fn missing_file() {
    inspect(
        Path::new("/nonexistent/model.onnx"),
        "/nonexistent/model.onnx",
    );
}

#[test]
fn cycle() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = tiny();
    m.graph.nodes[0].inputs = vec!["y".into()];
    inspect(&write_model(dir.path(), "cycle.onnx", &m), "cycle");
}

#[test]
fn missing_initializer() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = tiny();
    m.graph.nodes[1] = Node::new("Add", "add", &["h", "bias"], &["y"]);
    inspect(&write_model(dir.path(), "noinit.onnx", &m), "'bias'");
}

#[test]
fn unknown_op() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = tiny();
    m.graph.nodes[1].op_type = "FrobnicateV9".into();
    inspect(
        &write_model(dir.path(), "unknown.onnx", &m),
        "op 'FrobnicateV9' is not implemented",
    );
}

/// Builds the protobuf directly, for cases the IR cannot even represent.
fn tiny_proto() -> proto::ModelProto {
    proto::ModelProto::decode(&smelt_onnx::encode(&tiny()).unwrap()[..]).unwrap()
}

#[test]
fn huge_declared_dimension() {
    let dir = tempfile::tempdir().unwrap();
    let mut mp = tiny_proto();
    let g = mp.graph.as_mut().unwrap();
    g.initializer.push(proto::TensorProto {
        name: Some("w".into()),
        dims: vec![1 << 40, 1 << 20],
        data_type: Some(1),
        ..Default::default()
    });
    let p = dir.path().join("huge.onnx");
    std::fs::write(&p, mp.encode_to_vec()).unwrap();
    inspect(&p, "limit exceeded");
}

#[test]
fn external_data_outside_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("model");
    std::fs::create_dir(&inner).unwrap();
    std::fs::write(dir.path().join("secret.bin"), [0u8; 64]).unwrap();
    let mut mp = tiny_proto();
    let g = mp.graph.as_mut().unwrap();
    g.initializer.push(proto::TensorProto {
        name: Some("w".into()),
        dims: vec![4],
        data_type: Some(1),
        data_location: Some(1),
        external_data: vec![proto::StringStringEntryProto {
            key: Some("location".into()),
            value: Some("../secret.bin".into()),
        }],
        ..Default::default()
    });
    let p = inner.join("escape.onnx");
    std::fs::write(&p, mp.encode_to_vec()).unwrap();
    inspect(&p, "secret.bin");
}

#[test]
fn shape_mismatch_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_model(dir.path(), "tiny.onnx", &tiny());
    let x = dir.path().join("x.npy");
    write_npy(&x, &Tensor::from_vec(vec![2, 3], vec![0f32; 6]).unwrap());
    assert_fails(
        &[
            "run".as_ref(),
            p.as_os_str(),
            "--input".as_ref(),
            format!("x={}", x.display()).as_ref(),
        ],
        "input 'x' must have shape [1, 4], got [2, 3]",
    );
}

#[test]
fn shape_mismatch_inside_the_graph() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = tiny();
    m.graph.initializers.insert(
        "b".into(),
        Tensor::from_vec(vec![3], vec![1f32; 3]).unwrap(),
    );
    m.graph.nodes[1] = Node::new("Add", "add_bias", &["h", "b"], &["y"]);
    let p = write_model(dir.path(), "badadd.onnx", &m);
    assert_fails(&["run".as_ref(), p.as_os_str()], "add_bias");
}

#[test]
fn refuses_to_overwrite_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_model(dir.path(), "tiny.onnx", &tiny());
    let before = std::fs::read(&p).unwrap();
    assert_fails(
        &[
            "convert".as_ref(),
            p.as_os_str(),
            "-o".as_ref(),
            p.as_os_str(),
        ],
        "refusing to overwrite",
    );
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn data_that_does_not_fit_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_model(dir.path(), "tiny.onnx", &tiny());
    // MNIST images are [1, 28, 28] per sample; the model wants [4].
    assert_fails(
        &[
            "eval".as_ref(),
            p.as_os_str(),
            "--data".as_ref(),
            assets().join("mnist").as_os_str(),
            "--limit".as_ref(),
            "2".as_ref(),
        ],
        "input 'x' must have shape",
    );
}
