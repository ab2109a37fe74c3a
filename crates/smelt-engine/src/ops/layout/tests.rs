use crate::ops::{lookup, OpCtx};
use smelt_ir::{Attr, Node};
use smelt_tensor::{Data, Element, Error, Result, Tensor};

fn run_op(
    op: &str,
    attrs: Vec<(&str, Attr)>,
    ins: &[Option<&Tensor>],
    n_out: usize,
    opset: i64,
) -> Result<Vec<Tensor>> {
    let outs: Vec<String> = (0..n_out).map(|i| format!("y{i}")).collect();
    let out_refs: Vec<&str> = outs.iter().map(String::as_str).collect();
    let mut node = Node::new(op, "n", &[], &out_refs);
    for (k, v) in attrs {
        node = node.with_attr(k, v);
    }
    let f = lookup("", op).expect("op is registered");
    f(&OpCtx::new(&node, opset), ins)
}

fn run1(op: &str, attrs: Vec<(&str, Attr)>, ins: &[&Tensor]) -> Tensor {
    let ins: Vec<Option<&Tensor>> = ins.iter().map(|t| Some(*t)).collect();
    run_op(op, attrs, &ins, 1, 18).unwrap().remove(0)
}

fn f32s(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
}

fn i64s(v: &[i64]) -> Tensor {
    Tensor::from_vec(vec![v.len()], v.to_vec()).unwrap()
}

fn iota(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    f32s(shape, &(0..n).map(|i| i as f32).collect::<Vec<_>>())
}

fn vals<T: Element>(t: &Tensor) -> Vec<T> {
    t.as_slice::<T>().unwrap().to_vec()
}

#[test]
fn reshape_copies_zero_and_infers_minus_one() {
    let x = iota(&[2, 3, 4]);
    let y = run1("Reshape", vec![], &[&x, &i64s(&[0, -1])]);
    assert_eq!(y.shape(), &[2, 12]);
    assert_eq!(vals::<f32>(&y), vals::<f32>(&x));
    let y = run1("Reshape", vec![], &[&x, &i64s(&[-1, 0, 2])]);
    assert_eq!(y.shape(), &[4, 3, 2]);
    // allowzero: a literal 0 dim only fits an empty tensor.
    let e = Tensor::zeros(smelt_tensor::DType::F32, vec![0, 3]);
    let y = run1(
        "Reshape",
        vec![("allowzero", Attr::Int(1))],
        &[&e, &i64s(&[3, 0])],
    );
    assert_eq!(y.shape(), &[3, 0]);
    assert!(run_op("Reshape", vec![], &[Some(&x), Some(&i64s(&[5, -1]))], 1, 18).is_err());
    assert!(run_op(
        "Reshape",
        vec![],
        &[Some(&x), Some(&i64s(&[-1, -1]))],
        1,
        18
    )
    .is_err());
}

#[test]
fn slice_negative_step_and_clamping() {
    let x = iota(&[2, 4]); // [[0,1,2,3],[4,5,6,7]]
    let y = run1(
        "Slice",
        vec![],
        &[&x, &i64s(&[-1]), &i64s(&[-1000]), &i64s(&[1]), &i64s(&[-2])],
    );
    assert_eq!(y.shape(), &[2, 2]);
    assert_eq!(vals::<f32>(&y), vec![3.0, 1.0, 7.0, 5.0]);
    // INT_MAX end with default axes and steps.
    let y = run1(
        "Slice",
        vec![],
        &[&x, &i64s(&[1, 1]), &i64s(&[i64::MAX, i64::MAX])],
    );
    assert_eq!(vals::<f32>(&y), vec![5.0, 6.0, 7.0]);
    // Both axes reversed.
    let y = run1(
        "Slice",
        vec![],
        &[
            &x,
            &i64s(&[i64::MAX, 10]),
            &i64s(&[i64::MIN, 0]),
            &i64s(&[0, 1]),
            &i64s(&[-1, -1]),
        ],
    );
    assert_eq!(vals::<f32>(&y), vec![7.0, 6.0, 5.0, 3.0, 2.0, 1.0]);
    // Opset 1 attribute form.
    let ins = [Some(&x)];
    let y = run_op(
        "Slice",
        vec![
            ("starts", Attr::Ints(vec![1])),
            ("ends", Attr::Ints(vec![3])),
            ("axes", Attr::Ints(vec![1])),
        ],
        &ins,
        1,
        9,
    )
    .unwrap();
    assert_eq!(vals::<f32>(&y[0]), vec![1.0, 2.0, 5.0, 6.0]);
}

#[test]
fn gather_negative_index_on_axis_1() {
    let x = f32s(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let y = run1(
        "Gather",
        vec![("axis", Attr::Int(1))],
        &[&x, &i64s(&[-1, 0])],
    );
    assert_eq!(y.shape(), &[2, 2]);
    assert_eq!(vals::<f32>(&y), vec![3.0, 1.0, 6.0, 4.0]);
    let y = run1("Gather", vec![], &[&x, &Tensor::scalar(1i64)]);
    assert_eq!(y.shape(), &[3]);
    assert_eq!(vals::<f32>(&y), vec![4.0, 5.0, 6.0]);
    let bad = run_op(
        "Gather",
        vec![("axis", Attr::Int(1))],
        &[Some(&x), Some(&i64s(&[3]))],
        1,
        13,
    );
    assert!(matches!(bad, Err(Error::Invalid(_))));
}

#[test]
fn transpose_3d_perm_and_fast_paths() {
    let x = iota(&[2, 3, 2]);
    let y = run1(
        "Transpose",
        vec![("perm", Attr::Ints(vec![1, 2, 0]))],
        &[&x],
    );
    assert_eq!(y.shape(), &[3, 2, 2]);
    assert_eq!(
        vals::<f32>(&y),
        vec![0., 6., 1., 7., 2., 8., 3., 9., 4., 10., 5., 11.]
    );
    let y = run1("Transpose", vec![], &[&iota(&[2, 3])]);
    assert_eq!(vals::<f32>(&y), vec![0., 3., 1., 4., 2., 5.]);
    // Larger NCHW -> NHWC (batched tile path) and a scrambled perm, against the index formula.
    let (n, c, h, w) = (2, 37, 5, 7);
    let x = iota(&[n, c, h, w]);
    let y = run1(
        "Transpose",
        vec![("perm", Attr::Ints(vec![0, 2, 3, 1]))],
        &[&x],
    );
    let got = vals::<f32>(&y);
    for (p, &g) in got.iter().enumerate() {
        let (ci, wi, hi, ni) = (p % c, (p / c) % w, (p / (c * w)) % h, p / (c * w * h));
        assert_eq!(g, (((ni * c + ci) * h + hi) * w + wi) as f32);
    }
    let y = run1(
        "Transpose",
        vec![("perm", Attr::Ints(vec![3, 1, 0, 2]))],
        &[&x],
    );
    assert_eq!(y.shape(), &[w, c, n, h]);
    let got = vals::<f32>(&y);
    for (p, &g) in got.iter().enumerate() {
        let (hi, ni, ci, wi) = (p % h, (p / h) % n, (p / (h * n)) % c, p / (h * n * c));
        assert_eq!(g, (((ni * c + ci) * h + hi) * w + wi) as f32);
    }
}

#[test]
fn concat_axis_minus_one_and_strings() {
    let a = f32s(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = f32s(&[2, 1], &[5.0, 6.0]);
    let y = run1("Concat", vec![("axis", Attr::Int(-1))], &[&a, &b]);
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(vals::<f32>(&y), vec![1.0, 2.0, 5.0, 3.0, 4.0, 6.0]);
    let s = Tensor::new(vec![1], Data::Str(vec!["x".into()])).unwrap();
    let t = Tensor::new(vec![2], Data::Str(vec!["y".into(), "z".into()])).unwrap();
    let y = run1("Concat", vec![("axis", Attr::Int(0))], &[&s, &t]);
    assert_eq!(
        y.data(),
        &Data::Str(vec!["x".into(), "y".into(), "z".into()])
    );
    assert!(run_op(
        "Concat",
        vec![("axis", Attr::Int(0))],
        &[Some(&a), Some(&b)],
        1,
        13
    )
    .is_err());
}

#[test]
fn pad_modes() {
    let x = f32s(&[3, 2], &[1.0, 1.2, 2.3, 3.4, 4.5, 5.7]);
    let y = run1(
        "Pad",
        vec![("mode", Attr::String(b"reflect".to_vec()))],
        &[&x, &i64s(&[0, 2, 0, 0])],
    );
    assert_eq!(y.shape(), &[3, 4]);
    assert_eq!(
        vals::<f32>(&y),
        vec![1.0, 1.2, 1.0, 1.2, 2.3, 3.4, 2.3, 3.4, 4.5, 5.7, 4.5, 5.7]
    );
    let v = f32s(&[3], &[1.0, 2.0, 3.0]);
    let y = run1(
        "Pad",
        vec![("mode", Attr::String(b"reflect".to_vec()))],
        &[&v, &i64s(&[2, 1])],
    );
    assert_eq!(vals::<f32>(&y), vec![3.0, 2.0, 1.0, 2.0, 3.0, 2.0]);
    let y = run1(
        "Pad",
        vec![("mode", Attr::String(b"edge".to_vec()))],
        &[&v, &i64s(&[2, 1])],
    );
    assert_eq!(vals::<f32>(&y), vec![1.0, 1.0, 1.0, 2.0, 3.0, 3.0]);
    let y = run1(
        "Pad",
        vec![("mode", Attr::String(b"wrap".to_vec()))],
        &[&v, &i64s(&[2, 1])],
    );
    assert_eq!(vals::<f32>(&y), vec![2.0, 3.0, 1.0, 2.0, 3.0, 1.0]);
    let y = run1(
        "Pad",
        vec![],
        &[&v, &i64s(&[1, -1]), &Tensor::scalar(9.0f32)],
    );
    assert_eq!(vals::<f32>(&y), vec![9.0, 1.0, 2.0]);
    // Opset 2 attribute form.
    let y = run_op(
        "Pad",
        vec![
            ("pads", Attr::Ints(vec![0, 1])),
            ("value", Attr::Float(7.0)),
        ],
        &[Some(&v)],
        1,
        2,
    )
    .unwrap();
    assert_eq!(vals::<f32>(&y[0]), vec![1.0, 2.0, 3.0, 7.0]);
}

#[test]
fn top_k_largest_smallest_and_ties() {
    let x = f32s(&[2, 4], &[1.0, 3.0, 2.0, 3.0, 4.0, 0.0, 4.0, -1.0]);
    let ins = [Some(&x), Some(&i64s(&[2]))];
    let out = run_op("TopK", vec![], &ins, 2, 11).unwrap();
    assert_eq!(out[0].shape(), &[2, 2]);
    assert_eq!(vals::<f32>(&out[0]), vec![3.0, 3.0, 4.0, 4.0]);
    assert_eq!(vals::<i64>(&out[1]), vec![1, 3, 0, 2]);
    let out = run_op("TopK", vec![("largest", Attr::Int(0))], &ins, 2, 11).unwrap();
    assert_eq!(vals::<f32>(&out[0]), vec![1.0, 2.0, -1.0, 0.0]);
    assert_eq!(vals::<i64>(&out[1]), vec![0, 2, 3, 1]);
    // Axis 0, K as an attribute (opset 1).
    let out = run_op(
        "TopK",
        vec![("k", Attr::Int(1)), ("axis", Attr::Int(0))],
        &[Some(&x)],
        2,
        1,
    )
    .unwrap();
    assert_eq!(vals::<f32>(&out[0]), vec![4.0, 3.0, 4.0, 3.0]);
    assert_eq!(vals::<i64>(&out[1]), vec![1, 0, 1, 0]);
    assert!(run_op("TopK", vec![], &[Some(&x), Some(&i64s(&[5]))], 2, 11).is_err());
}

#[test]
fn expand_broadcasts_both_ways() {
    let x = f32s(&[3, 1], &[1.0, 2.0, 3.0]);
    let y = run1("Expand", vec![], &[&x, &i64s(&[2, 1, 2])]);
    assert_eq!(y.shape(), &[2, 3, 2]);
    assert_eq!(
        vals::<f32>(&y),
        vec![1., 1., 2., 2., 3., 3., 1., 1., 2., 2., 3., 3.]
    );
    let r = f32s(&[3], &[1.0, 2.0, 3.0]);
    let y = run1("Expand", vec![], &[&r, &i64s(&[2, 1])]);
    assert_eq!(vals::<f32>(&y), vec![1., 2., 3., 1., 2., 3.]);
    let huge = run_op(
        "Expand",
        vec![],
        &[Some(&r), Some(&i64s(&[1 << 40, 3]))],
        1,
        13,
    );
    assert!(matches!(huge, Err(Error::Limit(_))));
}

#[test]
fn split_tile_and_squeeze() {
    let x = iota(&[7]);
    let out = run_op(
        "Split",
        vec![("num_outputs", Attr::Int(3))],
        &[Some(&x)],
        3,
        18,
    )
    .unwrap();
    let got: Vec<Vec<f32>> = out.iter().map(vals::<f32>).collect();
    assert_eq!(got, vec![vec![0., 1., 2.], vec![3., 4., 5.], vec![6.]]);
    let m = iota(&[2, 3]);
    let out = run_op(
        "Split",
        vec![("axis", Attr::Int(1))],
        &[Some(&m), Some(&i64s(&[1, 2]))],
        2,
        13,
    )
    .unwrap();
    assert_eq!(vals::<f32>(&out[0]), vec![0., 3.]);
    assert_eq!(vals::<f32>(&out[1]), vec![1., 2., 4., 5.]);
    let y = run1(
        "Tile",
        vec![],
        &[&f32s(&[2, 2], &[1., 2., 3., 4.]), &i64s(&[2, 2])],
    );
    assert_eq!(y.shape(), &[4, 4]);
    assert_eq!(
        vals::<f32>(&y),
        vec![1., 2., 1., 2., 3., 4., 3., 4., 1., 2., 1., 2., 3., 4., 3., 4.]
    );
    let u = run1("Unsqueeze", vec![], &[&m, &i64s(&[-1, 0])]);
    assert_eq!(u.shape(), &[1, 2, 3, 1]);
    let s = run1("Squeeze", vec![], &[&u, &i64s(&[3])]);
    assert_eq!(s.shape(), &[1, 2, 3]);
    assert!(run_op("Squeeze", vec![], &[Some(&u), Some(&i64s(&[1]))], 1, 13).is_err());
    let f = run1("Flatten", vec![("axis", Attr::Int(-1))], &[&u]);
    assert_eq!(f.shape(), &[6, 1]);
}

#[test]
fn scatter_and_gather_nd() {
    let data = f32s(&[1, 5], &[1., 2., 3., 4., 5.]);
    let idx = Tensor::from_vec(vec![1, 2], vec![1i64, 1]).unwrap();
    let upd = f32s(&[1, 2], &[1.1, 2.1]);
    let y = run1(
        "ScatterElements",
        vec![
            ("axis", Attr::Int(1)),
            ("reduction", Attr::String(b"add".to_vec())),
        ],
        &[&data, &idx, &upd],
    );
    assert_eq!(vals::<f32>(&y), vec![1., 5.2, 3., 4., 5.]);
    let idx = Tensor::from_vec(vec![1, 2], vec![-1i64, 0]).unwrap();
    let y = run1(
        "ScatterElements",
        vec![("axis", Attr::Int(1))],
        &[&data, &idx, &upd],
    );
    assert_eq!(vals::<f32>(&y), vec![2.1, 2., 3., 4., 1.1]);
    // GatherND with batch_dims = 1: data [2,2,2], indices [[1],[0]].
    let d = iota(&[2, 2, 2]);
    let i = Tensor::from_vec(vec![2, 1], vec![1i64, 0]).unwrap();
    let y = run1("GatherND", vec![("batch_dims", Attr::Int(1))], &[&d, &i]);
    assert_eq!(y.shape(), &[2, 2]);
    assert_eq!(vals::<f32>(&y), vec![2., 3., 4., 5.]);
    let i = Tensor::from_vec(vec![2, 2], vec![0i64, 1, 1, 0]).unwrap();
    let y = run1("GatherND", vec![], &[&d, &i]);
    assert_eq!(vals::<f32>(&y), vec![2., 3., 4., 5.]);
    let u = f32s(&[1, 2], &[10., 20.]);
    let y = run1(
        "ScatterND",
        vec![("reduction", Attr::String(b"mul".to_vec()))],
        &[
            &d,
            &Tensor::from_vec(vec![1, 2], vec![1i64, 1]).unwrap(),
            &u,
        ],
    );
    assert_eq!(vals::<f32>(&y), vec![0., 1., 2., 3., 4., 5., 60., 140.]);
    let g = run1(
        "GatherElements",
        vec![("axis", Attr::Int(1))],
        &[
            &iota(&[2, 2]),
            &Tensor::from_vec(vec![2, 2], vec![0i64, 0, 1, 0]).unwrap(),
        ],
    );
    assert_eq!(vals::<f32>(&g), vec![0., 0., 3., 2.]);
}

#[test]
fn misc_index_ops() {
    let idx = i64s(&[0, -1, 5]);
    let y = run1(
        "OneHot",
        vec![],
        &[&idx, &Tensor::scalar(3i64), &f32s(&[2], &[0., 1.])],
    );
    assert_eq!(y.shape(), &[3, 3]);
    assert_eq!(vals::<f32>(&y), vec![1., 0., 0., 0., 0., 1., 0., 0., 0.]);
    let y = run1(
        "OneHot",
        vec![("axis", Attr::Int(0))],
        &[&idx, &Tensor::scalar(3i64), &f32s(&[2], &[0., 1.])],
    );
    assert_eq!(vals::<f32>(&y), vec![1., 0., 0., 0., 0., 0., 0., 1., 0.]);
    let nz = run1("NonZero", vec![], &[&f32s(&[2, 2], &[1., 0., 1., 1.])]);
    assert_eq!(nz.shape(), &[2, 3]);
    assert_eq!(vals::<i64>(&nz), vec![0, 1, 1, 0, 0, 1]);
    let cond = Tensor::from_vec(vec![2], vec![false, true]).unwrap();
    let c = run1(
        "Compress",
        vec![("axis", Attr::Int(1))],
        &[&iota(&[2, 3]), &cond],
    );
    assert_eq!(vals::<f32>(&c), vec![1., 4.]);
    let c = run1("Compress", vec![], &[&iota(&[2, 3]), &cond]);
    assert_eq!(vals::<f32>(&c), vec![1.]);
    let x = f32s(&[6], &[2., 1., 1., 3., 4., 3.]);
    let out = run_op("Unique", vec![], &[Some(&x)], 4, 11).unwrap();
    assert_eq!(vals::<f32>(&out[0]), vec![1., 2., 3., 4.]);
    assert_eq!(vals::<i64>(&out[1]), vec![1, 0, 3, 4]);
    assert_eq!(vals::<i64>(&out[2]), vec![1, 0, 0, 2, 3, 2]);
    assert_eq!(vals::<i64>(&out[3]), vec![2, 1, 2, 1]);
    let out = run_op("Unique", vec![("sorted", Attr::Int(0))], &[Some(&x)], 4, 11).unwrap();
    assert_eq!(vals::<f32>(&out[0]), vec![2., 1., 3., 4.]);
    let m = f32s(&[3, 2], &[1., 0., 0., 1., 1., 0.]);
    let out = run_op("Unique", vec![("axis", Attr::Int(0))], &[Some(&m)], 4, 11).unwrap();
    assert_eq!(out[0].shape(), &[2, 2]);
    assert_eq!(vals::<f32>(&out[0]), vec![0., 1., 1., 0.]);
    assert_eq!(vals::<i64>(&out[2]), vec![1, 0, 1]);
}

#[test]
fn generators_and_rearrangers() {
    let y = run1(
        "Range",
        vec![],
        &[
            &Tensor::scalar(10i32),
            &Tensor::scalar(4i32),
            &Tensor::scalar(-3i32),
        ],
    );
    assert_eq!(vals::<i32>(&y), vec![10, 7]);
    let y = run1(
        "Range",
        vec![],
        &[
            &Tensor::scalar(1.0f32),
            &Tensor::scalar(2.0f32),
            &Tensor::scalar(0.25f32),
        ],
    );
    assert_eq!(vals::<f32>(&y), vec![1.0, 1.25, 1.5, 1.75]);
    let huge = run_op(
        "ConstantOfShape",
        vec![],
        &[Some(&i64s(&[1 << 40, 1 << 40]))],
        1,
        13,
    );
    assert!(matches!(huge, Err(Error::Limit(_))));
    let c = run1(
        "ConstantOfShape",
        vec![(
            "value",
            Attr::Tensor(Tensor::from_vec(vec![1], vec![7i32]).unwrap()),
        )],
        &[&i64s(&[2])],
    );
    assert_eq!(vals::<i32>(&c), vec![7, 7]);
    let t = run1(
        "Trilu",
        vec![("upper", Attr::Int(0))],
        &[&iota(&[2, 3]), &Tensor::scalar(0i64)],
    );
    assert_eq!(vals::<f32>(&t), vec![0., 0., 0., 3., 4., 0.]);
    let t = run1("Trilu", vec![], &[&iota(&[2, 3]), &Tensor::scalar(1i64)]);
    assert_eq!(vals::<f32>(&t), vec![0., 1., 2., 0., 0., 5.]);
    let e = run1("EyeLike", vec![("k", Attr::Int(1))], &[&iota(&[2, 3])]);
    assert_eq!(vals::<f32>(&e), vec![0., 1., 0., 0., 0., 1.]);
    // DepthToSpace DCR on [1,4,1,1]: channels become a 2x2 block in order.
    let d = run1(
        "DepthToSpace",
        vec![("blocksize", Attr::Int(2))],
        &[&iota(&[1, 8, 1, 1])],
    );
    assert_eq!(d.shape(), &[1, 2, 2, 2]);
    assert_eq!(vals::<f32>(&d), vec![0., 2., 4., 6., 1., 3., 5., 7.]);
    let d = run1(
        "DepthToSpace",
        vec![
            ("blocksize", Attr::Int(2)),
            ("mode", Attr::String(b"CRD".to_vec())),
        ],
        &[&iota(&[1, 8, 1, 1])],
    );
    assert_eq!(vals::<f32>(&d), vec![0., 1., 2., 3., 4., 5., 6., 7.]);
    let s = run1(
        "SpaceToDepth",
        vec![("blocksize", Attr::Int(2))],
        &[&iota(&[1, 1, 2, 2])],
    );
    assert_eq!(s.shape(), &[1, 4, 1, 1]);
    assert_eq!(vals::<f32>(&s), vec![0., 1., 2., 3.]);
    let r = run1(
        "ReverseSequence",
        vec![("time_axis", Attr::Int(1)), ("batch_axis", Attr::Int(0))],
        &[&iota(&[2, 3]), &i64s(&[2, 3])],
    );
    assert_eq!(vals::<f32>(&r), vec![1., 0., 2., 5., 4., 3.]);
    let sh = run1(
        "Shape",
        vec![("start", Attr::Int(-2))],
        &[&iota(&[2, 3, 4])],
    );
    assert_eq!(vals::<i64>(&sh), vec![3, 4]);
    let out = run_op("Dropout", vec![], &[Some(&iota(&[2]))], 2, 13).unwrap();
    assert_eq!(vals::<bool>(&out[1]), vec![true, true]);
}

#[test]
fn row_segments_merge_runs() {
    use super::{segments, Seg};
    let l = [
        None,
        None,
        Some(4),
        Some(3),
        Some(2),
        Some(7),
        Some(8),
        Some(5),
        None,
    ];
    let got = format!("{:?}", segments(&l));
    assert_eq!(
        got,
        format!(
            "{:?}",
            [
                Seg::Fill(2),
                Seg::Rev(4, 3),
                Seg::Fwd(7, 2),
                Seg::Fwd(5, 1),
                Seg::Fill(1)
            ]
        )
    );
    // Strings through the same path: reverse both axes of [["a","b"],["c","d"]].
    let s = Tensor::new(
        vec![2, 2],
        Data::Str(["a", "b", "c", "d"].map(String::from).to_vec()),
    )
    .unwrap();
    let y = run1(
        "Slice",
        vec![],
        &[
            &s,
            &i64s(&[-1, -1]),
            &i64s(&[i64::MIN, i64::MIN]),
            &i64s(&[0, 1]),
            &i64s(&[-1, -1]),
        ],
    );
    assert_eq!(
        y.data(),
        &Data::Str(["d", "c", "b", "a"].map(String::from).to_vec())
    );
    let y = run1(
        "Pad",
        vec![],
        &[
            &s,
            &i64s(&[0, 1, 0, 0]),
            &Tensor::new(vec![], Data::Str(vec!["_".into()])).unwrap(),
        ],
    );
    assert_eq!(
        y.data(),
        &Data::Str(["_", "a", "b", "_", "c", "d"].map(String::from).to_vec())
    );
}
