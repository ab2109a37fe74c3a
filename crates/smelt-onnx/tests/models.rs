//! Round trips of real models and synthetic models covering every attribute kind.

mod common;

use common::asset;
use indexmap::IndexMap;
use prost::Message;
use smelt_ir::{Attr, DType, Dim, Graph, Model, Node, OpsetImport, Tensor, ValueInfo};
use smelt_onnx::proto;
use smelt_onnx::{ExternalData, SaveOptions};
use std::collections::BTreeMap;

fn dtype_counts(g: &Graph) -> BTreeMap<DType, usize> {
    let mut c = BTreeMap::new();
    for t in g.initializers.values() {
        *c.entry(t.dtype()).or_insert(0) += 1;
    }
    c
}

#[test]
fn mnist8_loads_and_round_trips() {
    let m = smelt_onnx::load(&asset("mnist-8/model.onnx")).unwrap();
    assert_eq!(m.ir_version, 3);
    assert_eq!(m.onnx_opset(), 8);
    assert_eq!(m.graph.nodes.len(), 12);
    assert_eq!(m.graph.initializers.len(), 8);
    assert_eq!(m.graph.inputs.len(), 9);
    assert_eq!(m.graph.runtime_inputs().count(), 1);
    assert_eq!(m.graph.value_info.len(), 11);
    // The first initializer is stored in float_data, not raw_data.
    let (name, w) = m.graph.initializers.first().unwrap();
    assert_eq!(name, "Parameter193");
    assert_eq!(w.shape(), &[16, 4, 4, 10]);
    assert_eq!(w.dtype(), DType::F32);
    let convs = m.graph.nodes.iter().filter(|n| n.op_type == "Conv").count();
    assert_eq!(convs, 2);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mnist.onnx");
    smelt_onnx::save(&m, &out).unwrap();
    let m2 = smelt_onnx::load(&out).unwrap();
    assert_eq!(m, m2);
    // Saving is deterministic: a second round trip gives the same bytes.
    assert_eq!(
        smelt_onnx::encode(&m).unwrap(),
        std::fs::read(&out).unwrap()
    );
    // No temp files left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("mnist.onnx")]);
}

#[test]
fn minilm_int8_round_trips_inline_and_with_external_data() {
    let m = smelt_onnx::load(&asset("minilm-int8/model.onnx")).unwrap();
    assert_eq!(m.ir_version, 10);
    assert_eq!(m.onnx_opset(), 17);
    assert_eq!(m.graph.nodes.len(), 385);
    assert_eq!(m.graph.initializers.len(), 160);
    assert_eq!(m.graph.value_info.len(), 430);
    let counts = dtype_counts(&m.graph);
    let want: BTreeMap<DType, usize> = [
        (DType::F32, 107),
        (DType::I8, 38),
        (DType::I64, 14),
        (DType::Bool, 1),
    ]
    .into();
    assert_eq!(counts, want);
    assert_eq!(
        m.graph.initializers["inner.embeddings.token_type_embeddings.weight"].shape(),
        &[2, 384]
    );

    let dir = tempfile::tempdir().unwrap();
    let inline = dir.path().join("inline.onnx");
    smelt_onnx::save(&m, &inline).unwrap();
    assert_eq!(smelt_onnx::load(&inline).unwrap(), m);

    let ext = dir.path().join("ext.onnx");
    let opts = SaveOptions {
        external_data: Some(ExternalData {
            file_name: "ext.onnx.data".into(),
            size_threshold: 1024,
        }),
    };
    smelt_onnx::save_with(&m, &ext, &opts).unwrap();
    let data_len = std::fs::metadata(dir.path().join("ext.onnx.data"))
        .unwrap()
        .len();
    let model_len = std::fs::metadata(&ext).unwrap().len();
    let inline_len = std::fs::metadata(&inline).unwrap().len();
    // Most of the weight bytes moved out of the protobuf.
    assert!(data_len > inline_len / 2, "{data_len} vs {inline_len}");
    assert!(model_len < inline_len / 2, "{model_len} vs {inline_len}");
    let back = smelt_onnx::load(&ext).unwrap();
    assert_eq!(back, m);

    // The external entries are well formed: location, aligned offset, exact length.
    let p = proto::ModelProto::decode(std::fs::read(&ext).unwrap().as_slice()).unwrap();
    let g = p.graph.unwrap();
    let mut external = 0;
    for t in &g.initializer {
        if t.data_location == Some(proto::tensor_proto::DataLocation::External as i32) {
            external += 1;
            let kv: BTreeMap<_, _> = t
                .external_data
                .iter()
                .map(|e| (e.key.clone().unwrap(), e.value.clone().unwrap()))
                .collect();
            assert_eq!(kv["location"], "ext.onnx.data");
            let offset: u64 = kv["offset"].parse().unwrap();
            assert_eq!(offset % 64, 0);
            let n: usize = m.graph.initializers[t.name.as_deref().unwrap()].numel();
            let size = m.graph.initializers[t.name.as_deref().unwrap()]
                .dtype()
                .size();
            assert_eq!(kv["length"], (n * size).to_string());
            assert!(n * size >= 1024);
            assert!(t.raw_data.is_none());
        } else {
            assert!(t.raw_data.as_ref().map_or(0, |r| r.len()) < 1024);
        }
    }
    assert!(external > 50, "{external}");
}

#[test]
fn mnist_test_input_loads_as_a_tensor() {
    let x = smelt_onnx::load_tensor(&asset("mnist-8/test_data_set_0/input_0.pb")).unwrap();
    assert_eq!(x.shape(), &[1, 1, 28, 28]);
    assert_eq!(x.dtype(), DType::F32);
    let v = x.as_slice::<f32>().unwrap();
    assert_eq!(v.iter().sum::<f32>(), 40028.0);
    assert_eq!(v.iter().cloned().fold(f32::MIN, f32::max), 255.0);

    let y = smelt_onnx::load_tensor(&asset("mnist-8/test_data_set_0/output_0.pb")).unwrap();
    assert_eq!(y.shape(), &[1, 10]);
    let y = y.as_slice::<f32>().unwrap();
    assert_eq!(y[0], 975.670_1);
    assert_eq!(y[2], 6_574.568_4);

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.pb");
    smelt_onnx::save_tensor(&x, "Input3", &p).unwrap();
    assert_eq!(smelt_onnx::load_tensor(&p).unwrap(), x);
    let raw = proto::TensorProto::decode(std::fs::read(&p).unwrap().as_slice()).unwrap();
    assert_eq!(raw.name.as_deref(), Some("Input3"));
}

/// A model exercising every attribute kind, a subgraph, symbolic dims and metadata.
fn synthetic() -> Model {
    let then_g = Graph {
        name: "then".into(),
        outputs: vec![ValueInfo::new("t_out", DType::F32, vec![Dim::Fixed(2)])],
        nodes: vec![Node::new("Identity", "ti", &["x"], &["t_out"])],
        ..Default::default()
    };
    let mut else_g = then_g.clone();
    else_g.name = "else".into();
    else_g.nodes[0] = Node::new("Neg", "en", &["x"], &["t_out"]);
    let c = Tensor::from_vec(vec![2], vec![1.0f32, f32::NAN]).unwrap();
    let node = Node::new("If", "if0", &["cond"], &["y"])
        .with_attr("then_branch", Attr::Graph(Box::new(then_g.clone())))
        .with_attr("else_branch", Attr::Graph(Box::new(else_g.clone())));
    let mut odd = Node::new("Custom", "", &["x", ""], &["z"])
        .with_attr("f", Attr::Float(0.25))
        .with_attr("i", Attr::Int(-7))
        .with_attr("s", Attr::String(b"hello".to_vec()))
        .with_attr("t", Attr::Tensor(Tensor::scalar(3i64)))
        .with_attr("fs", Attr::Floats(vec![1.5, -2.0]))
        .with_attr("is", Attr::Ints(vec![]))
        .with_attr("ss", Attr::Strings(vec![b"a".to_vec(), vec![0xff]]))
        .with_attr("ts", Attr::Tensors(vec![c.clone(), Tensor::scalar(true)]))
        .with_attr("gs", Attr::Graphs(vec![then_g, else_g]));
    odd.domain = "com.example".into();
    odd.doc_string = "a node".into();
    let mut initializers = IndexMap::new();
    initializers.insert("cond".to_string(), Tensor::scalar(true));
    initializers.insert(
        "words".to_string(),
        Tensor::new(
            vec![2],
            smelt_tensor::Data::Str(vec!["x".into(), "".into()]),
        )
        .unwrap(),
    );
    initializers.insert("c".to_string(), c);
    Model {
        ir_version: 8,
        opsets: vec![
            OpsetImport {
                domain: String::new(),
                version: 17,
            },
            OpsetImport {
                domain: "com.example".into(),
                version: 1,
            },
        ],
        producer_name: "smelt-test".into(),
        producer_version: "0.1".into(),
        domain: "org.test".into(),
        model_version: 42,
        doc_string: "doc".into(),
        metadata: vec![("k".into(), "v".into()), ("k2".into(), "".into())],
        graph: Graph {
            name: "main".into(),
            doc_string: "graph doc".into(),
            inputs: vec![
                ValueInfo::new(
                    "x",
                    DType::F32,
                    vec![Dim::Sym("batch".into()), Dim::Unknown, Dim::Fixed(2)],
                ),
                ValueInfo {
                    name: "seq".into(),
                    ..Default::default()
                },
            ],
            outputs: vec![
                ValueInfo::new("y", DType::F32, vec![Dim::Fixed(2)]),
                ValueInfo {
                    name: "z".into(),
                    dtype: Some(DType::F16),
                    shape: None,
                    doc_string: "zz".into(),
                },
            ],
            value_info: vec![],
            initializers,
            nodes: vec![node, odd],
        },
    }
}

#[test]
fn synthetic_model_round_trips_every_attribute_kind() {
    let m = synthetic();
    let bytes = smelt_onnx::encode(&m).unwrap();
    let back = smelt_onnx::decode(&bytes, None, &Default::default()).unwrap();
    // NaN != NaN, so compare the re-encoded bytes, then the parts without NaNs.
    assert_eq!(smelt_onnx::encode(&back).unwrap(), bytes);
    assert_eq!(back.graph.nodes[0], m.graph.nodes[0]);
    assert_eq!(back.graph.inputs, m.graph.inputs);
    assert_eq!(back.graph.outputs, m.graph.outputs);
    assert_eq!(back.metadata, m.metadata);
    assert_eq!(back.opsets, m.opsets);
    assert_eq!(back.model_version, 42);
    let odd = &back.graph.nodes[1];
    assert_eq!(odd.name, "");
    assert_eq!(odd.domain, "com.example");
    assert_eq!(odd.inputs, vec!["x", ""]);
    let keys: Vec<_> = odd.attrs.keys().cloned().collect();
    assert_eq!(keys, ["f", "i", "s", "t", "fs", "is", "ss", "ts", "gs"]);
    assert_eq!(odd.attrs["is"], Attr::Ints(vec![]));
    assert_eq!(
        odd.attrs["ss"],
        Attr::Strings(vec![b"a".to_vec(), vec![0xff]])
    );
    let Attr::Tensors(ts) = &odd.attrs["ts"] else {
        panic!("ts is not tensors")
    };
    let c = ts[0].as_slice::<f32>().unwrap();
    assert_eq!(c[0], 1.0);
    assert!(c[1].is_nan());
    assert_eq!(
        back.graph.initializers["words"].data(),
        &smelt_tensor::Data::Str(vec!["x".into(), "".into()])
    );
    let names: Vec<_> = back.graph.initializers.keys().cloned().collect();
    assert_eq!(names, ["cond", "words", "c"]);
}

#[test]
fn external_data_in_subgraphs_and_small_tensors_stay_inline() {
    let mut m = synthetic();
    let big = Tensor::from_vec(vec![300], (0..300).map(|i| i as f32 * 0.5).collect()).unwrap();
    let Attr::Graph(g) = &mut m.graph.nodes[0].attrs["then_branch"] else {
        panic!()
    };
    g.initializers.insert("inner_w".into(), big.clone());
    m.graph.initializers.insert(
        "outer_w".into(),
        Tensor::from_vec(vec![100], vec![7i64; 100]).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("weights")).unwrap();
    let path = dir.path().join("m.onnx");
    let opts = SaveOptions {
        external_data: Some(ExternalData {
            file_name: "weights/w.bin".into(),
            size_threshold: 800,
        }),
    };
    smelt_onnx::save_with(&m, &path, &opts).unwrap();
    // The outer graph's 800 bytes of i64 come first, then the subgraph's 1200 bytes of f32
    // at the next multiple of 64: 832 + 1200.
    assert_eq!(
        std::fs::metadata(dir.path().join("weights/w.bin"))
            .unwrap()
            .len(),
        2032
    );
    let back = smelt_onnx::load(&path).unwrap();
    let Attr::Graph(g) = &back.graph.nodes[0].attrs["then_branch"] else {
        panic!()
    };
    assert_eq!(g.initializers["inner_w"], big);
    assert_eq!(
        back.graph.initializers["outer_w"]
            .as_slice::<i64>()
            .unwrap(),
        &[7i64; 100][..]
    );
    assert_eq!(
        smelt_onnx::encode(&back).unwrap(),
        smelt_onnx::encode(&m).unwrap()
    );

    // Bad external file names are refused before anything is written.
    for bad in ["../w.bin", "/tmp/w.bin", "m.onnx"] {
        let opts = SaveOptions {
            external_data: Some(ExternalData {
                file_name: bad.into(),
                size_threshold: 0,
            }),
        };
        let e = smelt_onnx::save_with(&m, &path, &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains(bad), "{bad}: {e}");
    }
}

#[test]
fn functions_are_ignored_and_unsupported_attributes_named() {
    let mut p =
        proto::ModelProto::decode(smelt_onnx::encode(&synthetic()).unwrap().as_slice()).unwrap();
    p.functions.push(proto::FunctionProto {
        name: Some("MyFn".into()),
        domain: Some("com.example".into()),
        node: vec![proto::NodeProto {
            op_type: Some("Relu".into()),
            ..Default::default()
        }],
        ..Default::default()
    });
    let m = smelt_onnx::decode(&p.encode_to_vec(), None, &Default::default()).unwrap();
    assert_eq!(m.graph.nodes.len(), 2);

    let g = p.graph.as_mut().unwrap();
    g.node[1].attribute.push(proto::AttributeProto {
        name: Some("sp".into()),
        r#type: Some(proto::attribute_proto::AttributeType::SparseTensor as i32),
        sparse_tensor: Some(Default::default()),
        ..Default::default()
    });
    let e = smelt_onnx::decode(&p.encode_to_vec(), None, &Default::default()).unwrap_err();
    assert!(matches!(e, smelt_tensor::Error::Unsupported(_)), "{e}");
    assert!(
        e.to_string().contains("'sp'") && e.to_string().contains("SPARSE_TENSOR"),
        "{e}"
    );

    // Old files leave the attribute type unset; it is inferred from the value present.
    let g = p.graph.as_mut().unwrap();
    g.node[1].attribute.pop();
    for a in &mut g.node[1].attribute {
        a.r#type = None;
    }
    // ... except for an empty list, which is ambiguous.
    let e = smelt_onnx::decode(&p.encode_to_vec(), None, &Default::default()).unwrap_err();
    assert!(
        e.to_string().contains("'is' has no type and no value"),
        "{e}"
    );
    let g = p.graph.as_mut().unwrap();
    g.node[1]
        .attribute
        .retain(|a| a.name.as_deref() != Some("is"));
    let m = smelt_onnx::decode(&p.encode_to_vec(), None, &Default::default()).unwrap();
    assert_eq!(m.graph.nodes[1].attrs["i"], Attr::Int(-7));
    assert_eq!(m.graph.nodes[1].attrs["fs"], Attr::Floats(vec![1.5, -2.0]));
}

/// Every model in the ONNX node test suite either loads and round trips exactly, or fails
/// with an Unsupported error (types smelt does not hold), never Invalid or a panic.
#[test]
fn onnx_node_test_models_round_trip() {
    let root = asset("onnx-node-tests");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let (mut ok, mut unsupported) = (0, 0);
    let mut with_subgraphs = 0;
    let mut reasons = BTreeMap::new();
    let mut inputs_checked = 0;
    for d in &dirs {
        let path = d.join("model.onnx");
        match smelt_onnx::load(&path) {
            Ok(m) => {
                ok += 1;
                if m.graph.nodes.iter().any(has_subgraph) {
                    with_subgraphs += 1;
                }
                // Test data for tensor-typed inputs loads with the declared type and shape.
                for (i, v) in m.graph.runtime_inputs().enumerate() {
                    let Some(dtype) = v.dtype else { continue };
                    let pb = d.join(format!("test_data_set_0/input_{i}.pb"));
                    if !pb.exists() {
                        continue;
                    }
                    let t = smelt_onnx::load_tensor(&pb).unwrap();
                    assert_eq!(t.dtype(), dtype, "{}", pb.display());
                    if let Some(shape) = v.fixed_shape() {
                        assert_eq!(t.shape(), &shape[..], "{}", pb.display());
                    }
                    inputs_checked += 1;
                }
                let bytes = smelt_onnx::encode(&m).unwrap();
                let back = smelt_onnx::decode(&bytes, None, &Default::default()).unwrap();
                assert_eq!(
                    smelt_onnx::encode(&back).unwrap(),
                    bytes,
                    "{} does not round trip",
                    path.display()
                );
            }
            Err(smelt_tensor::Error::Unsupported(m)) => {
                unsupported += 1;
                let reason = m.rsplit(": ").next().unwrap_or("").to_string();
                *reasons.entry(reason).or_insert(0usize) += 1;
            }
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
    assert!(dirs.len() > 1000, "{}", dirs.len());
    assert!(
        ok > dirs.len() * 9 / 10,
        "only {ok} of {} loaded",
        dirs.len()
    );
    assert!(with_subgraphs >= 10, "{with_subgraphs}");
    assert!(inputs_checked > 1500, "{inputs_checked}");
    eprintln!(
        "{ok} loaded, {inputs_checked} inputs checked, {unsupported} unsupported: {reasons:#?}"
    );
}

fn has_subgraph(n: &Node) -> bool {
    n.attrs
        .values()
        .any(|a| matches!(a, Attr::Graph(_) | Attr::Graphs(_)))
}
