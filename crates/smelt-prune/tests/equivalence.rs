//! Structured pruning must cut exactly the right slices: channels whose weights in and out are
//! all zero contribute nothing, so removing them must leave the outputs unchanged. The graph
//! routes channels through a Concat (offsets), BatchNorm, a depthwise conv and a Flatten into
//! a Gemm (one channel = 16 rows).

use smelt_engine::Session;
use smelt_ir::{Attr, Dim, Graph, Model, Node, OpsetImport, ValueInfo};
use smelt_prune::{Criterion, Method, Options};
use smelt_tensor::{DType, Tensor};

struct Lcg(u64);
impl Lcg {
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }
}

fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
    Tensor::from_vec(shape.to_vec(), v).unwrap()
}

/// Zeroes index `i` of `axis` in `v` (a tensor of `shape`).
fn zero(v: &mut [f32], shape: &[usize], axis: usize, i: usize) {
    let inner: usize = shape[axis + 1..].iter().product();
    for (k, x) in v.iter_mut().enumerate() {
        if (k / inner) % shape[axis] == i {
            *x = 0.0;
        }
    }
}

fn model() -> Model {
    let mut r = Lcg(11);
    // Channels to make dead: A {1, 4}, B {0, 5} (concat positions 6 and 11), C {2, 3, 7}.
    let mut wa = r.vec(6 * 4 * 9);
    let mut ba = r.vec(6);
    let mut wb = r.vec(6 * 4);
    let mut bb = r.vec(6);
    let mut wc = r.vec(8 * 12 * 9);
    let mut wd = r.vec(8 * 9);
    let mut fc = r.vec(5 * 128);
    for c in [1, 4] {
        zero(&mut wa, &[6, 4, 3, 3], 0, c);
        ba[c] = 0.0;
        zero(&mut wc, &[8, 12, 3, 3], 1, c);
    }
    for c in [0, 5] {
        zero(&mut wb, &[6, 4, 1, 1], 0, c);
        bb[c] = 0.0;
        zero(&mut wc, &[8, 12, 3, 3], 1, 6 + c);
    }
    for c in [2, 3, 7] {
        zero(&mut wc, &[8, 12, 3, 3], 0, c);
        zero(&mut wd, &[8, 1, 3, 3], 0, c);
        // Flatten puts channel c at rows c*16 .. c*16+16 of the [128, 5] Gemm weight.
        for row in c * 16..(c + 1) * 16 {
            zero(&mut fc, &[128, 5], 0, row);
        }
    }
    let mut g = Graph {
        inputs: vec![ValueInfo::new(
            "x",
            DType::F32,
            vec![Dim::Fixed(1), Dim::Fixed(4), Dim::Fixed(8), Dim::Fixed(8)],
        )],
        outputs: vec![ValueInfo::new(
            "y",
            DType::F32,
            vec![Dim::Fixed(1), Dim::Fixed(5)],
        )],
        ..Default::default()
    };
    let bn = [
        r.vec(8),
        r.vec(8),
        r.vec(8),
        r.vec(8).iter().map(|v| v + 1.0).collect(),
    ];
    let inits = [
        ("wa", t(&[6, 4, 3, 3], wa)),
        ("ba", t(&[6], ba)),
        ("wb", t(&[6, 4, 1, 1], wb)),
        ("bb", t(&[6], bb)),
        ("wc", t(&[8, 12, 3, 3], wc)),
        ("s", t(&[8], bn[0].clone())),
        ("beta", t(&[8], bn[1].clone())),
        ("mean", t(&[8], bn[2].clone())),
        ("var", t(&[8], bn[3].clone())),
        ("wd", t(&[8, 1, 3, 3], wd)),
        ("fc", t(&[128, 5], fc)),
        ("fcb", t(&[5], r.vec(5))),
    ];
    for (k, v) in inits {
        g.initializers.insert(k.into(), v);
    }
    let pads = |p: i64| Attr::Ints(vec![p; 4]);
    g.nodes = vec![
        Node::new("Conv", "convA", &["x", "wa", "ba"], &["a0"]).with_attr("pads", pads(1)),
        Node::new("Relu", "reluA", &["a0"], &["a"]),
        Node::new("Conv", "convB", &["x", "wb", "bb"], &["b"]),
        Node::new("Concat", "cat", &["a", "b"], &["ab"]).with_attr("axis", Attr::Int(1)),
        Node::new("Conv", "convC", &["ab", "wc"], &["c0"]).with_attr("pads", pads(1)),
        Node::new(
            "BatchNormalization",
            "bn",
            &["c0", "s", "beta", "mean", "var"],
            &["c1"],
        ),
        Node::new("Relu", "reluC", &["c1"], &["c2"]),
        Node::new("Conv", "dw", &["c2", "wd"], &["d0"])
            .with_attr("pads", pads(1))
            .with_attr("strides", Attr::Ints(vec![2, 2]))
            .with_attr("group", Attr::Int(8)),
        Node::new("Flatten", "flat", &["d0"], &["f"]),
        Node::new("Gemm", "fc", &["f", "fc", "fcb"], &["y"]),
    ];
    Model {
        ir_version: 8,
        opsets: vec![OpsetImport {
            domain: String::new(),
            version: 13,
        }],
        graph: g,
        ..Default::default()
    }
}

#[test]
fn removing_dead_channels_keeps_outputs() {
    let m = model();
    let opts = Options {
        method: Method::Channels,
        criterion: Criterion::L1,
        sparsity: 0.0,
        overrides: vec![
            ("convA".into(), 2.0 / 6.0),
            ("convB".into(), 2.0 / 6.0),
            ("convC".into(), 3.0 / 8.0),
        ],
        ..Default::default()
    };
    let (pruned, _, report) = smelt_prune::prune(m.clone(), &opts, &[]).unwrap();
    let removed: Vec<(String, Vec<usize>)> = report
        .groups
        .iter()
        .map(|g| (g.root.clone(), g.removed.clone()))
        .collect();
    assert_eq!(
        removed,
        vec![
            ("Conv node 'convA'".to_string(), vec![1, 4]),
            ("Conv node 'convB'".to_string(), vec![0, 5]),
            ("Conv node 'convC'".to_string(), vec![2, 3, 7]),
        ]
    );
    let w = |n: &str| pruned.graph.initializers[n].shape().to_vec();
    assert_eq!(w("wa"), vec![4, 4, 3, 3]);
    assert_eq!(w("wb"), vec![4, 4, 1, 1]);
    assert_eq!(w("wc"), vec![5, 8, 3, 3]);
    assert_eq!(w("wd"), vec![5, 1, 3, 3]);
    assert_eq!(w("fc"), vec![80, 5]);
    let dw = pruned.graph.nodes.iter().find(|n| n.name == "dw").unwrap();
    assert_eq!(dw.attr_int("group").unwrap(), Some(5));

    let x = t(&[1, 4, 8, 8], Lcg(5).vec(256));
    let run = |m: Model| {
        Session::new(m).unwrap().run(&[("x", x.clone())]).unwrap()[0]
            .1
            .to_f32_vec()
            .unwrap()
    };
    let (want, got) = (run(m), run(pruned));
    for (a, b) in want.iter().zip(&got) {
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
            "{want:?} vs {got:?}"
        );
    }
}
