//! Malformed and hostile files fail with a clear error, never a panic or a huge allocation.

mod common;

use common::asset;
use prost::Message;
use smelt_onnx::proto::{self, tensor_proto::DataLocation, StringStringEntryProto, TensorProto};
use smelt_onnx::LoadOptions;
use smelt_tensor::Error;
use std::path::Path;

/// A one-node model (Identity on an initializer) around the given initializer.
fn model_with(init: TensorProto) -> proto::ModelProto {
    let name = init.name.clone().unwrap_or_default();
    proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(proto::GraphProto {
            name: Some("g".into()),
            node: vec![proto::NodeProto {
                input: vec![name],
                output: vec!["y".into()],
                op_type: Some("Identity".into()),
                ..Default::default()
            }],
            initializer: vec![init],
            output: vec![proto::ValueInfoProto {
                name: Some("y".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn external(location: &str, offset: u64, length: u64, n: i64) -> TensorProto {
    let kv = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
    };
    TensorProto {
        name: Some("w".into()),
        dims: vec![n],
        data_type: Some(1),
        data_location: Some(DataLocation::External as i32),
        external_data: vec![
            kv("location", location.into()),
            kv("offset", offset.to_string()),
            kv("length", length.to_string()),
        ],
        ..Default::default()
    }
}

fn write_model(dir: &Path, m: &proto::ModelProto) -> std::path::PathBuf {
    let p = dir.join("model.onnx");
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}

fn load_err(path: &Path) -> Error {
    match smelt_onnx::load(path) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e,
    }
}

#[test]
fn truncated_and_random_files_are_invalid() {
    let bytes = std::fs::read(asset("mnist-8/model.onnx")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&p);
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("not a valid ONNX protobuf") && msg.contains("cut.onnx"),
        "{msg}"
    );

    // Deterministic pseudo-random bytes (an LCG), several seeds.
    for seed in 1u64..20 {
        let mut x = seed;
        let junk: Vec<u8> = (0..4096)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let e = smelt_onnx::decode(&junk, None, &LoadOptions::default()).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "seed {seed}: {e}");
    }

    let e = smelt_onnx::decode(&[], None, &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let e = load_err(&dir.path().join("missing.onnx"));
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("missing.onnx"),
        "{e}"
    );
}

#[test]
fn file_size_limit_is_enforced() {
    let opts = LoadOptions {
        max_file_bytes: 1000,
        ..Default::default()
    };
    let e = smelt_onnx::load_with(&asset("mnist-8/model.onnx"), &opts).unwrap_err();
    assert!(matches!(e, Error::Limit(_)), "{e}");
    assert!(e.to_string().contains("26454 bytes"), "{e}");
}

#[test]
fn external_data_must_stay_inside_the_model_folder() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    let floats: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect();
    std::fs::write(root.path().join("x"), &floats).unwrap();
    std::fs::write(dir.join("w.bin"), &floats).unwrap();

    // The good case first, so the failures below are about the path alone.
    let ok = smelt_onnx::load(&write_model(&dir, &model_with(external("w.bin", 4, 8, 2)))).unwrap();
    assert_eq!(
        ok.graph.initializers["w"].as_slice::<f32>().unwrap(),
        &[2.0, 3.0]
    );

    let e = load_err(&write_model(&dir, &model_with(external("../x", 0, 16, 4))));
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    assert!(e.to_string().contains("'../x' contains '..'"), "{e}");

    let abs = root.path().join("x");
    let e = load_err(&write_model(
        &dir,
        &model_with(external(abs.to_str().unwrap(), 0, 16, 4)),
    ));
    assert!(e.to_string().contains("is absolute"), "{e}");

    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(root.path().join("x"), dir.join("link.bin")).unwrap();
        let e = load_err(&write_model(
            &dir,
            &model_with(external("link.bin", 0, 16, 4)),
        ));
        assert!(e.to_string().contains("outside the model's folder"), "{e}");
    }

    let e = load_err(&write_model(&dir, &model_with(external("w.bin", 12, 8, 2))));
    assert!(e.to_string().contains("runs past the end"), "{e}");
    assert!(e.to_string().contains("tensor 'w'"), "{e}");
    let e = load_err(&write_model(
        &dir,
        &model_with(external("w.bin", u64::MAX, 8, 2)),
    ));
    assert!(e.to_string().contains("runs past the end"), "{e}");
    let e = load_err(&write_model(&dir, &model_with(external("w.bin", 0, 12, 2))));
    assert!(
        e.to_string()
            .contains("length 12 does not match the 8 bytes"),
        "{e}"
    );
    let e = load_err(&write_model(
        &dir,
        &model_with(external("nope.bin", 0, 8, 2)),
    ));
    assert!(e.to_string().contains("nope.bin"), "{e}");

    // Without a folder (decoding bytes), external data cannot be read at all.
    let bytes = model_with(external("w.bin", 0, 8, 2)).encode_to_vec();
    let e = smelt_onnx::decode(&bytes, None, &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("not loaded from a file"), "{e}");
}

#[test]
fn huge_and_negative_dims_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let t = TensorProto {
        name: Some("w".into()),
        dims: vec![1 << 40],
        data_type: Some(1),
        raw_data: Some(vec![0; 16]),
        ..Default::default()
    };
    let e = load_err(&write_model(dir.path(), &model_with(t.clone())));
    assert!(matches!(e, Error::Limit(_)), "{e}");
    assert!(e.to_string().contains("1099511627776 elements"), "{e}");

    // Overflowing products are caught too.
    let mut t2 = t.clone();
    t2.dims = vec![1 << 40, 1 << 40];
    let e = load_err(&write_model(dir.path(), &model_with(t2)));
    assert!(e.to_string().contains("overflows"), "{e}");

    let mut t3 = t.clone();
    t3.dims = vec![4, -3];
    let e = load_err(&write_model(dir.path(), &model_with(t3)));
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    assert!(e.to_string().contains("negative dimension -3"), "{e}");

    // A negative dim in a declared shape.
    let mut t4 = t.clone();
    t4.dims = vec![4];
    let mut m = model_with(t4);
    let g = m.graph.as_mut().unwrap();
    g.output[0].r#type = Some(proto::TypeProto {
        denotation: None,
        value: Some(proto::type_proto::Value::TensorType(
            proto::type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(proto::TensorShapeProto {
                    dim: vec![proto::tensor_shape_proto::Dimension {
                        value: Some(proto::tensor_shape_proto::dimension::Value::DimValue(-1)),
                        denotation: None,
                    }],
                }),
            },
        )),
    });
    let e = load_err(&write_model(dir.path(), &m));
    assert!(
        e.to_string().contains("'y' has negative dimension -1"),
        "{e}"
    );

    // A smaller element limit applies to ordinary tensors.
    let mut t5 = t;
    t5.dims = vec![4];
    let p = write_model(dir.path(), &model_with(t5));
    let opts = LoadOptions {
        max_tensor_elements: 3,
        ..Default::default()
    };
    let e = smelt_onnx::load_with(&p, &opts).unwrap_err();
    assert!(e.to_string().contains("more than the limit of 3"), "{e}");
}

#[test]
fn structural_errors_name_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let good = TensorProto {
        name: Some("w".into()),
        dims: vec![1],
        data_type: Some(1),
        raw_data: Some(vec![0; 4]),
        ..Default::default()
    };
    let mut m = model_with(good.clone());
    m.graph = None;
    let e = load_err(&write_model(dir.path(), &m));
    assert!(e.to_string().contains("no graph"), "{e}");

    let mut m = model_with(good.clone());
    m.graph.as_mut().unwrap().initializer.push(good.clone());
    let e = load_err(&write_model(dir.path(), &m));
    assert!(e.to_string().contains("'w' is defined twice"), "{e}");

    let mut m = model_with(good.clone());
    m.graph
        .as_mut()
        .unwrap()
        .sparse_initializer
        .push(Default::default());
    let e = load_err(&write_model(dir.path(), &m));
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("sparse initializers"), "{e}");

    let mut bad = good.clone();
    bad.data_type = Some(23); // FLOAT4E2M1
    let e = load_err(&write_model(dir.path(), &model_with(bad)));
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    assert!(
        e.to_string().contains("FLOAT4E2M1") && e.to_string().contains("'w'"),
        "{e}"
    );

    let mut m = model_with(good);
    m.graph.as_mut().unwrap().node[0].op_type = None;
    let e = load_err(&write_model(dir.path(), &m));
    assert!(e.to_string().contains("no op_type"), "{e}");
}
