//! Small models built in code for tests: their structure is known exactly.

use smelt_ir::{Attr, Dim, Graph, Model, Node, OpsetImport, ValueInfo};
use smelt_tensor::{DType, Tensor};

/// Deterministic uniform numbers in [-1, 1).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
    }
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn tensor(&mut self, shape: &[usize], scale: f32, offset: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(
            shape.to_vec(),
            (0..n).map(|_| offset + scale * self.next()).collect(),
        )
        .unwrap()
    }
}

struct Builder {
    g: Graph,
    rng: Rng,
    n: usize,
}

impl Builder {
    /// An empty graph with input `x` of shape [batch, c, h, w] and output `logits` [batch, 10].
    fn new(name: &str, [c, h, w]: [usize; 3], seed: u64) -> Builder {
        let batch = || Dim::Sym("batch".into());
        Builder {
            g: Graph {
                name: name.into(),
                inputs: vec![ValueInfo::new(
                    "x",
                    DType::F32,
                    vec![batch(), Dim::Fixed(c), Dim::Fixed(h), Dim::Fixed(w)],
                )],
                outputs: vec![ValueInfo::new(
                    "logits",
                    DType::F32,
                    vec![batch(), Dim::Fixed(10)],
                )],
                ..Default::default()
            },
            rng: Rng::new(seed),
            n: 0,
        }
    }
    fn model(self) -> Model {
        Model {
            ir_version: 8,
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: 13,
            }],
            producer_name: "smelt tests".into(),
            graph: self.g,
            ..Default::default()
        }
    }
    fn name(&mut self, p: &str) -> String {
        self.n += 1;
        format!("{p}{}", self.n)
    }
    fn init(&mut self, p: &str, t: Tensor) -> String {
        let k = self.name(p);
        self.g.initializers.insert(k.clone(), t);
        k
    }
    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.name(&op.to_lowercase());
        let mut n = Node::new(op, &format!("{op}_{}", self.n), inputs, &[&out]);
        for (k, v) in attrs {
            n = n.with_attr(k, v);
        }
        self.g.nodes.push(n);
        out
    }
    /// Conv (+ bias, uniform in +-0.1) with He-uniform weights.
    fn conv(&mut self, x: &str, cin: usize, cout: usize, k: usize, group: usize) -> String {
        self.conv_grouped(x, cin, cout, k, group, 0.1)
    }
    fn conv_k(&mut self, x: &str, cin: usize, cout: usize, k: usize, bias: f32) -> String {
        self.conv_grouped(x, cin, cout, k, 1, bias)
    }
    fn conv_grouped(
        &mut self,
        x: &str,
        cin: usize,
        cout: usize,
        k: usize,
        group: usize,
        bias: f32,
    ) -> String {
        let fan_in = (cin / group * k * k) as f32;
        let w = self
            .rng
            .tensor(&[cout, cin / group, k, k], (6.0 / fan_in).sqrt(), 0.0);
        let w = self.init("w", w);
        let b = self.rng.tensor(&[cout], bias, 0.0);
        let b = self.init("b", b);
        let p = (k / 2) as i64;
        self.node(
            "Conv",
            &[x, &w, &b],
            vec![
                ("kernel_shape", Attr::Ints(vec![k as i64; 2])),
                ("pads", Attr::Ints(vec![p; 4])),
                ("group", Attr::Int(group as i64)),
            ],
        )
    }
    fn bn(&mut self, x: &str, c: usize) -> String {
        let s = self.rng.tensor(&[c], 0.5, 1.0);
        let bias = self.rng.tensor(&[c], 0.1, 0.0);
        let mean = self.rng.tensor(&[c], 0.1, 0.0);
        let var = self.rng.tensor(&[c], 0.5, 1.0);
        let (s, bias, mean, var) = (
            self.init("bn_scale", s),
            self.init("bn_bias", bias),
            self.init("bn_mean", mean),
            self.init("bn_var", var),
        );
        self.node("BatchNormalization", &[x, &s, &bias, &mean, &var], vec![])
    }
    fn relu(&mut self, x: &str) -> String {
        self.node("Relu", &[x], vec![])
    }
}

/// A MobileNetV2-style CNN on [batch, 3, 32, 32]: a Conv-BN-ReLU stem and max pool, `blocks`
/// inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 project, each with BatchNorm, and
/// a residual Add), global average pooling, Flatten and a Gemm classifier to 10 classes.
/// Random weights from `seed`. The residual Adds are named `block{i}_add`.
pub fn residual_cnn(seed: u64, blocks: usize) -> Model {
    let mut b = Builder::new("residual_cnn", [3, 32, 32], seed);
    let (c, e) = (32, 96);
    let x = b.conv("x", 3, c, 3, 1);
    let x = b.bn(&x, c);
    let x = b.relu(&x);
    let mut x = b.node(
        "MaxPool",
        &[&x],
        vec![
            ("kernel_shape", Attr::Ints(vec![2, 2])),
            ("strides", Attr::Ints(vec![2, 2])),
        ],
    );
    for i in 0..blocks {
        let h = b.conv(&x, c, e, 1, 1);
        let h = b.bn(&h, e);
        let h = b.relu(&h);
        let h = b.conv(&h, e, e, 3, e);
        let h = b.bn(&h, e);
        let h = b.relu(&h);
        let h = b.conv(&h, e, c, 1, 1);
        let h = b.bn(&h, c);
        let out = format!("block{i}_out");
        b.g.nodes.push(Node::new(
            "Add",
            &format!("block{i}_add"),
            &[&x, &h],
            &[&out],
        ));
        x = out;
    }
    let p = b.node("GlobalAveragePool", &[&x], vec![]);
    let f = b.node("Flatten", &[&p], vec![("axis", Attr::Int(1))]);
    let w = b.rng.tensor(&[10, c], (6.0 / c as f32).sqrt(), 0.0);
    let w = b.init("fc_w", w);
    let bias = b.rng.tensor(&[10], 0.1, 0.0);
    let bias = b.init("fc_b", bias);
    b.g.nodes.push(
        Node::new("Gemm", "classifier", &[&f, &w, &bias], &["logits"])
            .with_attr("transB", Attr::Int(1)),
    );
    b.model()
}

/// A LeNet-style MNIST classifier on raw [batch, 1, 28, 28] pixels in 0..255, initialised at
/// random (He-uniform convolutions, a 1/sqrt(fan-in) classifier, zero biases): scaled to
/// 0..1, Conv 5x5 to 8 channels, ReLU, max pool, Conv 5x5 to 16, ReLU, max pool, Flatten and a
/// Gemm to 10 classes. The model trained from scratch in the fine-tuning tests.
pub fn mnist_cnn(seed: u64) -> Model {
    let mut b = Builder::new("mnist_cnn", [1, 28, 28], seed);
    let k = b.init("inv255", Tensor::scalar(1.0f32 / 255.0));
    let mut x = b.node("Mul", &["x", &k], vec![]);
    for (cin, cout) in [(1, 8), (8, 16)] {
        let h = b.conv_k(&x, cin, cout, 5, 0.0);
        let h = b.relu(&h);
        x = b.node(
            "MaxPool",
            &[&h],
            vec![
                ("kernel_shape", Attr::Ints(vec![2, 2])),
                ("strides", Attr::Ints(vec![2, 2])),
            ],
        );
    }
    let f = b.node("Flatten", &[&x], vec![("axis", Attr::Int(1))]);
    let fan_in = 16 * 7 * 7;
    let w = b
        .rng
        .tensor(&[10, fan_in], 1.0 / (fan_in as f32).sqrt(), 0.0);
    let w = b.init("fc_w", w);
    let bias = b.init("fc_b", Tensor::zeros(DType::F32, vec![10]));
    b.g.nodes.push(
        Node::new("Gemm", "classifier", &[&f, &w, &bias], &["logits"])
            .with_attr("transB", Attr::Int(1)),
    );
    b.model()
}
