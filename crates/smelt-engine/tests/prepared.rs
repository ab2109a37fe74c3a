//! What a session keeps across runs never changes a result. Weights packed once
//! (`ops::Prepared`) follow the weights: a replaced initializer, or a weight that a feed
//! overrides (IR < 4 files list initializers as inputs), never runs on a stale packing, and a
//! convolution's plan never serves another input shape. Recycled output buffers
//! (`buffers::Buffers`) hold the last run's values, which no kernel may read.

use smelt_engine::Session;
use smelt_ir::{Attr, Dim, Graph, Model, Node, ValueInfo};
use smelt_tensor::{DType, Tensor};

fn matmul_model(listed: bool) -> Model {
    let mut g = Graph::default();
    let dims = |d: &[usize]| d.iter().map(|&v| Dim::Fixed(v)).collect();
    g.inputs
        .push(ValueInfo::new("x", DType::F32, dims(&[3, 4])));
    if listed {
        g.inputs
            .push(ValueInfo::new("w", DType::F32, dims(&[4, 2])));
    }
    g.outputs
        .push(ValueInfo::new("y", DType::F32, dims(&[3, 2])));
    g.initializers.insert("w".into(), weights(1.0));
    g.nodes.push(Node::new("MatMul", "mm", &["x", "w"], &["y"]));
    Model::new(g, 17)
}

fn weights(k: f32) -> Tensor {
    Tensor::from_vec(vec![4, 2], (0..8).map(|i| k * (i as f32 - 3.0)).collect()).unwrap()
}

/// `x @ w` by its definition.
fn product(x: &Tensor, w: &Tensor) -> Vec<f32> {
    let (x, w) = (x.as_slice::<f32>().unwrap(), w.as_slice::<f32>().unwrap());
    let mut y = vec![0f32; 6];
    for i in 0..3 {
        for j in 0..2 {
            y[i * 2 + j] = (0..4).map(|k| x[i * 4 + k] * w[k * 2 + j]).sum();
        }
    }
    y
}

fn run(s: &Session, feeds: &[(&str, Tensor)]) -> Vec<f32> {
    let out = s.run(feeds).unwrap();
    out[0].1.as_slice::<f32>().unwrap().to_vec()
}

#[test]
fn a_replaced_initializer_is_packed_again() {
    let x = Tensor::from_vec(vec![3, 4], (0..12).map(|i| i as f32 * 0.5).collect()).unwrap();
    let mut s = Session::new(matmul_model(false)).unwrap();
    for _ in 0..2 {
        assert_eq!(run(&s, &[("x", x.clone())]), product(&x, &weights(1.0)));
    }
    s.set_initializer("w", weights(-2.0)).unwrap();
    assert_eq!(run(&s, &[("x", x.clone())]), product(&x, &weights(-2.0)));
}

#[test]
fn a_fed_weight_is_never_cached() {
    let x = Tensor::from_vec(vec![3, 4], (0..12).map(|i| i as f32 - 4.0).collect()).unwrap();
    let s = Session::new(matmul_model(true)).unwrap();
    for k in [3.0, -1.0] {
        // Unfed, the listed initializer is a constant and its packing is kept.
        assert_eq!(run(&s, &[("x", x.clone())]), product(&x, &weights(1.0)));
        let got = run(&s, &[("x", x.clone()), ("w", weights(k))]);
        assert_eq!(got, product(&x, &weights(k)));
    }
    assert_eq!(run(&s, &[("x", x.clone())]), product(&x, &weights(1.0)));
}

/// A Conv (bias, 3x3, pad 1) whose input's batch and spatial size vary between runs.
fn conv_model(listed: bool) -> Model {
    let mut g = Graph::default();
    let sym = |n: &str| Dim::Sym(n.into());
    let x = vec![sym("n"), Dim::Fixed(3), sym("h"), sym("w")];
    g.inputs.push(ValueInfo::new("x", DType::F32, x));
    if listed {
        let w = [8, 3, 3, 3].iter().map(|&d| Dim::Fixed(d)).collect();
        g.inputs.push(ValueInfo::new("w", DType::F32, w));
    }
    let y = vec![sym("n"), Dim::Fixed(8), sym("h"), sym("w")];
    g.outputs.push(ValueInfo::new("y", DType::F32, y));
    g.initializers.insert("w".into(), conv_weights(1.0));
    let b = Tensor::from_vec(vec![8], (0..8).map(|i| i as f32 * 0.25 - 1.0).collect());
    g.initializers.insert("b".into(), b.unwrap());
    let pads = Attr::Ints(vec![1, 1, 1, 1]);
    let node = Node::new("Conv", "conv", &["x", "w", "b"], &["y"]).with_attr("pads", pads);
    g.nodes.push(node);
    Model::new(g, 17)
}

fn conv_weights(k: f32) -> Tensor {
    let v = (0..216).map(|i| k * (((i * 7) % 13) as f32 - 6.0) / 8.0);
    Tensor::from_vec(vec![8, 3, 3, 3], v.collect()).unwrap()
}

/// The convolution by its definition, bias from `b[o] = o / 4 - 1`.
fn conv_reference(x: &Tensor, w: &Tensor) -> Vec<f32> {
    let (n, h, wd) = (x.shape()[0], x.shape()[2], x.shape()[3]);
    let (x, w) = (x.as_slice::<f32>().unwrap(), w.as_slice::<f32>().unwrap());
    let mut y = vec![0f32; n * 8 * h * wd];
    for (i, out) in y.iter_mut().enumerate() {
        let (b, o, r, c) = (i / (8 * h * wd), i / (h * wd) % 8, i / wd % h, i % wd);
        let mut acc = o as f32 * 0.25 - 1.0;
        for ci in 0..3 {
            for ky in 0..3 {
                for kx in 0..3 {
                    let (yy, xx) = ((r + ky) as isize - 1, (c + kx) as isize - 1);
                    if (0..h as isize).contains(&yy) && (0..wd as isize).contains(&xx) {
                        let xv = x[((b * 3 + ci) * h + yy as usize) * wd + xx as usize];
                        acc += xv * w[((o * 3 + ci) * 3 + ky) * 3 + kx];
                    }
                }
            }
        }
        *out = acc;
    }
    y
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(p, q)| (p - q).abs() <= 1e-4 * (1.0 + q.abs()))
}

#[test]
fn a_conv_plan_follows_the_input_shape_and_the_weights() {
    let image = |n: usize, h: usize, w: usize| {
        let v = (0..n * 3 * h * w).map(|i| ((i * 5) % 11) as f32 * 0.3 - 1.5);
        Tensor::from_vec(vec![n, 3, h, w], v.collect()).unwrap()
    };
    for listed in [false, true] {
        let s = Session::new(conv_model(listed)).unwrap();
        // The plan is made for the first geometry; other sizes and batches must not use it.
        for (n, h, w) in [(1, 6, 6), (3, 6, 6), (2, 9, 17), (1, 6, 6), (2, 20, 5)] {
            let x = image(n, h, w);
            let got = run(&s, &[("x", x.clone())]);
            assert!(
                close(&got, &conv_reference(&x, &conv_weights(1.0))),
                "{n}x{h}x{w}"
            );
            if listed {
                let fed = run(&s, &[("x", x.clone()), ("w", conv_weights(-0.5))]);
                assert!(
                    close(&fed, &conv_reference(&x, &conv_weights(-0.5))),
                    "fed {h}x{w}"
                );
            }
        }
    }
}

/// `x [4, 4, 24, 24] -> Conv (`oc` outputs, `attrs`; through QDQ when `qdq`) -> Neg -> y`:
/// the Neg makes the convolution's output a freed value, so its buffer is recycled.
fn conv_then_neg(
    oc: usize,
    group: usize,
    k: usize,
    attrs: &[(&str, Vec<i64>)],
    qdq: bool,
) -> Model {
    let mut g = Graph::default();
    let dims = |d: &[usize]| d.iter().map(|&v| Dim::Fixed(v)).collect::<Vec<_>>();
    g.inputs
        .push(ValueInfo::new("x", DType::F32, dims(&[4, 4, 24, 24])));
    g.outputs.push(ValueInfo::new("y", DType::F32, vec![]));
    let cg = 4 / group;
    let n = oc * cg * k * k;
    let codes: Vec<i8> = (0..n).map(|i| ((i * 37) % 29) as i8 - 14).collect();
    let b = Tensor::from_vec(vec![oc], (0..oc).map(|i| i as f32 * 0.1 - 0.4).collect());
    g.initializers.insert("b".into(), b.unwrap());
    let mut conv = Node::new("Conv", "conv", &["xin", "w", "b"], &["c"]);
    conv = conv.with_attr("group", Attr::Int(group as i64));
    for (key, v) in attrs {
        conv = conv.with_attr(key, Attr::Ints(v.clone()));
    }
    input_and_weight(&mut g, codes, vec![oc, cg, k, k], 0, qdq);
    g.nodes.push(conv);
    g.nodes.push(Node::new("Neg", "neg", &["c"], &["y"]));
    Model::new(g, 17)
}

#[test]
fn a_later_run_equals_a_fresh_sessions_run_on_every_convolution_path() {
    let input = |k: usize| {
        let v = (0..4 * 4 * 24 * 24).map(|i| (((i * k) % 23) as f32 - 11.0) * 0.13);
        Tensor::from_vec(vec![4, 4, 24, 24], v.collect()).unwrap()
    };
    let pad1 = ("pads", vec![1, 1, 1, 1]);
    let stride2 = ("strides", vec![2, 2]);
    let cases = [
        (
            "pixel-wise",
            conv_then_neg(8, 1, 3, std::slice::from_ref(&pad1), false),
        ),
        (
            "channel-wise",
            conv_then_neg(32, 1, 3, std::slice::from_ref(&pad1), false),
        ),
        (
            "im2col",
            conv_then_neg(8, 1, 3, &[stride2.clone(), pad1.clone()], false),
        ),
        ("pointwise", conv_then_neg(8, 1, 1, &[], false)),
        (
            "depthwise",
            conv_then_neg(8, 4, 3, std::slice::from_ref(&pad1), false),
        ),
        (
            "grouped",
            conv_then_neg(8, 2, 3, std::slice::from_ref(&pad1), false),
        ),
        (
            "int8 direct",
            conv_then_neg(16, 1, 3, std::slice::from_ref(&pad1), true),
        ),
        (
            "int8 im2col",
            conv_then_neg(16, 1, 3, std::slice::from_ref(&stride2), true),
        ),
    ];
    for (what, m) in cases {
        later_run_is_fresh(what, m, input(5), input(7));
    }
}

/// Runs `m` on `a` then on `b` in one session: the second run must equal a fresh session's
/// run on `b` bit for bit. Names starting "int8" must run on an integer kernel.
fn later_run_is_fresh(what: &str, m: Model, a: Tensor, b: Tensor) {
    let s = Session::new(m.clone()).unwrap();
    if what.starts_with("int8") {
        assert_eq!(s.integer_layers(), 1, "{what}");
    }
    let first = run(&s, &[("x", a)]);
    let again = run(&s, &[("x", b.clone())]);
    let fresh = run(&Session::new(m).unwrap(), &[("x", b)]);
    assert_ne!(first, fresh, "{what}: the inputs must differ");
    let same = again
        .iter()
        .zip(&fresh)
        .all(|(p, q)| p.to_bits() == q.to_bits());
    assert!(same && again.len() == fresh.len(), "{what}");
}

/// `x [rows, 64] -> MatMul (a constant [64, 80], through QDQ when `qdq`) -> Neg -> y`.
fn matmul_then_neg(rows: usize, qdq: bool) -> Model {
    let mut g = Graph::default();
    let dims = |d: &[usize]| d.iter().map(|&v| Dim::Fixed(v)).collect::<Vec<_>>();
    g.inputs
        .push(ValueInfo::new("x", DType::F32, dims(&[rows, 64])));
    g.outputs.push(ValueInfo::new("y", DType::F32, vec![]));
    let codes: Vec<i8> = (0..64 * 80).map(|i| ((i * 41) % 31) as i8 - 15).collect();
    input_and_weight(&mut g, codes, vec![64, 80], 1, qdq);
    g.nodes
        .push(Node::new("MatMul", "mm", &["xin", "w"], &["c"]));
    g.nodes.push(Node::new("Neg", "neg", &["c"], &["y"]));
    Model::new(g, 17)
}

#[test]
fn a_later_run_equals_a_fresh_sessions_run_on_every_matmul_path() {
    let input = |rows: usize, k: usize| {
        let v = (0..rows * 64).map(|i| (((i * k) % 19) as f32 - 9.0) * 0.11);
        Tensor::from_vec(vec![rows, 64], v.collect()).unwrap()
    };
    // Packed weights (few rows) and per-call packing (many), float and integer.
    for rows in [64, 1100] {
        for qdq in [false, true] {
            let what = format!("{} {rows} rows", if qdq { "int8" } else { "f32" });
            let m = matmul_then_neg(rows, qdq);
            later_run_is_fresh(&what, m, input(rows, 5), input(rows, 7));
        }
    }
    // Both sides computed: x [4, 32, 64] @ its transpose.
    let mut g = Graph::default();
    let x = [4, 32, 64].iter().map(|&d| Dim::Fixed(d)).collect();
    g.inputs.push(ValueInfo::new("x", DType::F32, x));
    g.outputs.push(ValueInfo::new("y", DType::F32, vec![]));
    let perm = Attr::Ints(vec![0, 2, 1]);
    g.nodes
        .push(Node::new("Transpose", "t", &["x"], &["xt"]).with_attr("perm", perm));
    g.nodes
        .push(Node::new("MatMul", "mm", &["x", "xt"], &["c"]));
    g.nodes.push(Node::new("Neg", "neg", &["c"], &["y"]));
    let batch = |k: usize| {
        let v = (0..4 * 32 * 64).map(|i| (((i * k) % 17) as f32 - 8.0) * 0.07);
        Tensor::from_vec(vec![4, 32, 64], v.collect()).unwrap()
    };
    later_run_is_fresh("batched", Model::new(g, 17), batch(5), batch(7));
}

/// Adds `x -> xin` and the weight `w` of shape `shape` to `g`: with `qdq`, `x` through a
/// QuantizeLinear / DequantizeLinear pair and `w` dequantized from int8 `codes` with one scale
/// per slice along `axis`; without, `x` as is and `w` as the floats `codes / 32`.
fn input_and_weight(g: &mut Graph, codes: Vec<i8>, shape: Vec<usize>, axis: usize, qdq: bool) {
    if !qdq {
        let w = codes.iter().map(|&c| c as f32 / 32.0).collect();
        g.initializers
            .insert("w".into(), Tensor::from_vec(shape, w).unwrap());
        g.nodes.push(Node::new("Identity", "id", &["x"], &["xin"]));
        return;
    }
    let ws = (0..shape[axis]).map(|i| 0.01 + i as f32 * 0.002).collect();
    let inits = [
        ("s", Tensor::scalar(0.02f32)),
        ("z", Tensor::scalar(128u8)),
        ("ws", Tensor::from_vec(vec![shape[axis]], ws).unwrap()),
        ("wq", Tensor::from_vec(shape, codes).unwrap()),
    ];
    for (name, t) in inits {
        g.initializers.insert(name.into(), t);
    }
    let (q, d) = (&["x", "s", "z"], &["xq", "s", "z"]);
    g.nodes.push(Node::new("QuantizeLinear", "q", q, &["xq"]));
    g.nodes
        .push(Node::new("DequantizeLinear", "d", d, &["xin"]));
    let dw = Node::new("DequantizeLinear", "dw", &["wq", "ws"], &["w"]);
    g.nodes.push(dw.with_attr("axis", Attr::Int(axis as i64)));
}
