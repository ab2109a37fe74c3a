//! Every gradient against central finite differences of the forward op: for a random
//! projection r, d/dx sum(op(x) * r) computed by `grad::backward` must match
//! (L(x + h) - L(x - h)) / 2h element by element.

use smelt_engine::{grad, RunOptions, Session};
use smelt_ir::{Attr, Dim, Graph, Model, Node, OpsetImport, ValueInfo};
use smelt_tensor::{DType, Tensor};
use std::collections::HashMap;

struct Rng(u64);
impl Rng {
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (hi - lo) * ((self.0 >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn tensor(&mut self, shape: &[usize], lo: f32, hi: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(
            shape.to_vec(),
            (0..n).map(|_| self.uniform(lo, hi)).collect(),
        )
        .unwrap()
    }
    /// Distinct values 0.05 apart in random order: a max never changes under a 0.01 nudge.
    fn spaced(&mut self, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.05 - n as f32 * 0.025).collect();
        for i in (1..n).rev() {
            let j = (self.uniform(0.0, 1.0) * (i + 1) as f32) as usize % (i + 1);
            v.swap(i, j);
        }
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }
    /// Values with |v| in [0.2, 1]: away from the kinks of ReLU-like ops.
    fn away_from_zero(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let v = (0..n)
            .map(|_| {
                let m = self.uniform(0.2, 1.0);
                if self.uniform(0.0, 1.0) < 0.5 {
                    -m
                } else {
                    m
                }
            })
            .collect();
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }
}

struct Case {
    op: &'static str,
    attrs: Vec<(&'static str, Attr)>,
    /// Differentiable inputs (runtime values), in input order unless `order` says otherwise.
    x: Vec<Tensor>,
    /// Constant inputs appended after `x` (shapes, axes, Clip bounds, BatchNorm statistics).
    consts: Vec<Tensor>,
    /// Input slots: Some(i) = x[i], None = next constant.
    order: Option<Vec<Option<usize>>>,
    opset: i64,
}

fn case(op: &'static str, attrs: Vec<(&'static str, Attr)>, x: Vec<Tensor>) -> Case {
    Case {
        op,
        attrs,
        x,
        consts: vec![],
        order: None,
        opset: 13,
    }
}

fn check(c: Case) {
    let mut g = Graph::default();
    let order = c.order.clone().unwrap_or_else(|| {
        (0..c.x.len())
            .map(Some)
            .chain(c.consts.iter().map(|_| None))
            .collect()
    });
    let mut consts = c.consts.iter();
    let mut names = Vec::new();
    for (k, slot) in order.iter().enumerate() {
        let name = format!("in{k}");
        match slot {
            Some(i) => {
                let t = &c.x[*i];
                g.inputs.push(ValueInfo::new(
                    &name,
                    DType::F32,
                    t.shape().iter().map(|&d| Dim::Fixed(d)).collect(),
                ));
            }
            None => {
                g.initializers
                    .insert(name.clone(), consts.next().unwrap().clone());
            }
        }
        names.push(name);
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut node = Node::new(c.op, "n", &refs, &["y"]);
    for (k, v) in c.attrs {
        node = node.with_attr(k, v);
    }
    g.nodes.push(node);
    g.outputs.push(ValueInfo {
        name: "y".into(),
        dtype: Some(DType::F32),
        shape: None,
        doc_string: String::new(),
    });
    let model = Model {
        ir_version: 8,
        opsets: vec![OpsetImport {
            domain: String::new(),
            version: c.opset,
        }],
        graph: g,
        ..Default::default()
    };
    let s = Session::new(model.clone()).unwrap();
    let feeds: Vec<(String, Tensor)> = order
        .iter()
        .enumerate()
        .filter_map(|(k, slot)| slot.map(|i| (names[k].clone(), c.x[i].clone())))
        .collect();
    let run = |f: &[(String, Tensor)]| -> Tensor {
        let inputs: Vec<(&str, Tensor)> = f.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        s.run_with(&inputs, &RunOptions::default())
            .unwrap()
            .0
            .remove(0)
            .1
    };
    let y = run(&feeds);
    let r = Rng(99).tensor(y.shape(), -1.0, 1.0);
    let rv = r.as_slice::<f32>().unwrap().to_vec();
    let loss = |f: &[(String, Tensor)]| -> f64 {
        let y = run(f);
        y.as_slice::<f32>()
            .unwrap()
            .iter()
            .zip(&rv)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    let mut values: HashMap<String, Tensor> = feeds.iter().cloned().collect();
    values.insert("y".into(), y);
    let wrt: Vec<String> = feeds.iter().map(|f| f.0.clone()).collect();
    let grads = grad::backward(&model, &values, &[("y".into(), r.clone())], &wrt).unwrap();
    let h = 1e-2f32;
    for (fi, (name, t)) in feeds.iter().enumerate() {
        let g = &grads[name];
        assert_eq!(g.shape(), t.shape(), "{}: gradient shape of {name}", c.op);
        let gv = g.as_slice::<f32>().unwrap();
        for (j, &a) in gv.iter().enumerate() {
            let mut plus = feeds.clone();
            let mut minus = feeds.clone();
            plus[fi].1.as_mut_slice::<f32>().unwrap()[j] += h;
            minus[fi].1.as_mut_slice::<f32>().unwrap()[j] -= h;
            let num = (loss(&plus) - loss(&minus)) / (2.0 * h as f64);
            let a = a as f64;
            assert!(
                (a - num).abs() <= 2e-3 + 2e-2 * num.abs().max(a.abs()),
                "{}: d/d{name}[{j}] analytic {a} vs numeric {num}",
                c.op
            );
        }
    }
}

fn ints(v: &[i64]) -> Attr {
    Attr::Ints(v.to_vec())
}

#[test]
fn elementwise_with_broadcasting() {
    let mut r = Rng(1);
    check(case(
        "Add",
        vec![],
        vec![r.tensor(&[2, 3], -1.0, 1.0), r.tensor(&[3], -1.0, 1.0)],
    ));
    check(case(
        "Sub",
        vec![],
        vec![r.tensor(&[2, 3], -1.0, 1.0), r.tensor(&[2, 1], -1.0, 1.0)],
    ));
    check(case(
        "Mul",
        vec![],
        vec![
            r.tensor(&[2, 1, 3], -1.0, 1.0),
            r.tensor(&[4, 1], -1.0, 1.0),
        ],
    ));
    check(case(
        "Div",
        vec![],
        vec![r.tensor(&[2, 3], -1.0, 1.0), r.tensor(&[3], 0.5, 1.5)],
    ));
    check(case(
        "Pow",
        vec![],
        vec![r.tensor(&[2, 3], 0.5, 1.5), r.tensor(&[3], 0.5, 2.5)],
    ));
}

#[test]
fn activations() {
    let mut r = Rng(2);
    for op in [
        "Relu",
        "Sigmoid",
        "Tanh",
        "Exp",
        "Erf",
        "Neg",
        "Identity",
        "HardSwish",
    ] {
        check(case(op, vec![], vec![r.away_from_zero(&[3, 4])]));
    }
    check(case(
        "LeakyRelu",
        vec![("alpha", Attr::Float(0.1))],
        vec![r.away_from_zero(&[3, 4])],
    ));
    check(case(
        "HardSigmoid",
        vec![],
        vec![r.tensor(&[3, 4], -2.0, 2.0)],
    ));
    for op in ["Log", "Sqrt"] {
        check(case(op, vec![], vec![r.tensor(&[3, 4], 0.5, 2.0)]));
    }
    let mut clip = case("Clip", vec![], vec![r.away_from_zero(&[3, 4])]);
    clip.consts = vec![Tensor::scalar(-0.5f32), Tensor::scalar(0.5f32)];
    // Keep inputs away from the bounds too.
    let v: Vec<f32> = clip.x[0]
        .as_slice::<f32>()
        .unwrap()
        .iter()
        .map(|x| {
            if (x.abs() - 0.5).abs() < 0.05 {
                x * 0.7
            } else {
                *x
            }
        })
        .collect();
    clip.x[0] = Tensor::from_vec(vec![3, 4], v).unwrap();
    check(clip);
}

#[test]
fn convolutions() {
    let mut r = Rng(3);
    // Plain, strided and padded, with bias.
    check(case(
        "Conv",
        vec![("pads", ints(&[1, 1, 1, 1])), ("strides", ints(&[2, 2]))],
        vec![
            r.tensor(&[2, 3, 5, 5], -1.0, 1.0),
            r.tensor(&[4, 3, 3, 3], -0.5, 0.5),
            r.tensor(&[4], -0.5, 0.5),
        ],
    ));
    // Grouped.
    check(case(
        "Conv",
        vec![("group", Attr::Int(2)), ("pads", ints(&[0, 1, 0, 1]))],
        vec![
            r.tensor(&[1, 4, 4, 4], -1.0, 1.0),
            r.tensor(&[4, 2, 3, 2], -0.5, 0.5),
        ],
    ));
    // Depthwise with dilation.
    check(case(
        "Conv",
        vec![
            ("group", Attr::Int(3)),
            ("dilations", ints(&[2, 2])),
            ("pads", ints(&[2, 2, 2, 2])),
        ],
        vec![
            r.tensor(&[1, 3, 5, 5], -1.0, 1.0),
            r.tensor(&[3, 1, 3, 3], -0.5, 0.5),
            r.tensor(&[3], -0.5, 0.5),
        ],
    ));
}

#[test]
fn matrix_products() {
    let mut r = Rng(4);
    for (ta, tb) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
        let a = if ta == 1 { [4, 3] } else { [3, 4] };
        let b = if tb == 1 { [5, 4] } else { [4, 5] };
        check(case(
            "Gemm",
            vec![
                ("transA", Attr::Int(ta)),
                ("transB", Attr::Int(tb)),
                ("alpha", Attr::Float(0.7)),
                ("beta", Attr::Float(1.3)),
            ],
            vec![
                r.tensor(&a, -1.0, 1.0),
                r.tensor(&b, -1.0, 1.0),
                r.tensor(&[5], -1.0, 1.0),
            ],
        ));
    }
    check(case(
        "MatMul",
        vec![],
        vec![
            r.tensor(&[2, 3, 4], -1.0, 1.0),
            r.tensor(&[4, 5], -1.0, 1.0),
        ],
    ));
    check(case(
        "MatMul",
        vec![],
        vec![r.tensor(&[3], -1.0, 1.0), r.tensor(&[3, 2], -1.0, 1.0)],
    ));
    check(case(
        "MatMul",
        vec![],
        vec![
            r.tensor(&[2, 1, 3, 4], -1.0, 1.0),
            r.tensor(&[3, 4, 2], -1.0, 1.0),
        ],
    ));
}

#[test]
fn pooling_norm_softmax() {
    let mut r = Rng(5);
    check(case(
        "MaxPool",
        vec![
            ("kernel_shape", ints(&[2, 2])),
            ("strides", ints(&[2, 2])),
            ("pads", ints(&[1, 1, 0, 0])),
        ],
        vec![r.spaced(&[2, 2, 5, 5])],
    ));
    check(case(
        "AveragePool",
        vec![
            ("kernel_shape", ints(&[3, 3])),
            ("strides", ints(&[2, 2])),
            ("pads", ints(&[1, 1, 1, 1])),
        ],
        vec![r.tensor(&[1, 2, 5, 5], -1.0, 1.0)],
    ));
    check(case(
        "GlobalAveragePool",
        vec![],
        vec![r.tensor(&[2, 3, 3, 2], -1.0, 1.0)],
    ));
    let mut bn = case(
        "BatchNormalization",
        vec![],
        vec![
            r.tensor(&[2, 3, 2, 2], -1.0, 1.0),
            r.tensor(&[3], 0.5, 1.5),
            r.tensor(&[3], -0.5, 0.5),
        ],
    );
    bn.consts = vec![r.tensor(&[3], -0.2, 0.2), r.tensor(&[3], 0.5, 1.5)];
    check(bn);
    check(case(
        "Softmax",
        vec![("axis", Attr::Int(1))],
        vec![r.tensor(&[2, 3, 4], -2.0, 2.0)],
    ));
}

#[test]
fn layout_ops() {
    let mut r = Rng(6);
    let mut reshape = case("Reshape", vec![], vec![r.tensor(&[2, 3, 4], -1.0, 1.0)]);
    reshape.consts = vec![Tensor::from_vec(vec![2], vec![6i64, 4]).unwrap()];
    check(reshape);
    check(case(
        "Flatten",
        vec![("axis", Attr::Int(2))],
        vec![r.tensor(&[2, 3, 4], -1.0, 1.0)],
    ));
    check(case(
        "Transpose",
        vec![("perm", ints(&[2, 0, 1]))],
        vec![r.tensor(&[2, 3, 4], -1.0, 1.0)],
    ));
    check(case(
        "Concat",
        vec![("axis", Attr::Int(1))],
        vec![
            r.tensor(&[2, 2, 3], -1.0, 1.0),
            r.tensor(&[2, 1, 3], -1.0, 1.0),
        ],
    ));
    let mut sq = case("Unsqueeze", vec![], vec![r.tensor(&[2, 3], -1.0, 1.0)]);
    sq.consts = vec![Tensor::from_vec(vec![1], vec![1i64]).unwrap()];
    check(sq);
}

fn i64s(v: &[i64]) -> Tensor {
    Tensor::from_vec(vec![v.len()], v.to_vec()).unwrap()
}

#[test]
fn reductions_and_normalization() {
    let mut r = Rng(7);
    check(case(
        "ReduceMean",
        vec![("axes", ints(&[1, -1])), ("keepdims", Attr::Int(0))],
        vec![r.tensor(&[2, 3, 4], -1.0, 1.0)],
    ));
    let mut sum = case("ReduceSum", vec![], vec![r.tensor(&[2, 3, 4], -1.0, 1.0)]);
    sum.consts = vec![i64s(&[1])];
    check(sum);
    check(case(
        "ReduceSum",
        vec![("keepdims", Attr::Int(0))],
        vec![r.tensor(&[3, 2], -1.0, 1.0)],
    ));
    for (axis, scale_shape) in [(-1, vec![4]), (1, vec![3, 4]), (1, vec![4])] {
        let mut ln = case(
            "LayerNormalization",
            vec![("axis", Attr::Int(axis)), ("epsilon", Attr::Float(1e-3))],
            vec![
                r.tensor(&[2, 3, 4], -2.0, 2.0),
                r.tensor(&scale_shape, 0.5, 1.5),
                r.tensor(&scale_shape, -0.5, 0.5),
            ],
        );
        ln.opset = 17;
        check(ln);
    }
    for approximate in ["none", "tanh"] {
        let mut gelu = case(
            "Gelu",
            vec![("approximate", Attr::String(approximate.into()))],
            vec![r.tensor(&[3, 5], -4.0, 4.0)],
        );
        gelu.opset = 20;
        check(gelu);
    }
}

#[test]
fn where_and_cast() {
    let mut r = Rng(10);
    let mut w = case(
        "Where",
        vec![],
        vec![r.tensor(&[2, 3], -1.0, 1.0), r.tensor(&[3], -1.0, 1.0)],
    );
    w.consts = vec![Tensor::from_vec(vec![2, 1], vec![true, false]).unwrap()];
    w.order = Some(vec![None, Some(0), Some(1)]);
    check(w);
    check(case(
        "Cast",
        vec![("to", Attr::Int(1))],
        vec![r.tensor(&[4], -1.0, 1.0)],
    ));
}

#[test]
fn selection_ops() {
    let mut r = Rng(8);
    let mut slice = case("Slice", vec![], vec![r.tensor(&[3, 6, 4], -1.0, 1.0)]);
    // starts, ends, axes, steps: rows 1.., columns 5 down to 1 by -2.
    slice.consts = vec![i64s(&[1, 5]), i64s(&[3, 0]), i64s(&[0, 1]), i64s(&[1, -2])];
    check(slice);
    // Embedding lookup with a repeated index: both rows add into the same gradient row.
    let mut gather = case("Gather", vec![], vec![r.tensor(&[5, 3], -1.0, 1.0)]);
    gather.consts = vec![Tensor::from_vec(vec![2, 2], vec![4i64, 1, 1, -5]).unwrap()];
    check(gather);
    let mut gather1 = case(
        "Gather",
        vec![("axis", Attr::Int(1))],
        vec![r.tensor(&[2, 4, 3], -1.0, 1.0)],
    );
    gather1.consts = vec![i64s(&[3, 0])];
    check(gather1);
    let mut expand = case("Expand", vec![], vec![r.tensor(&[3, 1], -1.0, 1.0)]);
    expand.consts = vec![i64s(&[2, 3, 4])];
    check(expand);
    let mut tile = case("Tile", vec![], vec![r.tensor(&[2, 3], -1.0, 1.0)]);
    tile.consts = vec![i64s(&[2, 2])];
    check(tile);
}

/// DequantizeLinear is smooth in its scale: checked against finite differences. The
/// QuantizeLinear side rounds, so its straight-through gradient is checked by value.
#[test]
fn fake_quantization() {
    let mut r = Rng(9);
    let codes = Tensor::from_vec(vec![2, 3], vec![-7i8, 0, 5, 127, -128, 3]).unwrap();
    let mut dq = case(
        "DequantizeLinear",
        vec![("axis", Attr::Int(0))],
        vec![r.tensor(&[2], 0.05, 0.2)],
    );
    dq.consts = vec![codes, Tensor::from_vec(vec![2], vec![1i8, -2]).unwrap()];
    dq.order = Some(vec![None, Some(0), None]);
    check(dq);

    // x -> Q -> DQ with scale 0.5, zero point 0, int8: 300 saturates at 127.
    let mut g = Graph::default();
    g.inputs
        .push(ValueInfo::new("x", DType::F32, vec![Dim::Fixed(4)]));
    g.inputs.push(ValueInfo::new("s", DType::F32, vec![]));
    g.initializers.insert("z".into(), Tensor::scalar(0i8));
    g.nodes
        .push(Node::new("QuantizeLinear", "q", &["x", "s", "z"], &["xq"]));
    g.nodes.push(Node::new(
        "DequantizeLinear",
        "dq",
        &["xq", "s", "z"],
        &["y"],
    ));
    g.outputs
        .push(ValueInfo::new("y", DType::F32, vec![Dim::Fixed(4)]));
    let model = Model {
        ir_version: 8,
        opsets: vec![OpsetImport {
            domain: String::new(),
            version: 13,
        }],
        graph: g,
        ..Default::default()
    };
    let x = Tensor::from_vec(vec![4], vec![1.2f32, -0.3, 300.0, 2.0]).unwrap();
    let s = Tensor::scalar(0.5f32);
    let (outs, mut values) = Session::new(model.clone())
        .unwrap()
        .run_with(
            &[("x", x.clone()), ("s", s.clone())],
            &RunOptions {
                capture_all: true,
                ..Default::default()
            },
        )
        .unwrap();
    values.insert("x".into(), x);
    values.insert("s".into(), s);
    values.insert("y".into(), outs[0].1.clone());
    let dy = Tensor::from_vec(vec![4], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let grads = grad::backward(
        &model,
        &values,
        &[("y".into(), dy)],
        &["x".into(), "s".into()],
    )
    .unwrap();
    // Straight through inside the range, stopped where 300 saturated.
    assert_eq!(grads["x"].as_slice::<f32>().unwrap(), &[1.0, 2.0, 0.0, 4.0]);
    // LSQ: sum of dy * ((q - zp) - x / s) inside, dy * (q - zp) at the end of the range.
    // q = [2, -1 (ties to even: -0.6 -> -1), 127, 4].
    let want = 1.0 * (2.0 - 2.4) + 2.0 * (-1.0 + 0.6) + 3.0 * 127.0 + 4.0 * (4.0 - 4.0);
    let got = grads["s"].as_slice::<f32>().unwrap()[0];
    assert!((got - want).abs() < 1e-3, "scale gradient {got} vs {want}");
}
