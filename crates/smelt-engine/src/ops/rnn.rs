//! Recurrent layers: RNN, GRU and LSTM with every ONNX attribute (directions, sequence
//! lengths, initial states, custom activations, clip, peepholes, layout).
//!
//! The cells run as plain f32 loops: recurrent layers in the models smelt sees are small, and
//! the time dependency makes a batched GEMM buy little over a dot product per gate row.

use super::{input, opt_input, OpCtx, Registry};
use smelt_ir::Attr;
use smelt_tensor::{bail, DType, Result, Tensor};

pub fn register(r: &mut Registry) {
    r.insert("RNN", rnn);
    r.insert("GRU", gru);
    r.insert("LSTM", lstm);
}

fn rnn(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    run(ctx, inputs, Kind::Rnn)
}
fn gru(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    run(ctx, inputs, Kind::Gru)
}
fn lstm(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    run(ctx, inputs, Kind::Lstm)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Rnn,
    Gru,
    Lstm,
}

impl Kind {
    /// Gate blocks stacked in W and R.
    fn gates(self) -> usize {
        match self {
            Kind::Rnn => 1,
            Kind::Gru => 3,
            Kind::Lstm => 4,
        }
    }
    /// Default activation list for one direction (f, g, h).
    fn default_acts(self) -> &'static [&'static str] {
        match self {
            Kind::Rnn => &["Tanh"],
            Kind::Gru => &["Sigmoid", "Tanh"],
            Kind::Lstm => &["Sigmoid", "Tanh", "Tanh"],
        }
    }
}

/// The activation functions the recurrent ops accept by name.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Act {
    Tanh,
    Sigmoid,
    Relu,
    HardSigmoid(f32, f32),
    Affine(f32, f32),
    LeakyRelu(f32),
    ThresholdedRelu(f32),
    ScaledTanh(f32, f32),
    Elu(f32),
    Softsign,
    Softplus,
}

impl Act {
    /// Parses a name; `alpha`/`beta` hand out the next listed value for functions that take
    /// one (the attribute lists are consumed in activation order), else the default.
    fn parse(
        name: &str,
        alpha: &mut impl Iterator<Item = f32>,
        beta: &mut impl Iterator<Item = f32>,
    ) -> Result<Act> {
        let mut a = |d: f32| alpha.next().unwrap_or(d);
        Ok(match name.to_ascii_lowercase().as_str() {
            "tanh" => Act::Tanh,
            "sigmoid" => Act::Sigmoid,
            "relu" => Act::Relu,
            "hardsigmoid" => {
                let x = a(0.2);
                Act::HardSigmoid(x, beta.next().unwrap_or(0.5))
            }
            "affine" => {
                let x = a(1.0);
                Act::Affine(x, beta.next().unwrap_or(0.0))
            }
            "leakyrelu" => Act::LeakyRelu(a(0.01)),
            "thresholdedrelu" => Act::ThresholdedRelu(a(1.0)),
            "scaledtanh" => {
                let x = a(1.0);
                Act::ScaledTanh(x, beta.next().unwrap_or(1.0))
            }
            "elu" => Act::Elu(a(1.0)),
            "softsign" => Act::Softsign,
            "softplus" => Act::Softplus,
            other => bail!(Unsupported, "recurrent activation '{other}'"),
        })
    }

    fn apply(self, x: f32) -> f32 {
        match self {
            Act::Tanh => x.tanh(),
            Act::Sigmoid => sigmoid(x),
            Act::Relu => x.max(0.0),
            Act::HardSigmoid(a, b) => (a * x + b).clamp(0.0, 1.0),
            Act::Affine(a, b) => a * x + b,
            Act::LeakyRelu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * x
                }
            }
            Act::ThresholdedRelu(a) => {
                if x > a {
                    x
                } else {
                    0.0
                }
            }
            Act::ScaledTanh(a, b) => a * (b * x).tanh(),
            Act::Elu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * (x.exp() - 1.0)
                }
            }
            Act::Softsign => x / (1.0 + x.abs()),
            Act::Softplus => {
                // log(1 + e^x) without overflow for large x.
                if x > 20.0 {
                    x
                } else {
                    x.exp().ln_1p()
                }
            }
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `out[r] = row_r(m) · v + bias[r]` for a row-major `m` with `v.len()` columns.
fn matvec(m: &[f32], v: &[f32], bias: &[f32], out: &mut [f32]) {
    let k = v.len();
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot(&m[r * k..(r + 1) * k], v) + bias[r];
    }
}

fn string_list(ctx: &OpCtx, key: &str) -> Result<Option<Vec<String>>> {
    match ctx.node.attrs.get(key) {
        None => Ok(None),
        Some(Attr::Strings(v)) => Ok(Some(
            v.iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
        )),
        Some(_) => bail!(Invalid, "attribute '{key}' is not a list of strings"),
    }
}

/// Activations for every direction, `per_dir` of them per direction.
fn activations(ctx: &OpCtx, kind: Kind, num_dir: usize) -> Result<Vec<Act>> {
    let per_dir = kind.default_acts().len();
    let names: Vec<String> = match string_list(ctx, "activations")? {
        Some(v) => v,
        None => (0..num_dir)
            .flat_map(|_| kind.default_acts().iter().map(|s| s.to_string()))
            .collect(),
    };
    // A single direction's list may be given for a bidirectional layer; reuse it.
    let names = if names.len() == per_dir && num_dir == 2 {
        names.iter().chain(names.iter()).cloned().collect()
    } else {
        names
    };
    if names.len() != per_dir * num_dir {
        bail!(
            Invalid,
            "expected {} activations, got {}",
            per_dir * num_dir,
            names.len()
        );
    }
    let alphas = ctx.node.attr_floats("activation_alpha")?.unwrap_or(&[]);
    let betas = ctx.node.attr_floats("activation_beta")?.unwrap_or(&[]);
    let mut ai = alphas.iter().copied();
    let mut bi = betas.iter().copied();
    names
        .iter()
        .map(|n| Act::parse(n, &mut ai, &mut bi))
        .collect()
}

/// A float input as f32 with an exact expected shape.
fn f32_input(t: &Tensor, want: &[usize], what: &str) -> Result<Vec<f32>> {
    if t.shape() != want {
        bail!(
            Shape,
            "{what} has shape {:?}, expected {:?}",
            t.shape(),
            want
        );
    }
    if !t.dtype().is_float() {
        bail!(Shape, "{what} must be a float tensor, got {}", t.dtype());
    }
    t.to_f32_vec()
}

/// Reorders a `[a, b, rest]` buffer to `[b, a, rest]`.
fn swap01(v: &[f32], a: usize, b: usize, rest: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for i in 0..a {
        for j in 0..b {
            let src = (i * b + j) * rest;
            let dst = (j * a + i) * rest;
            out[dst..dst + rest].copy_from_slice(&v[src..src + rest]);
        }
    }
    out
}

fn run(ctx: &OpCtx, inputs: &[Option<&Tensor>], kind: Kind) -> Result<Vec<Tensor>> {
    let x_t = input(inputs, 0)?;
    let w_t = input(inputs, 1)?;
    let r_t = input(inputs, 2)?;
    let dtype = x_t.dtype();
    if !dtype.is_float() {
        bail!(Shape, "X must be a float tensor, got {dtype}");
    }
    let layout = ctx.int("layout", 0)?;
    if layout != 0 && layout != 1 {
        bail!(Invalid, "layout must be 0 or 1, got {layout}");
    }
    if x_t.rank() != 3 {
        bail!(Shape, "X must have rank 3, got shape {:?}", x_t.shape());
    }
    let (seq, batch, in_size) = if layout == 0 {
        (x_t.shape()[0], x_t.shape()[1], x_t.shape()[2])
    } else {
        (x_t.shape()[1], x_t.shape()[0], x_t.shape()[2])
    };
    let direction = ctx.string("direction", "forward")?;
    let num_dir = match direction.as_str() {
        "forward" | "reverse" => 1,
        "bidirectional" => 2,
        d => bail!(Invalid, "unknown direction '{d}'"),
    };
    let g = kind.gates();
    if w_t.rank() != 3 || w_t.shape()[0] != num_dir || w_t.shape()[1] % g != 0 {
        bail!(
            Shape,
            "W has shape {:?}; expected [{num_dir}, {g}*hidden, {in_size}]",
            w_t.shape()
        );
    }
    let hidden = w_t.shape()[1] / g;
    if let Some(hs) = ctx.node.attr_int("hidden_size")? {
        if hs as usize != hidden || hs < 0 {
            bail!(
                Shape,
                "hidden_size {hs} does not match W's {} rows",
                w_t.shape()[1]
            );
        }
    }
    let gh = g * hidden;
    let mut x = f32_input(x_t, x_t.shape(), "X")?;
    if layout == 1 {
        x = swap01(&x, batch, seq, in_size);
    }
    let w = f32_input(w_t, &[num_dir, gh, in_size], "W")?;
    let r = f32_input(r_t, &[num_dir, gh, hidden], "R")?;
    let b = match opt_input(inputs, 3) {
        Some(t) => f32_input(t, &[num_dir, 2 * gh], "B")?,
        None => vec![0.0; num_dir * 2 * gh],
    };
    let seq_lens: Vec<usize> = match opt_input(inputs, 4) {
        Some(t) => {
            if t.shape() != [batch] {
                bail!(
                    Shape,
                    "sequence_lens has shape {:?}, expected [{batch}]",
                    t.shape()
                );
            }
            t.to_i64_vec()?
                .into_iter()
                .map(|l| {
                    if l < 0 || l as usize > seq {
                        bail!(Input, "sequence length {l} is outside 0..={seq}");
                    }
                    Ok(l as usize)
                })
                .collect::<Result<_>>()?
        }
        None => vec![seq; batch],
    };
    let state_shape: Vec<usize> = if layout == 0 {
        vec![num_dir, batch, hidden]
    } else {
        vec![batch, num_dir, hidden]
    };
    let initial = |i: usize, what: &str| -> Result<Vec<f32>> {
        match opt_input(inputs, i) {
            Some(t) => {
                let v = f32_input(t, &state_shape, what)?;
                Ok(if layout == 1 {
                    swap01(&v, batch, num_dir, hidden)
                } else {
                    v
                })
            }
            None => Ok(vec![0.0; num_dir * batch * hidden]),
        }
    };
    let h0 = initial(5, "initial_h")?;
    let (c0, peep) = if kind == Kind::Lstm {
        let c0 = initial(6, "initial_c")?;
        let p = match opt_input(inputs, 7) {
            Some(t) => f32_input(t, &[num_dir, 3 * hidden], "P")?,
            None => vec![0.0; num_dir * 3 * hidden],
        };
        (c0, p)
    } else {
        (Vec::new(), Vec::new())
    };
    let acts = activations(ctx, kind, num_dir)?;
    let per_dir = kind.default_acts().len();
    let clip = ctx.node.attr_float("clip")?;
    if let Some(c) = clip {
        if c.is_nan() || c < 0.0 {
            bail!(Invalid, "clip must be non-negative, got {c}");
        }
    }
    let cl = |v: f32| match clip {
        Some(c) => v.clamp(-c, c),
        None => v,
    };
    let linear_before_reset = ctx.int("linear_before_reset", 0)? != 0;
    let input_forget = ctx.int("input_forget", 0)? != 0;

    let mut y = vec![0.0f32; seq * num_dir * batch * hidden];
    let mut yh = vec![0.0f32; num_dir * batch * hidden];
    let mut yc = vec![0.0f32; if kind == Kind::Lstm { yh.len() } else { 0 }];
    let (mut wx, mut rh) = (vec![0.0f32; gh], vec![0.0f32; gh]);
    let mut h_new = vec![0.0f32; hidden];
    let mut rh2 = vec![0.0f32; hidden];
    let mut tmp = vec![0.0f32; hidden];
    for d in 0..num_dir {
        let reverse = direction == "reverse" || d == 1;
        let wd = &w[d * gh * in_size..(d + 1) * gh * in_size];
        let rd = &r[d * gh * hidden..(d + 1) * gh * hidden];
        let wb = &b[d * 2 * gh..d * 2 * gh + gh];
        let rb = &b[d * 2 * gh + gh..(d + 1) * 2 * gh];
        let act = &acts[d * per_dir..(d + 1) * per_dir];
        for (bi, &len) in seq_lens.iter().enumerate() {
            let so = (d * batch + bi) * hidden;
            let mut h = h0[so..so + hidden].to_vec();
            let mut c = if kind == Kind::Lstm {
                c0[so..so + hidden].to_vec()
            } else {
                Vec::new()
            };
            for step in 0..len {
                let t = if reverse { len - 1 - step } else { step };
                let xo = (t * batch + bi) * in_size;
                matvec(wd, &x[xo..xo + in_size], wb, &mut wx);
                matvec(rd, &h, rb, &mut rh);
                match kind {
                    Kind::Rnn => {
                        for j in 0..hidden {
                            h_new[j] = act[0].apply(cl(wx[j] + rh[j]));
                        }
                        h.copy_from_slice(&h_new);
                    }
                    Kind::Gru => {
                        // Gate blocks are z, r, h.
                        for j in 0..hidden {
                            tmp[j] = act[0].apply(cl(wx[hidden + j] + rh[hidden + j]));
                        }
                        if !linear_before_reset {
                            let rhh: Vec<f32> = h.iter().zip(&tmp).map(|(a, b)| a * b).collect();
                            matvec(
                                &rd[2 * hidden * hidden..],
                                &rhh,
                                &rb[2 * hidden..],
                                &mut rh2,
                            );
                        }
                        for j in 0..hidden {
                            let z = act[0].apply(cl(wx[j] + rh[j]));
                            let cand = if linear_before_reset {
                                wx[2 * hidden + j] + tmp[j] * rh[2 * hidden + j]
                            } else {
                                wx[2 * hidden + j] + rh2[j]
                            };
                            let hh = act[1].apply(cl(cand));
                            h_new[j] = (1.0 - z) * hh + z * h[j];
                        }
                        h.copy_from_slice(&h_new);
                    }
                    Kind::Lstm => {
                        // Gate blocks are i, o, f, c; peepholes are i, o, f.
                        let p = &peep[d * 3 * hidden..(d + 1) * 3 * hidden];
                        for j in 0..hidden {
                            let ig = act[0].apply(cl(wx[j] + rh[j] + p[j] * c[j]));
                            let fg = if input_forget {
                                1.0 - ig
                            } else {
                                act[0].apply(cl(wx[2 * hidden + j]
                                    + rh[2 * hidden + j]
                                    + p[2 * hidden + j] * c[j]))
                            };
                            let cg = act[1].apply(cl(wx[3 * hidden + j] + rh[3 * hidden + j]));
                            let cn = fg * c[j] + ig * cg;
                            let og = act[0]
                                .apply(cl(wx[hidden + j] + rh[hidden + j] + p[hidden + j] * cn));
                            c[j] = cn;
                            h[j] = og * act[2].apply(cn);
                        }
                    }
                }
                let yo = ((t * num_dir + d) * batch + bi) * hidden;
                y[yo..yo + hidden].copy_from_slice(&h);
            }
            yh[so..so + hidden].copy_from_slice(&h);
            if kind == Kind::Lstm {
                yc[so..so + hidden].copy_from_slice(&c);
            }
        }
    }

    let finish = |v: Vec<f32>, shape: Vec<usize>| -> Result<Tensor> {
        let t = Tensor::from_vec(shape, v)?;
        if dtype == DType::F32 {
            Ok(t)
        } else {
            t.cast(dtype)
        }
    };
    let mut outs = Vec::with_capacity(3);
    if layout == 0 {
        outs.push(finish(y, vec![seq, num_dir, batch, hidden])?);
    } else {
        // [seq, dir, batch, H] -> [batch, seq, dir, H]
        let mut yt = vec![0.0f32; y.len()];
        for t in 0..seq {
            for d in 0..num_dir {
                for bi in 0..batch {
                    let src = ((t * num_dir + d) * batch + bi) * hidden;
                    let dst = ((bi * seq + t) * num_dir + d) * hidden;
                    yt[dst..dst + hidden].copy_from_slice(&y[src..src + hidden]);
                }
            }
        }
        outs.push(finish(yt, vec![batch, seq, num_dir, hidden])?);
    }
    let mut states = vec![yh];
    if kind == Kind::Lstm {
        states.push(yc);
    }
    for s in states {
        if layout == 0 {
            outs.push(finish(s, vec![num_dir, batch, hidden])?);
        } else {
            outs.push(finish(
                swap01(&s, num_dir, batch, hidden),
                vec![batch, num_dir, hidden],
            )?);
        }
    }
    Ok(outs)
}

#[cfg(test)]
mod tests {
    use super::super::{lookup, OpCtx};
    use smelt_ir::{Attr, Node};
    use smelt_tensor::{Result, Tensor};

    fn run(op: &str, attrs: &[(&str, Attr)], inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let mut node = Node::new(op, "t", &[], &[]);
        for (k, v) in attrs {
            node = node.with_attr(k, v.clone());
        }
        let ctx = OpCtx::new(&node, 17);
        lookup("", op).expect("registered")(&ctx, inputs)
    }

    fn t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    fn close(got: &Tensor, shape: &[usize], want: &[f32]) {
        assert_eq!(got.shape(), shape);
        let g = got.as_slice::<f32>().unwrap();
        for (i, (a, b)) in g.iter().zip(want).enumerate() {
            assert!((a - b).abs() < 1e-5, "element {i}: got {a}, want {b}");
        }
    }

    fn strs(v: &[&str]) -> Attr {
        Attr::Strings(v.iter().map(|s| s.as_bytes().to_vec()).collect())
    }

    #[test]
    fn rnn_forward_tanh() {
        // h1 = tanh(0.5*1), h2 = tanh(0.5*2 + 0.5*h1)
        let (x, w, r) = (
            t(&[2, 1, 1], &[1.0, 2.0]),
            t(&[1, 1, 1], &[0.5]),
            t(&[1, 1, 1], &[0.5]),
        );
        let out = run("RNN", &[], &[Some(&x), Some(&w), Some(&r)]).unwrap();
        close(&out[0], &[2, 1, 1, 1], &[0.462_117_16, 0.842_886_1]);
        close(&out[1], &[1, 1, 1], &[0.842_886_1]);
    }

    #[test]
    fn rnn_reverse_relu_and_sequence_lens() {
        // Reverse over [1, 2] with W=1, R=2: h(t=1) = 2, h(t=0) = 1 + 2*2 = 5.
        let (x, w, r) = (
            t(&[2, 1, 1], &[1.0, 2.0]),
            t(&[1, 1, 1], &[1.0]),
            t(&[1, 1, 1], &[2.0]),
        );
        let attrs = [
            ("direction", Attr::String(b"reverse".to_vec())),
            ("activations", strs(&["Relu"])),
        ];
        let out = run("RNN", &attrs, &[Some(&x), Some(&w), Some(&r)]).unwrap();
        close(&out[0], &[2, 1, 1, 1], &[5.0, 2.0]);
        close(&out[1], &[1, 1, 1], &[5.0]);

        // Batch of two, lengths [2, 1]: the short sequence stops (and pads Y with 0) after t=0.
        let x = t(&[2, 2, 1], &[1.0, 10.0, 2.0, 20.0]);
        let w1 = t(&[1, 1, 1], &[1.0]);
        let lens = Tensor::from_vec(vec![2], vec![2i32, 1]).unwrap();
        let attrs = [("activations", strs(&["Relu"]))];
        let out = run(
            "RNN",
            &attrs,
            &[Some(&x), Some(&w1), Some(&w1), None, Some(&lens)],
        )
        .unwrap();
        close(&out[0], &[2, 1, 2, 1], &[1.0, 10.0, 3.0, 0.0]);
        close(&out[1], &[1, 2, 1], &[3.0, 10.0]);
    }

    #[test]
    fn gru_both_reset_orders() {
        // x=1, h0=1, all weights 1: z = r = sigmoid(2).
        let x = t(&[1, 1, 1], &[1.0]);
        let w = t(&[1, 3, 1], &[1.0, 1.0, 1.0]);
        let h0 = t(&[1, 1, 1], &[1.0]);
        // Rbh = 1 only matters through the candidate gate.
        let b = t(&[1, 6], &[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        let bz = t(&[1, 6], &[0.0; 6]);
        let ins = |b: &Tensor| {
            run(
                "GRU",
                &[],
                &[Some(&x), Some(&w), Some(&w), Some(b), None, Some(&h0)],
            )
            .unwrap()
        };
        // hh = tanh(1 + r*h), h = (1-z)hh + z
        close(&ins(&bz)[1], &[1, 1, 1], &[0.994_583_8]);
        let out = run(
            "GRU",
            &[("linear_before_reset", Attr::Int(1))],
            &[Some(&x), Some(&w), Some(&w), Some(&b), None, Some(&h0)],
        )
        .unwrap();
        // hh = tanh(1 + r*(h*1 + 1))
        close(&out[1], &[1, 1, 1], &[0.999_051_8]);
    }

    #[test]
    fn lstm_peepholes_and_input_forget() {
        let x = t(&[1, 1, 1], &[1.0]);
        let w = t(&[1, 4, 1], &[1.0; 4]);
        let r = t(&[1, 4, 1], &[0.0; 4]);
        let c0 = t(&[1, 1, 1], &[1.0]);
        let p = t(&[1, 3], &[0.5, 0.5, 0.5]);
        let ins = [
            Some(&x),
            Some(&w),
            Some(&r),
            None,
            None,
            None,
            Some(&c0),
            Some(&p),
        ];
        let out = run("LSTM", &[], &ins).unwrap();
        close(&out[1], &[1, 1, 1], &[0.758_024_3]);
        close(&out[2], &[1, 1, 1], &[1.440_234_4]);
        let out = run("LSTM", &[("input_forget", Attr::Int(1))], &ins).unwrap();
        close(&out[1], &[1, 1, 1], &[0.535_221_4]);
        close(&out[2], &[1, 1, 1], &[0.805_085_5]);
    }

    #[test]
    fn bidirectional_batch_first_layout() {
        // layout=1: X is [batch=1, seq=2, in=1]; the reverse direction sees 2 first.
        let x = t(&[1, 2, 1], &[1.0, 2.0]);
        let w = t(&[2, 1, 1], &[1.0, 1.0]);
        let r = t(&[2, 1, 1], &[1.0, 1.0]);
        let attrs = [
            ("layout", Attr::Int(1)),
            ("direction", Attr::String(b"bidirectional".to_vec())),
            ("activations", strs(&["Relu", "Relu"])),
        ];
        let out = run("RNN", &attrs, &[Some(&x), Some(&w), Some(&r)]).unwrap();
        // forward: 1, 3; reverse: t=1 -> 2, t=0 -> 1 + 2 = 3. Y is [batch, seq, dir, hidden].
        close(&out[0], &[1, 2, 2, 1], &[1.0, 3.0, 3.0, 2.0]);
        close(&out[1], &[1, 2, 1], &[3.0, 3.0]);
    }

    #[test]
    fn rejects_bad_shapes_and_activations() {
        let x = t(&[1, 1, 1], &[1.0]);
        let w = t(&[1, 2, 1], &[1.0, 1.0]);
        assert!(run("GRU", &[], &[Some(&x), Some(&w), Some(&w)]).is_err());
        let w1 = t(&[1, 1, 1], &[1.0]);
        let bad = [("activations", strs(&["Gelu"]))];
        assert!(run("RNN", &bad, &[Some(&x), Some(&w1), Some(&w1)]).is_err());
        let lens = Tensor::from_vec(vec![1], vec![5i64]).unwrap();
        assert!(run(
            "RNN",
            &[],
            &[Some(&x), Some(&w1), Some(&w1), None, Some(&lens)]
        )
        .is_err());
    }
}
