//! The bad-input corpus: broken, hostile or mismatched models, tensors, datasets, recipes and
//! options. Each case must end in one clear `error:` line naming the problem, exit code 1, no
//! panic, no out-of-memory abort, and nothing written: no output file, no temporary debris,
//! the inputs untouched.

mod common;
use common::*;
use prost::Message;
use smelt_ir::{Attr, Dim, Graph, Model, Node, OpsetImport, ValueInfo};
use smelt_onnx::proto::{self, tensor_proto::DataLocation, StringStringEntryProto, TensorProto};
use smelt_tensor::{DType, Tensor};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// x[shape] -> Relu -> Neg -> y, valid unless a case breaks it.
fn tiny_with(shape: &[usize]) -> Model {
    let dims: Vec<Dim> = shape.iter().map(|&d| Dim::Fixed(d)).collect();
    let mut g = Graph {
        name: "tiny".into(),
        inputs: vec![ValueInfo::new("x", DType::F32, dims.clone())],
        outputs: vec![ValueInfo::new("y", DType::F32, dims)],
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

fn tiny() -> Model {
    tiny_with(&[1, 4])
}

/// The tiny model with its second node replaced.
fn tiny_node(n: Node) -> Model {
    let mut m = tiny();
    m.graph.nodes[1] = n;
    m
}

/// x[1,4] @ w[4,1] -> y[1,1], w given.
fn matmul(w: Vec<f32>) -> Model {
    let mut m = tiny();
    m.graph.nodes = vec![Node::new("MatMul", "mm", &["x", "w"], &["y"])];
    m.graph.outputs[0].shape = Some(vec![Dim::Fixed(1), Dim::Fixed(1)]);
    m.graph
        .initializers
        .insert("w".into(), Tensor::from_vec(vec![4, 1], w).unwrap());
    m
}

/// x[1,1,4,4] -> Conv(1x1 weight, attrs) -> y.
fn conv(attrs: &[(&str, Attr)]) -> Model {
    let mut m = tiny_with(&[1, 1, 4, 4]);
    let mut n = Node::new("Conv", "conv", &["x", "w"], &["y"]);
    for (k, v) in attrs {
        n = n.with_attr(k, v.clone());
    }
    m.graph.nodes = vec![n];
    m.graph.outputs[0].shape = None;
    m.graph.initializers.insert(
        "w".into(),
        Tensor::from_vec(vec![1, 1, 1, 1], vec![1f32]).unwrap(),
    );
    m
}

/// The tiny model with a constant `name` of `shape`, for ops taking a constant second input.
fn with_const(mut m: Model, name: &str, t: Tensor) -> Model {
    m.graph.initializers.insert(name.into(), t);
    m
}

fn i64s(v: &[i64]) -> Tensor {
    Tensor::from_vec(vec![v.len()], v.to_vec()).unwrap()
}

fn to_proto(m: &Model) -> proto::ModelProto {
    proto::ModelProto::decode(&smelt_onnx::encode(m).unwrap()[..]).unwrap()
}

/// The tiny model as protobuf, with one extra initializer `w` (unused by the nodes).
fn tiny_proto_with(init: TensorProto) -> proto::ModelProto {
    let mut mp = to_proto(&tiny());
    mp.graph.as_mut().unwrap().initializer.push(init);
    mp
}

fn f32_tensor(dims: Vec<i64>) -> TensorProto {
    TensorProto {
        name: Some("w".into()),
        dims,
        data_type: Some(1),
        ..Default::default()
    }
}

fn external(location: &str, offset: u64, length: u64, n: i64) -> TensorProto {
    let kv = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
    };
    TensorProto {
        data_location: Some(DataLocation::External as i32),
        external_data: vec![
            kv("location", location.into()),
            kv("offset", offset.to_string()),
            kv("length", length.to_string()),
        ],
        ..f32_tensor(vec![n])
    }
}

/// Writes the corpus files under `dir` and returns (case name, arguments, expected text).
struct Corpus {
    dir: PathBuf,
    cases: Vec<(&'static str, Vec<OsString>, String)>,
}

impl Corpus {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
    fn model(&self, name: &str, m: &Model) -> PathBuf {
        self.file(name, &smelt_onnx::encode(m).unwrap())
    }
    fn proto(&self, name: &str, m: &proto::ModelProto) -> PathBuf {
        self.file(name, &m.encode_to_vec())
    }
    fn case(&mut self, name: &'static str, args: &[&dyn AsRef<std::ffi::OsStr>], want: &str) {
        let args = args.iter().map(|a| a.as_ref().to_os_string()).collect();
        self.cases.push((name, args, want.to_string()));
    }
    /// `smelt run MODEL` on a model file written from `m`.
    fn run_model(&mut self, name: &'static str, m: &Model, want: &str) {
        let p = self.model(&format!("{name}.onnx"), m);
        self.case(name, &[&"run", &p], want);
    }
    /// `smelt inspect MODEL` on a protobuf written as is.
    fn inspect_proto(&mut self, name: &'static str, m: &proto::ModelProto, want: &str) {
        let p = self.proto(&format!("{name}.onnx"), m);
        self.case(name, &[&"inspect", &p], want);
    }
}

fn build_corpus(dir: &Path) -> Corpus {
    let mut c = Corpus {
        dir: dir.to_path_buf(),
        cases: Vec::new(),
    };
    let a = assets();
    let mnist8 = a.join("mnist-8/model.onnx");
    let mnist = a.join("mnist");
    let out = dir.join("out.onnx");

    // Not a model at all.
    let bytes = std::fs::read(&mnist8).unwrap();
    let p = c.file("truncated.onnx", &bytes[..bytes.len() / 2]);
    c.case("truncated file", &[&"inspect", &p], "invalid model");
    let mut state = 12345u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            (state >> 56) as u8
        })
        .collect();
    let p = c.file("random.onnx", &random);
    c.case("random bytes", &[&"inspect", &p], "invalid model");
    let p = c.file("empty.onnx", b"");
    c.case("empty file", &[&"inspect", &p], "the file is empty");
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend([0u8; 64]);
    let p = c.file("image.onnx", &png);
    c.case(
        "wrong magic (PNG)",
        &[&"inspect", &p],
        "not a valid ONNX protobuf",
    );
    let p = c.path("folder.onnx");
    std::fs::create_dir(&p).unwrap();
    c.case("a folder", &[&"inspect", &p], "cannot read");
    let p = c.path("nonexistent.onnx");
    c.case("missing file", &[&"inspect", &p], "nonexistent.onnx");
    let mut mp = to_proto(&tiny());
    mp.graph = None;
    c.inspect_proto("no graph", &mp, "no graph");

    // Broken structure.
    let mut m = tiny();
    m.graph.nodes[0].inputs = vec!["y".into()];
    c.run_model("cycle", &m, "cycle");
    let m = tiny_node(Node::new("Add", "add", &["h", "bias"], &["y"]));
    c.run_model("dangling input", &m, "'bias'");
    let m = tiny_node(Node::new("Neg", "neg", &["h"], &["z"]));
    c.run_model("dangling output", &m, "output 'y' was not computed");
    let mut m = tiny();
    m.graph.nodes[0].outputs = vec!["y".into()];
    c.run_model(
        "two producers of one value",
        &m,
        "'y' is produced by more than one node",
    );
    let mut mp = tiny_proto_with(TensorProto {
        raw_data: Some(vec![0; 4]),
        ..f32_tensor(vec![1])
    });
    let dup = mp.graph.as_ref().unwrap().initializer[0].clone();
    mp.graph.as_mut().unwrap().initializer.push(dup);
    c.inspect_proto("duplicate initializer", &mp, "'w' is defined twice");
    let mut m = tiny();
    m.graph.nodes[1].op_type = "FrobnicateV9".into();
    c.run_model("unknown op", &m, "op 'FrobnicateV9' is not implemented");
    let mut m = tiny();
    m.graph.nodes[1].domain = "com.example".into();
    m.opsets.push(OpsetImport {
        domain: "com.example".into(),
        version: 1,
    });
    c.run_model(
        "unknown domain",
        &m,
        "(domain com.example) is not implemented",
    );
    let mut m = tiny();
    m.opsets[0].version = 99;
    c.run_model("opset from the future", &m, "opset 99 of the ONNX domain");
    let mut m = tiny();
    m.ir_version = 99;
    c.run_model("IR version from the future", &m, "IR version 99");
    let mut mp = to_proto(&tiny());
    mp.ir_version = None;
    c.inspect_proto("no IR version", &mp, "declares no IR version");
    let mut m = tiny();
    m.opsets.clear();
    c.run_model("no opset import", &m, "imports no opset");
    let mut m = tiny();
    m.graph.outputs.clear();
    c.run_model("no outputs", &m, "declares no outputs");
    let mut mp = to_proto(&tiny());
    mp.graph.as_mut().unwrap().node[0].op_type = None;
    c.inspect_proto("node without op type", &mp, "no op_type");
    let m = tiny_node(Node::new("Add", "add1", &["h"], &["y"]));
    c.run_model("missing required input", &m, "required input 1 is missing");

    // Tensors whose sizes or contents lie.
    c.inspect_proto(
        "absurd element count",
        &tiny_proto_with(f32_tensor(vec![1 << 40, 1 << 20])),
        "limit exceeded",
    );
    c.inspect_proto(
        "element count overflowing 64 bits",
        &tiny_proto_with(f32_tensor(vec![1 << 40, 1 << 40, 1 << 40])),
        "overflows",
    );
    c.inspect_proto(
        "negative dimension",
        &tiny_proto_with(f32_tensor(vec![4, -3])),
        "negative dimension -3",
    );
    let mut mp = to_proto(&tiny());
    let shape = mp.graph.as_mut().unwrap().output[0]
        .r#type
        .as_mut()
        .and_then(|t| match t.value.as_mut() {
            Some(proto::type_proto::Value::TensorType(tt)) => tt.shape.as_mut(),
            _ => None,
        })
        .unwrap();
    shape.dim[1].value = Some(proto::tensor_shape_proto::dimension::Value::DimValue(-1));
    c.inspect_proto(
        "negative declared dimension",
        &mp,
        "'y' has negative dimension -1",
    );
    c.inspect_proto(
        "raw data shorter than the shape",
        &tiny_proto_with(TensorProto {
            raw_data: Some(vec![0; 12]),
            ..f32_tensor(vec![4])
        }),
        "raw data has 12 bytes, but 4 elements of float32 need 16",
    );
    c.inspect_proto(
        "float_data shorter than the shape",
        &tiny_proto_with(TensorProto {
            float_data: vec![1.0, 2.0],
            ..f32_tensor(vec![4])
        }),
        "float_data has 2 values, but the shape needs 4",
    );
    c.inspect_proto(
        "unknown data type",
        &tiny_proto_with(TensorProto {
            data_type: Some(999),
            raw_data: Some(vec![0; 4]),
            ..f32_tensor(vec![1])
        }),
        "unknown data type code 999",
    );
    c.inspect_proto(
        "unsupported data type",
        &tiny_proto_with(TensorProto {
            data_type: Some(23),
            raw_data: Some(vec![0; 1]),
            ..f32_tensor(vec![1])
        }),
        "FLOAT4E2M1",
    );
    let mut mp = to_proto(&tiny());
    mp.graph
        .as_mut()
        .unwrap()
        .sparse_initializer
        .push(Default::default());
    c.inspect_proto("sparse initializer", &mp, "sparse initializers");

    // External data that escapes its folder or lies about its size.
    let inner = dir.join("model");
    std::fs::create_dir(&inner).unwrap();
    c.file("secret.bin", &[0u8; 64]);
    std::fs::write(inner.join("w.bin"), [0u8; 8]).unwrap();
    let mut ext = |name: &'static str, t: TensorProto, want: &str| {
        let p = inner.join(format!("{}.onnx", name.replace(' ', "_")));
        std::fs::write(&p, tiny_proto_with(t).encode_to_vec()).unwrap();
        c.case(name, &[&"inspect", &p], want);
    };
    ext(
        "external data in the parent folder",
        external("../secret.bin", 0, 16, 4),
        "'../secret.bin' contains '..'",
    );
    let abs = dir.join("secret.bin");
    ext(
        "external data at an absolute path",
        external(abs.to_str().unwrap(), 0, 16, 4),
        "is absolute",
    );
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(dir.join("secret.bin"), inner.join("link.bin")).unwrap();
        ext(
            "external data through a symlink",
            external("link.bin", 0, 16, 4),
            "outside the model's folder",
        );
    }
    ext(
        "external data past the end of its file",
        external("w.bin", 4, 8, 2),
        "runs past the end",
    );
    ext(
        "external data offset overflowing",
        external("w.bin", u64::MAX, 8, 2),
        "runs past the end",
    );
    ext(
        "external data file missing",
        external("nope.bin", 0, 8, 2),
        "nope.bin",
    );

    // Nodes whose attributes or operands make no sense.
    let m = conv(&[("kernel_shape", Attr::Floats(vec![1.5, 1.0]))]);
    c.run_model(
        "attribute of the wrong type",
        &m,
        "attribute 'kernel_shape' is not a list of ints",
    );
    let m = conv(&[("strides", Attr::Ints(vec![0, 0]))]);
    c.run_model("zero stride", &m, "must be positive");
    let m = conv(&[("pads", Attr::Ints(vec![-5, 0, 0, 0]))]);
    c.run_model("negative padding", &m, "pads must not be negative");
    let mut m = conv(&[]);
    m.graph.inputs[0].shape = Some(vec![Dim::Fixed(1), Dim::Fixed(4)]);
    c.run_model("conv on a matrix", &m, "1 to 3 spatial dimensions");
    let m = with_const(
        tiny_node(Node::new("Reshape", "rs", &["h", "s"], &["y"])),
        "s",
        i64s(&[3, 3]),
    );
    c.run_model("reshape to the wrong size", &m, "cannot reshape [1, 4]");
    let m = with_const(
        tiny_node(Node::new("Gather", "ga", &["h", "i"], &["y"]).with_attr("axis", Attr::Int(1))),
        "i",
        i64s(&[7]),
    );
    c.run_model("gather index out of range", &m, "index 7 is out of range");
    let m = with_const(
        tiny_node(Node::new("ConstantOfShape", "cos", &["s"], &["y"])),
        "s",
        i64s(&[1 << 20, 1 << 20]),
    );
    c.run_model(
        "tensor of 2^40 elements made at run time",
        &m,
        "limit exceeded",
    );
    let m = with_const(
        tiny_node(Node::new("Tile", "tile", &["h", "r"], &["y"])),
        "r",
        i64s(&[1 << 30, 1 << 30]),
    );
    c.run_model("tile past any memory", &m, "limit exceeded");
    let m = with_const(
        tiny_node(Node::new("Add", "add", &["h", "b"], &["y"])),
        "b",
        Tensor::from_vec(vec![1, 4], vec![1i64; 4]).unwrap(),
    );
    c.run_model("operands of different types", &m, "same dtype");
    let m = with_const(
        tiny_node(Node::new("Add", "add_bias", &["h", "b"], &["y"])),
        "b",
        Tensor::from_vec(vec![3], vec![1f32; 3]).unwrap(),
    );
    c.run_model("shapes that do not broadcast", &m, "add_bias");

    // Weights that are not numbers.
    let p = c.model("nan.onnx", &matmul(vec![f32::NAN, 1.0, 2.0, 3.0]));
    c.case(
        "NaN weights (quantize)",
        &[&"quantize", &p, &"-o", &out, &"--mode", &"weight-only"],
        "weight element 0 is NaN",
    );
    let p = c.model("inf.onnx", &matmul(vec![1.0, f32::INFINITY, 2.0, 3.0]));
    c.case(
        "infinite weights (prune)",
        &[&"prune", &p, &"-o", &out, &"--sparsity", &"0.5"],
        "contains NaN or Inf",
    );

    // Inputs to one run.
    let tiny_path = c.model("tiny.onnx", &tiny());
    let x = dir.join("x23.npy");
    write_npy(&x, &Tensor::from_vec(vec![2, 3], vec![0f32; 6]).unwrap());
    let feed = format!("x={}", x.display());
    c.case(
        "input of the wrong shape",
        &[&"run", &tiny_path, &"--input", &feed],
        "input 'x' must have shape [1, 4], got [2, 3]",
    );
    let x = dir.join("x64.npy");
    write_npy(&x, &Tensor::from_vec(vec![1, 4], vec![0f64; 4]).unwrap());
    let feed = format!("x={}", x.display());
    c.case(
        "input of the wrong type",
        &[&"run", &tiny_path, &"--input", &feed],
        "must be float32, got float64",
    );
    let feed = format!("nope={}", x.display());
    c.case(
        "input the model does not have",
        &[&"run", &tiny_path, &"--input", &feed],
        "no input named 'nope'",
    );
    let mut npy = b"\x93NUMPY\x01\x00\x10\x00".to_vec();
    npy.extend(b"{garbage}      \n");
    let p = c.file("garbage.npy", &npy);
    let feed = format!("x={}", p.display());
    c.case(
        "npy with a garbage header",
        &[&"run", &tiny_path, &"--input", &feed],
        "not a .npy file",
    );
    let good = dir.join("good.npy");
    write_npy(&good, &Tensor::from_vec(vec![1, 4], vec![0f32; 4]).unwrap());
    let bytes = std::fs::read(&good).unwrap();
    let p = c.file("short.npy", &bytes[..bytes.len() - 8]);
    let feed = format!("x={}", p.display());
    c.case(
        "npy shorter than its header says",
        &[&"run", &tiny_path, &"--input", &feed],
        "short.npy",
    );

    // Datasets.
    c.case(
        "data that does not fit the model",
        &[&"eval", &tiny_path, &"--data", &mnist, &"--limit", &"2"],
        "input 'x' must have shape",
    );
    let img = |n: usize| Tensor::from_vec(vec![n, 1, 28, 28], vec![0f32; n * 784]).unwrap();
    let labels = |v: &[i64]| Tensor::from_vec(vec![v.len()], v.to_vec()).unwrap();
    let mut data_case = |name: &'static str, arrays: &[(&str, &Tensor)], want: &str| {
        let p = dir.join(format!("{}.npz", name.replace(' ', "_")));
        smelt_data::write_npz(&p, arrays).unwrap();
        c.case(name, &[&"eval", &mnist8, &"--data", &p], want);
    };
    data_case("empty dataset", &[("x", &img(0))], "dataset is empty");
    data_case("npz without x", &[("z", &img(2))], "no array named `x`");
    data_case(
        "fewer labels than samples",
        &[("x", &img(3)), ("y", &labels(&[1, 2]))],
        "label count mismatch",
    );
    data_case(
        "labels outside the classes",
        &[("x", &img(3)), ("y", &labels(&[1, 99, 2]))],
        "label 99 of sample 1 is outside the model's 10 classes",
    );
    let p = c.file("garbage.npz", b"PK\x03\x04garbage");
    c.case(
        "npz that is not a zip",
        &[&"eval", &mnist8, &"--data", &p],
        "invalid Zip archive",
    );
    let idx = |name: &str, images: &[u8]| {
        let d = dir.join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("t10k-images-idx3-ubyte"), images).unwrap();
        std::fs::copy(
            mnist.join("t10k-labels-idx1-ubyte"),
            d.join("t10k-labels-idx1-ubyte"),
        )
        .unwrap();
        d
    };
    let mut magic = b"\0\0\x08\x09".to_vec();
    magic.extend([0u8; 64]);
    let d = idx("idx-magic", &magic);
    c.case(
        "idx file with the wrong magic",
        &[&"eval", &mnist8, &"--data", &d],
        "bad magic",
    );
    let images = std::fs::read(mnist.join("t10k-images-idx3-ubyte")).unwrap();
    let d = idx("idx-truncated", &images[..1000]);
    c.case(
        "idx file truncated",
        &[&"eval", &mnist8, &"--data", &d],
        "truncated",
    );
    let mut huge = b"\0\0\x08\x03".to_vec();
    for v in [0x7fff_ffffu32, 0x7fff_ffff, 28] {
        huge.extend(v.to_be_bytes());
    }
    let d = idx("idx-huge", &huge);
    c.case(
        "idx header with absurd dimensions",
        &[&"eval", &mnist8, &"--data", &d],
        "limit exceeded",
    );
    let empty_dir = dir.join("no-data");
    std::fs::create_dir(&empty_dir).unwrap();
    c.case(
        "empty data folder",
        &[&"eval", &mnist8, &"--data", &empty_dir],
        "no MNIST images file",
    );
    let minilm = a.join("minilm-int8/model.onnx");
    let tokenizer = a.join("minilm/tokenizer.json");
    let p = c.file("empty.txt", b"");
    c.case(
        "empty text corpus",
        &[&"eval", &minilm, &"--data", &p, &"--tokenizer", &tokenizer],
        "dataset is empty",
    );
    let bad_tok = c.file("tokenizer.json", br#"{"model": 3"#);
    c.case(
        "broken tokenizer",
        &[
            &"eval",
            &minilm,
            &"--data",
            &a.join("brown"),
            &"--tokenizer",
            &bad_tok,
        ],
        "tokenizer.json: cannot load",
    );

    // Recipes.
    let mut recipe = |name: &'static str, toml: &str, want: &str| {
        let p = dir.join(format!("{}.toml", name.replace(' ', "_")));
        std::fs::write(&p, toml).unwrap();
        c.case(
            name,
            &[
                &"compress",
                &mnist8,
                &"-o",
                &out,
                &"--recipe",
                &p,
                &"--data",
                &mnist,
                &"--limit",
                &"10",
            ],
            want,
        );
    };
    let stage = "name = \"r\"\n[[stage]]\n";
    recipe(
        "recipe with an unknown key",
        &format!("{stage}kind = \"prune\"\nsparsty = 0.5\n"),
        "unknown field `sparsty`",
    );
    recipe(
        "recipe that is not TOML",
        "name = \"r\"\n[[stage]\n",
        "invalid table header",
    );
    recipe(
        "recipe with an unknown stage",
        &format!("{stage}kind = \"melt\"\n"),
        "unknown variant `melt`",
    );
    recipe(
        "recipe with sparsity out of range",
        &format!("{stage}kind = \"prune\"\npattern = \"unstructured\"\nsparsity = 1.5\n"),
        "sparsity 1.5 is outside [0, 1)",
    );
    recipe("recipe without stages", "name = \"r\"\n", "no [[stage]]");

    // Options and outputs.
    c.case(
        "output over the input",
        &[&"convert", &tiny_path, &"-o", &tiny_path],
        "refusing to overwrite",
    );
    let nowhere = dir.join("no/such/folder/out.onnx");
    c.case(
        "output folder missing",
        &[&"convert", &tiny_path, &"-o", &nowhere],
        "does not exist",
    );
    let p = c.file("masks.safetensors", b"\x10\0\0\0\0\0\0\0not json");
    c.case(
        "masks file that is not safetensors",
        &[
            &"finetune",
            &mnist8,
            &"-o",
            &out,
            &"--data",
            &mnist,
            &"--masks",
            &p,
            &"--limit",
            &"10",
        ],
        "not a masks file",
    );
    c.case(
        "exclusion matching nothing",
        &[
            &"quantize",
            &mnist8,
            &"-o",
            &out,
            &"--mode",
            &"weight-only",
            &"--exclude",
            &"NoSuchNode",
        ],
        "matches no node",
    );
    c.case(
        "percentile out of range",
        &[
            &"quantize",
            &mnist8,
            &"-o",
            &out,
            &"--calib",
            &mnist,
            &"--observer",
            &"percentile",
            &"--percentile",
            &"150",
        ],
        "--percentile must be in (50, 100]",
    );
    c.case(
        "N:M pattern with N >= M",
        &[&"prune", &mnist8, &"-o", &out, &"--pattern", &"3:2"],
        "0 < N < M",
    );
    c.case(
        "sparsity of 1.5",
        &[&"prune", &mnist8, &"-o", &out, &"--sparsity", &"1.5"],
        "sparsity 1.5 is outside [0, 1)",
    );

    // Configured limits.
    c.case(
        "tensor larger than --max-tensor-elements",
        &[&"inspect", &mnist8, &"--max-tensor-elements", &"1000"],
        "more than the limit of 1000",
    );
    c.case(
        "model larger than --max-model-bytes",
        &[&"inspect", &mnist8, &"--max-model-bytes", &"10000"],
        "more than the limit of 10000",
    );
    let m = with_const(
        tiny_node(Node::new("ConstantOfShape", "big", &["s"], &["y"])),
        "s",
        i64s(&[1 << 13, 1 << 13]),
    );
    let p = c.model("big.onnx", &m);
    c.case(
        "run past --max-memory",
        &[&"run", &p, &"--max-memory", &"64M"],
        "would pass --max-memory 67108864",
    );
    c
}

/// Every file under `dir`, with its contents, to prove a failing command changed nothing.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p);
            } else {
                let bytes = if meta.is_file() {
                    std::fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                out.insert(p, bytes);
            }
        }
    }
    out
}

#[test]
fn every_bad_input_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = build_corpus(dir.path());
    let names: std::collections::BTreeSet<_> = corpus.cases.iter().map(|c| c.0).collect();
    assert_eq!(
        names.len(),
        corpus.cases.len(),
        "case names must be distinct"
    );
    assert!(corpus.cases.len() >= 40, "{} cases", corpus.cases.len());

    eprintln!("{} bad inputs", corpus.cases.len());
    let before = snapshot(dir.path());
    let mut failures = Vec::new();
    for (name, args, want) in &corpus.cases {
        let out = smelt().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        let problem = if out.status.code() != Some(1) {
            Some(format!("exit code {:?}", out.status.code()))
        } else if err.contains("panicked") || err.contains("internal error") {
            Some("panic".into())
        } else if lines.len() != 1 || !lines[0].starts_with("error: ") {
            Some("not one `error:` line".into())
        } else if !err.contains(want.as_str()) {
            Some(format!("message lacks {want:?}"))
        } else if snapshot(dir.path()) != before {
            Some("files changed".into())
        } else {
            None
        };
        if let Some(p) = problem {
            failures.push(format!("{name}: {p}\n    stderr: {}", err.trim()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs misbehaved:\n{}",
        failures.len(),
        corpus.cases.len(),
        failures.join("\n")
    );
}
