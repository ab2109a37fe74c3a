//! Acceptance on the real models: MNIST-8 accuracy and logits, MiniLM hidden states, both
//! against onnxruntime, and load -> save round trips that onnxruntime runs bit-identically.

mod common;
use common::*;
use smelt_data::{Preprocess, Split};
use smelt_engine::Session;
use smelt_tensor::Tensor;

#[test]
fn mnist8_accuracy_and_logits_match_onnxruntime() {
    let a = assets();
    let model_path = a.join("mnist-8/model.onnx");
    // The CLI's accuracy on the full test set.
    let out = smelt()
        .args(["eval", "--json"])
        .arg(&model_path)
        .arg("--data")
        .arg(a.join("mnist"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["samples"], 10000);
    let acc = v["accuracy"].as_f64().unwrap();
    assert!((acc - 0.9891).abs() < 1e-9, "accuracy {acc}");

    // Logits of every test image against onnxruntime's.
    let ds = smelt_data::load_idx_dir(&a.join("mnist"), Split::Test, None, &Preprocess::default())
        .unwrap();
    let s = Session::new(smelt_onnx::load(&model_path).unwrap()).unwrap();
    let mut ours = Vec::with_capacity(ds.len() * 10);
    for i in 0..ds.len() {
        let out = s.run(&[("Input3", ds.batch(i, i + 1))]).unwrap();
        ours.extend_from_slice(out[0].1.as_slice::<f32>().unwrap());
    }
    let dir = tempfile::tempdir().unwrap();
    let theirs = ort_run(&model_path, &[("Input3", &ds.x)], dir.path());
    let theirs = theirs[0].1.as_slice::<f32>().unwrap();
    let d = max_rel_diff(&ours, theirs, 10);
    eprintln!(
        "mnist-8: accuracy {acc}, max normwise relative logit difference vs onnxruntime {d:e}"
    );
    assert!(d <= 1e-5, "max relative logit difference {d}");
    let ort_pred =
        smelt_data::top1(&Tensor::from_vec(vec![ds.len(), 10], theirs.to_vec()).unwrap()).unwrap();
    let ort_acc = smelt_data::accuracy(&ort_pred, ds.y.as_ref().unwrap());
    assert_eq!(
        ort_acc, acc,
        "onnxruntime accuracy {ort_acc} vs smelt {acc}"
    );
}

fn brown_batch(n: usize) -> smelt_data::TextBatch {
    let a = assets();
    let sentences = smelt_data::brown_sentences(&a.join("brown"), n).unwrap();
    assert_eq!(sentences.len(), n);
    smelt_data::tokenize(&a.join("minilm/tokenizer.json"), &sentences, 128, None).unwrap()
}

#[test]
fn minilm_hidden_states_match_onnxruntime() {
    let a = assets();
    let model_path = a.join("minilm-int8/model.onnx");
    let b = brown_batch(64);
    let s = Session::new(smelt_onnx::load(&model_path).unwrap()).unwrap();
    let feed = [
        ("input_ids", b.input_ids.clone()),
        ("attention_mask", b.attention_mask.clone()),
        ("token_type_ids", b.token_type_ids.clone()),
    ];
    let ours = s.run(&feed).unwrap();
    let (name, ours) = &ours[0];
    assert_eq!(name, "last_hidden_state");
    assert_eq!(ours.shape()[0], 64);
    assert_eq!(ours.shape()[2], 384);
    let dir = tempfile::tempdir().unwrap();
    let theirs = ort_run(
        &model_path,
        &[
            ("input_ids", &b.input_ids),
            ("attention_mask", &b.attention_mask),
            ("token_type_ids", &b.token_type_ids),
        ],
        dir.path(),
    );
    let o = ours.as_slice::<f32>().unwrap();
    let t = theirs[0].1.as_slice::<f32>().unwrap();
    let d = o
        .iter()
        .zip(t)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    eprintln!("minilm: max |difference| of last_hidden_state vs onnxruntime {d:e}");
    assert!(d <= 1e-4, "max |difference| of last_hidden_state: {d}");
}

/// load -> save through smelt must not change a single output bit in onnxruntime.
fn assert_round_trip_bit_identical(model_path: &std::path::Path, feed: &[(&str, &Tensor)]) {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.onnx");
    let out = smelt()
        .arg("convert")
        .arg(model_path)
        .arg("-o")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d1 = dir.path().join("a");
    let d2 = dir.path().join("b");
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let orig = ort_run(model_path, feed, &d1);
    let ours = ort_run(&copy, feed, &d2);
    assert_eq!(orig.len(), ours.len());
    for ((n1, t1), (n2, t2)) in orig.iter().zip(&ours) {
        assert_eq!(n1, n2);
        let a: Vec<u32> = t1
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        let b: Vec<u32> = t2
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert!(a == b, "output {n1} differs after load -> save");
    }
    // And the IR survives a second round trip unchanged.
    let m1 = smelt_onnx::load(model_path).unwrap();
    let m2 = smelt_onnx::load(&copy).unwrap();
    assert_eq!(m1, m2);
}

#[test]
fn round_trip_mnist8_is_bit_identical_in_onnxruntime() {
    let a = assets();
    let ds = smelt_data::load_idx_dir(
        &a.join("mnist"),
        Split::Test,
        Some(16),
        &Preprocess::default(),
    )
    .unwrap();
    assert_round_trip_bit_identical(&a.join("mnist-8/model.onnx"), &[("Input3", &ds.x)]);
}

#[test]
fn round_trip_minilm_is_bit_identical_in_onnxruntime() {
    let b = brown_batch(8);
    assert_round_trip_bit_identical(
        &assets().join("minilm-int8/model.onnx"),
        &[
            ("input_ids", &b.input_ids),
            ("attention_mask", &b.attention_mask),
            ("token_type_ids", &b.token_type_ids),
        ],
    );
}

/// The bias-folding pass on a real model: MNIST-8 (CNTK export, biases as separate Adds) loses
/// its three Adds and computes the same logits on 200 test images.
#[test]
fn fuse_bias_keeps_mnist8_logits() {
    use smelt_ir::Pass;
    let a = assets();
    let mut model = smelt_onnx::load(&a.join("mnist-8/model.onnx")).unwrap();
    // IR 3 lists the weights as inputs too (overridable), which keeps every pass off them.
    model.graph.drop_initializer_inputs();
    // The Gemm weight is a Reshape of a constant until folded.
    let (model, _) = smelt_engine::passes::FoldConstants {
        max_elements: 1 << 20,
    }
    .run(model)
    .unwrap();
    let (fused, rec) = smelt_ir::passes::FuseBias.run(model.clone()).unwrap();
    assert_eq!(rec.changes.len(), 3, "{:?}", rec.changes);
    assert!(fused.graph.nodes.iter().all(|n| n.op_type != "Add"));
    assert_eq!(
        fused
            .graph
            .nodes
            .iter()
            .filter(|n| n.op_type == "Gemm")
            .count(),
        1
    );
    // Through the file format, so the rewritten nodes are valid on disk.
    let fused = smelt_onnx::decode(
        &smelt_onnx::encode(&fused).unwrap(),
        None,
        &Default::default(),
    )
    .unwrap();
    let ds = smelt_data::load_idx_dir(
        &a.join("mnist"),
        Split::Test,
        Some(200),
        &Preprocess::default(),
    )
    .unwrap();
    let (s0, s1) = (Session::new(model).unwrap(), Session::new(fused).unwrap());
    let (mut want, mut got) = (Vec::new(), Vec::new());
    for i in 0..ds.len() {
        let x = ds.batch(i, i + 1);
        want.extend_from_slice(
            s0.run(&[("Input3", x.clone())]).unwrap()[0]
                .1
                .as_slice::<f32>()
                .unwrap(),
        );
        got.extend_from_slice(
            s1.run(&[("Input3", x)]).unwrap()[0]
                .1
                .as_slice::<f32>()
                .unwrap(),
        );
    }
    let d = max_rel_diff(&got, &want, 10);
    assert!(d <= 1e-5, "max relative logit difference {d}");
}
