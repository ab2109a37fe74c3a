//! Weights packed once per session (`ops::Prepared`) must follow the weights: a replaced
//! initializer, or a weight that a feed overrides (IR < 4 files list initializers as inputs),
//! never runs on a stale packing.

use smelt_engine::Session;
use smelt_ir::{Dim, Graph, Model, Node, ValueInfo};
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
    assert_eq!(run(&s, &[("x", x.clone())]), product(&x, &weights(1.0)));
    for k in [3.0, -1.0] {
        let got = run(&s, &[("x", x.clone()), ("w", weights(k))]);
        assert_eq!(got, product(&x, &weights(k)));
    }
}
