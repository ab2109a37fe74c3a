//! Fused attention ops from opset 23/24: `Attention` (scaled dot-product attention with KV
//! cache, GQA, masks, softcap) and `RotaryEmbedding`.
//!
//! Both compute in f32; other float dtypes are converted on the way in and back on the way out,
//! as the rest of the engine does for float ops.

use super::{input, opt_input, OpCtx, Registry};
use rayon::prelude::*;
use smelt_tensor::{bail, DType, Result, Tensor};

pub fn register(r: &mut Registry) {
    r.insert("Attention", attention);
    r.insert("RotaryEmbedding", rotary_embedding);
}

/// The tensor's elements as f32, rejecting non-float inputs.
fn floats(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    if !t.dtype().is_float() {
        bail!(
            Unsupported,
            "{what} must be a float tensor, got {}",
            t.dtype()
        );
    }
    t.to_f32_vec()
}

/// Wraps f32 results as a tensor of `dtype` (the op's input type).
fn from_floats(shape: Vec<usize>, v: Vec<f32>, dtype: DType) -> Result<Tensor> {
    let t = Tensor::from_vec(shape, v)?;
    if dtype == DType::F32 {
        Ok(t)
    } else {
        t.cast(dtype)
    }
}

/// A heads-major [B, H, S, D] copy of a Q/K/V input, which may come as [B, S, H*D].
fn to_bhsd(t: &Tensor, heads_attr: i64, what: &str) -> Result<(Vec<f32>, [usize; 4])> {
    let v = floats(t, what)?;
    match *t.shape() {
        [b, h, s, d] => Ok((v, [b, h, s, d])),
        [b, s, hidden] => {
            if heads_attr <= 0 {
                bail!(
                    Invalid,
                    "3-D {what} needs a positive num_heads attribute, got {heads_attr}"
                );
            }
            let h = heads_attr as usize;
            if hidden % h != 0 {
                bail!(
                    Shape,
                    "{what} hidden size {hidden} is not divisible by {h} heads"
                );
            }
            let d = hidden / h;
            let mut out = vec![0f32; v.len()];
            for bi in 0..b {
                for si in 0..s {
                    for hi in 0..h {
                        let src = ((bi * s + si) * h + hi) * d;
                        let dst = ((bi * h + hi) * s + si) * d;
                        out[dst..dst + d].copy_from_slice(&v[src..src + d]);
                    }
                }
            }
            Ok((out, [b, h, s, d]))
        }
        _ => bail!(
            Shape,
            "{what} must be 3-D or 4-D, got shape {:?}",
            t.shape()
        ),
    }
}

/// Concatenates a [B, H, P, D] cache with [B, H, S, D] new entries along the sequence axis.
fn concat_seq(past: Option<(&[f32], usize)>, new: &[f32], dims: [usize; 4]) -> (Vec<f32>, usize) {
    let [b, h, s, d] = dims;
    let Some((pv, p)) = past else {
        return (new.to_vec(), s);
    };
    let t = p + s;
    let mut out = Vec::with_capacity(b * h * t * d);
    for bh in 0..b * h {
        out.extend_from_slice(&pv[bh * p * d..(bh + 1) * p * d]);
        out.extend_from_slice(&new[bh * s * d..(bh + 1) * s * d]);
    }
    (out, t)
}

/// Reads and checks an optional past cache against the new entries' dims.
fn past_cache(
    t: Option<&Tensor>,
    b: usize,
    h: usize,
    d: usize,
    what: &str,
) -> Result<Option<(Vec<f32>, usize)>> {
    let Some(t) = t else { return Ok(None) };
    let &[pb, ph, p, pd] = t.shape() else {
        bail!(
            Shape,
            "{what} must be 4-D [batch, kv_heads, past_seq, head_size], got {:?}",
            t.shape()
        );
    };
    if (pb, ph, pd) != (b, h, d) {
        bail!(
            Shape,
            "{what} shape {:?} does not match [{b}, {h}, _, {d}]",
            t.shape()
        );
    }
    Ok(Some((floats(t, what)?, p)))
}

/// The additive bias over [B, Hq, Sq, T] from the optional mask, causal flag and padding
/// lengths; `None` when nothing masks.
#[allow(clippy::too_many_arguments)]
fn attention_bias(
    mask: Option<&Tensor>,
    nonpad: Option<&Tensor>,
    causal: bool,
    b: usize,
    hq: usize,
    sq: usize,
    t: usize,
    past: usize,
) -> Result<Option<Vec<f32>>> {
    if mask.is_none() && nonpad.is_none() && !causal {
        return Ok(None);
    }
    let mut bias = vec![0f32; b * hq * sq * t];
    if let Some(m) = mask {
        let vals: Vec<f32> = if m.dtype() == DType::Bool {
            m.to_f32_vec()?
                .into_iter()
                .map(|x| if x != 0.0 { 0.0 } else { f32::NEG_INFINITY })
                .collect()
        } else {
            floats(m, "attn_mask")?
        };
        let ms = m.shape();
        if ms.is_empty() || ms.len() > 4 {
            bail!(Shape, "attn_mask must have rank 1 to 4, got shape {ms:?}");
        }
        let mut shape4 = [1usize; 4];
        shape4[4 - ms.len()..].copy_from_slice(ms);
        let target = [b, hq, sq, t];
        let len = shape4[3];
        if len > t {
            bail!(
                Shape,
                "attn_mask last dim {len} exceeds the total sequence length {t}"
            );
        }
        for k in 0..3 {
            if shape4[k] != 1 && shape4[k] != target[k] {
                bail!(
                    Shape,
                    "attn_mask shape {ms:?} does not broadcast to {target:?}"
                );
            }
        }
        // Row-major strides with zeros on broadcast dims.
        let mut strides = [0usize; 4];
        let mut acc = 1;
        for k in (0..4).rev() {
            strides[k] = if shape4[k] == 1 && k < 3 { 0 } else { acc };
            acc *= shape4[k];
        }
        for bi in 0..b {
            for hi in 0..hq {
                for i in 0..sq {
                    let row = ((bi * hq + hi) * sq + i) * t;
                    let base = bi * strides[0] + hi * strides[1] + i * strides[2];
                    for j in 0..t {
                        // A mask shorter than the total length is padded with -inf.
                        bias[row + j] = if j < len {
                            vals[base + j * strides[3]]
                        } else {
                            f32::NEG_INFINITY
                        };
                    }
                }
            }
        }
    }
    if causal {
        // Query i sits at absolute position past + i and sees keys up to there.
        for bh in 0..b * hq {
            for i in 0..sq {
                let row = (bh * sq + i) * t;
                for j in (past + i + 1).min(t)..t {
                    bias[row + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    if let Some(np) = nonpad {
        let lens = np.to_i64_vec()?;
        if lens.len() != b {
            bail!(
                Shape,
                "nonpad_kv_seqlen must have {b} entries, got {}",
                lens.len()
            );
        }
        for (bi, &l) in lens.iter().enumerate() {
            let l = l.clamp(0, t as i64) as usize;
            for r in 0..hq * sq {
                let row = (bi * hq * sq + r) * t;
                for x in &mut bias[row + l..row + t] {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Some(bias))
}

/// ONNX Attention (opset 23/24). Inputs: Q, K, V, attn_mask?, past_key?, past_value?,
/// nonpad_kv_seqlen?. Outputs: Y, present_key, present_value, qk_matmul_output.
fn attention(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let q_t = input(inputs, 0)?;
    let k_t = input(inputs, 1)?;
    let v_t = input(inputs, 2)?;
    let dtype = q_t.dtype();
    let rank = q_t.rank();
    if k_t.rank() != rank || v_t.rank() != rank {
        bail!(
            Shape,
            "Q, K and V must have the same rank, got {}, {}, {}",
            rank,
            k_t.rank(),
            v_t.rank()
        );
    }
    let q_heads = ctx.int("q_num_heads", 0)?;
    let kv_heads = ctx.int("kv_num_heads", 0)?;
    let (q, [b, hq, sq, dk]) = to_bhsd(q_t, q_heads, "Q")?;
    let (k, [kb, hkv, skv, kdk]) = to_bhsd(k_t, kv_heads, "K")?;
    let (v, [vb, vh, vs, dv]) = to_bhsd(v_t, kv_heads, "V")?;
    if kb != b || vb != b || vh != hkv || vs != skv || kdk != dk {
        bail!(
            Shape,
            "inconsistent Q/K/V shapes {:?}, {:?}, {:?}",
            q_t.shape(),
            k_t.shape(),
            v_t.shape()
        );
    }
    if hkv == 0 || hq % hkv != 0 {
        bail!(Shape, "q heads {hq} must be a multiple of kv heads {hkv}");
    }
    let group = hq / hkv;

    let past_k = past_cache(opt_input(inputs, 4), b, hkv, dk, "past_key")?;
    let past_v = past_cache(opt_input(inputs, 5), b, hkv, dv, "past_value")?;
    let past_len = past_k.as_ref().map_or(0, |p| p.1);
    if past_v.as_ref().map_or(0, |p| p.1) != past_len {
        bail!(
            Shape,
            "past_key and past_value must both be given with the same length"
        );
    }
    let (pk, t) = concat_seq(
        past_k.as_ref().map(|(v, p)| (v.as_slice(), *p)),
        &k,
        [b, hkv, skv, dk],
    );
    let (pv, _) = concat_seq(
        past_v.as_ref().map(|(v, p)| (v.as_slice(), *p)),
        &v,
        [b, hkv, skv, dv],
    );

    let causal = ctx.int("is_causal", 0)? != 0;
    let bias = attention_bias(
        opt_input(inputs, 3),
        opt_input(inputs, 6),
        causal,
        b,
        hq,
        sq,
        t,
        past_len,
    )?;
    let scale = match ctx.node.attr_float("scale")? {
        Some(s) => s,
        None => 1.0 / (dk as f32).sqrt(),
    };
    let softcap = ctx.float("softcap", 0.0)?;
    let mode = ctx.int("qk_matmul_output_mode", 0)?;
    if !(0..=3).contains(&mode) {
        bail!(Invalid, "qk_matmul_output_mode must be 0..3, got {mode}");
    }
    let want_qk = ctx.node.outputs.len() > 3 && !ctx.node.outputs[3].is_empty();

    let mut y = vec![0f32; b * hq * sq * dv];
    let mut qk_out = vec![0f32; if want_qk { b * hq * sq * t } else { 0 }];
    let qk_chunk = if want_qk { sq * t } else { 0 };
    let work = |(bh, (yo, qo)): (usize, (&mut [f32], &mut [f32]))| {
        let (bi, hi) = (bh / hq, bh % hq);
        let kvh = bi * hkv + hi / group;
        let kb = &pk[kvh * t * dk..(kvh + 1) * t * dk];
        let vb = &pv[kvh * t * dv..(kvh + 1) * t * dv];
        let mut row = vec![0f32; t];
        for i in 0..sq {
            let qr = &q[(bh * sq + i) * dk..(bh * sq + i + 1) * dk];
            for (j, r) in row.iter_mut().enumerate() {
                let kr = &kb[j * dk..(j + 1) * dk];
                *r = qr.iter().zip(kr).map(|(a, c)| a * c).sum::<f32>() * scale;
            }
            let mut qo_row = if want_qk {
                Some(&mut qo[i * t..(i + 1) * t])
            } else {
                None
            };
            // Copies the scores at pipeline stage `m` to the optional 4th output.
            let snap = |m: i64, row: &[f32], qo_row: &mut Option<&mut [f32]>| {
                if m == mode {
                    if let Some(o) = qo_row.as_deref_mut() {
                        o.copy_from_slice(row);
                    }
                }
            };
            snap(0, &row, &mut qo_row);
            if softcap > 0.0 {
                for r in row.iter_mut() {
                    *r = softcap * (*r / softcap).tanh();
                }
            }
            snap(1, &row, &mut qo_row);
            if let Some(bias) = &bias {
                let br = &bias[(bh * sq + i) * t..(bh * sq + i + 1) * t];
                for (r, bv) in row.iter_mut().zip(br) {
                    *r += bv;
                }
            }
            snap(2, &row, &mut qo_row);
            softmax_row(&mut row);
            snap(3, &row, &mut qo_row);
            let yr = &mut yo[i * dv..(i + 1) * dv];
            for (j, &p) in row.iter().enumerate() {
                if p == 0.0 {
                    continue;
                }
                for (o, vv) in yr.iter_mut().zip(&vb[j * dv..(j + 1) * dv]) {
                    *o += p * vv;
                }
            }
        }
    };
    if y.is_empty() || t == 0 {
        // Nothing to attend over (or to): Y stays zero.
    } else if want_qk {
        y.par_chunks_mut(sq * dv)
            .zip(qk_out.par_chunks_mut(qk_chunk))
            .enumerate()
            .for_each(work);
    } else {
        y.par_chunks_mut(sq * dv)
            .enumerate()
            .for_each(|(bh, yo)| work((bh, (yo, &mut []))));
    }

    let y_t = if rank == 3 {
        // Back to [B, Sq, Hq*Dv].
        let mut out = vec![0f32; y.len()];
        for bi in 0..b {
            for hi in 0..hq {
                for i in 0..sq {
                    let src = ((bi * hq + hi) * sq + i) * dv;
                    let dst = ((bi * sq + i) * hq + hi) * dv;
                    out[dst..dst + dv].copy_from_slice(&y[src..src + dv]);
                }
            }
        }
        from_floats(vec![b, sq, hq * dv], out, dtype)?
    } else {
        from_floats(vec![b, hq, sq, dv], y, dtype)?
    };
    let mut outs = vec![y_t];
    if ctx.node.outputs.len() > 1 {
        outs.push(from_floats(vec![b, hkv, t, dk], pk, dtype)?);
        outs.push(from_floats(vec![b, hkv, t, dv], pv, dtype)?);
    }
    if want_qk {
        outs.push(from_floats(vec![b, hq, sq, t], qk_out, dtype)?);
    }
    Ok(outs)
}

/// In-place softmax. A row that is entirely -inf yields NaN, as the reference formula does.
fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for r in row.iter_mut() {
        *r = (*r - max).exp();
        sum += *r;
    }
    for r in row.iter_mut() {
        *r /= sum;
    }
}

/// ONNX RotaryEmbedding (opset 23). Inputs: X ([B, H, S, D] or [B, S, H*D]), cos_cache,
/// sin_cache, position_ids?.
fn rotary_embedding(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x_t = input(inputs, 0)?;
    let cos_t = input(inputs, 1)?;
    let sin_t = input(inputs, 2)?;
    let pos_t = opt_input(inputs, 3);
    let dtype = x_t.dtype();
    let x = floats(x_t, "X")?;
    let interleaved = ctx.int("interleaved", 0)? != 0;
    let num_heads = ctx.int("num_heads", 0)?;
    let rot_attr = ctx.int("rotary_embedding_dim", 0)?;

    // Element (b, s, h, d) lives at b*sb + s*ss + h*hs + d in either layout.
    let (b, s, h, d, sb, ss, hs) = match *x_t.shape() {
        [b, h, s, d] => (b, s, h, d, h * s * d, d, s * d),
        [b, s, hidden] => {
            if num_heads <= 0 {
                bail!(
                    Invalid,
                    "3-D input needs a positive num_heads attribute, got {num_heads}"
                );
            }
            let h = num_heads as usize;
            if hidden % h != 0 {
                bail!(
                    Shape,
                    "hidden size {hidden} is not divisible by num_heads {h}"
                );
            }
            let d = hidden / h;
            (b, s, h, d, s * hidden, hidden, d)
        }
        _ => bail!(
            Shape,
            "RotaryEmbedding input must be 3-D or 4-D, got {:?}",
            x_t.shape()
        ),
    };
    let rd = if rot_attr <= 0 { d } else { rot_attr as usize };
    if rd > d || rd % 2 != 0 {
        bail!(
            Invalid,
            "rotary_embedding_dim {rd} must be even and at most the head size {d}"
        );
    }
    let half = rd / 2;

    let cos = floats(cos_t, "cos_cache")?;
    let sin = floats(sin_t, "sin_cache")?;
    if cos_t.shape() != sin_t.shape() {
        bail!(
            Shape,
            "cos_cache {:?} and sin_cache {:?} differ in shape",
            cos_t.shape(),
            sin_t.shape()
        );
    }
    let cs = cos_t.shape();
    let width = *cs.last().unwrap_or(&0);
    if width < half {
        bail!(
            Shape,
            "cos/sin cache width {width} is below rotary_dim/2 = {half}"
        );
    }
    // Offset of the cache row for (batch, seq).
    let row_of: Box<dyn Fn(usize, usize) -> Result<usize>> = match pos_t {
        Some(p) => {
            let ids = p.to_i64_vec()?;
            let ps = p.shape().to_vec();
            let (pb, psq) = match *ps.as_slice() {
                [pb, psq] => (pb, psq),
                [psq] => (1, psq),
                _ => bail!(Shape, "position_ids must be [batch, seq], got {ps:?}"),
            };
            if (pb != b && pb != 1) || psq != s {
                bail!(
                    Shape,
                    "position_ids shape {ps:?} does not match batch {b}, seq {s}"
                );
            }
            let &[max_pos, _] = cs else {
                bail!(
                    Shape,
                    "with position_ids, caches must be [max_pos, dim], got {cs:?}"
                );
            };
            Box::new(move |bi, si| {
                let id = ids[if pb == 1 { 0 } else { bi } * psq + si];
                if id < 0 || id as usize >= max_pos {
                    bail!(
                        Input,
                        "position id {id} is outside the cache of {max_pos} rows"
                    );
                }
                Ok(id as usize * width)
            })
        }
        None => {
            let &[cb, csq, _] = cs else {
                bail!(
                    Shape,
                    "without position_ids, caches must be [batch, seq, dim], got {cs:?}"
                );
            };
            if (cb != b && cb != 1) || csq != s {
                bail!(
                    Shape,
                    "cache shape {cs:?} does not match batch {b}, seq {s}"
                );
            }
            Box::new(move |bi, si| Ok((if cb == 1 { 0 } else { bi } * csq + si) * width))
        }
    };

    let mut out = x.clone();
    for bi in 0..b {
        for si in 0..s {
            let r = row_of(bi, si)?;
            let (cr, sr) = (&cos[r..r + half], &sin[r..r + half]);
            for hi in 0..h {
                let base = bi * sb + si * ss + hi * hs;
                for k in 0..half {
                    let (i1, i2) = if interleaved {
                        (2 * k, 2 * k + 1)
                    } else {
                        (k, k + half)
                    };
                    let (x1, x2) = (x[base + i1], x[base + i2]);
                    out[base + i1] = cr[k] * x1 - sr[k] * x2;
                    out[base + i2] = sr[k] * x1 + cr[k] * x2;
                }
            }
        }
    }
    Ok(vec![from_floats(x_t.shape().to_vec(), out, dtype)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_ir::{Attr, Node};

    fn run(
        op: &str,
        n_out: usize,
        attrs: &[(&str, Attr)],
        ins: &[Option<&Tensor>],
    ) -> Result<Vec<Tensor>> {
        let outs: Vec<String> = (0..n_out).map(|i| format!("y{i}")).collect();
        let outs: Vec<&str> = outs.iter().map(String::as_str).collect();
        let mut n = Node::new(op, "t", &["x"], &outs);
        for (k, v) in attrs {
            n = n.with_attr(k, v.clone());
        }
        let ctx = OpCtx::new(&n, 23);
        match op {
            "Attention" => attention(&ctx, ins),
            _ => rotary_embedding(&ctx, ins),
        }
    }

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    fn close(got: &Tensor, shape: &[usize], want: &[f32]) {
        assert_eq!(got.shape(), shape);
        let g = got.as_slice::<f32>().unwrap();
        assert_eq!(g.len(), want.len(), "{g:?} vs {want:?}");
        for (a, b) in g.iter().zip(want) {
            assert!(a == b || (a - b).abs() < 1e-5, "{g:?} vs {want:?}");
        }
    }

    #[test]
    fn one_head_with_bool_float_and_short_masks() {
        // Scores 1, 0, 2 (scale 1); the third key is masked out, so
        // Y = (e*1 + 1*3) / (e + 1).
        let q = t(&[1, 1, 1, 2], vec![1.0, 0.0]);
        let k = t(&[1, 1, 3, 2], vec![1.0, 0.0, 0.0, 1.0, 2.0, 0.0]);
        let v = t(&[1, 1, 3, 1], vec![1.0, 3.0, 100.0]);
        let e = std::f32::consts::E;
        let want = (e + 3.0) / (e + 1.0);
        let attrs = [("scale", Attr::Float(1.0))];
        let bool_mask = Tensor::from_vec(vec![1, 3], vec![true, true, false]).unwrap();
        let float_mask = t(&[1, 3], vec![0.0, 0.0, f32::NEG_INFINITY]);
        // A mask shorter than the keys pads the rest with -inf.
        let short_mask = t(&[2], vec![0.0, 0.0]);
        for m in [&bool_mask, &float_mask, &short_mask] {
            let y = run(
                "Attention",
                1,
                &attrs,
                &[Some(&q), Some(&k), Some(&v), Some(m)],
            )
            .unwrap();
            close(&y[0], &[1, 1, 1, 1], &[want]);
        }
        // Without a mask the third key (score 2, value 100) dominates.
        let y = run("Attention", 1, &attrs, &[Some(&q), Some(&k), Some(&v)]).unwrap();
        let full = (e + 3.0 + e * e * 100.0) / (e + 1.0 + e * e);
        close(&y[0], &[1, 1, 1, 1], &[full]);
    }

    #[test]
    fn causal_and_qk_output_modes() {
        let q = t(&[1, 1, 2, 1], vec![1.0, 1.0]);
        let k = t(&[1, 1, 2, 1], vec![1.0, 2.0]);
        let v = t(&[1, 1, 2, 1], vec![2.0, 4.0]);
        let ins = [Some(&q), Some(&k), Some(&v)];
        let ninf = f32::NEG_INFINITY;
        let mode = |m| {
            [
                ("is_causal", Attr::Int(1)),
                ("qk_matmul_output_mode", Attr::Int(m)),
            ]
        };
        let out = run("Attention", 4, &mode(0), &ins).unwrap();
        // Row 0 sees only key 0; row 1 weighs keys by softmax(1, 2).
        let p1 = 1.0 / (1.0 + std::f32::consts::E);
        close(&out[0], &[1, 1, 2, 1], &[2.0, 2.0 * p1 + 4.0 * (1.0 - p1)]);
        close(&out[1], &[1, 1, 2, 1], &[1.0, 2.0]);
        close(&out[3], &[1, 1, 2, 2], &[1.0, 2.0, 1.0, 2.0]);
        let out = run("Attention", 4, &mode(2), &ins).unwrap();
        close(&out[3], &[1, 1, 2, 2], &[1.0, ninf, 1.0, 2.0]);
        let out = run("Attention", 4, &mode(3), &ins).unwrap();
        close(&out[3], &[1, 1, 2, 2], &[1.0, 0.0, p1, 1.0 - p1]);
    }

    #[test]
    fn causal_with_past_is_offset() {
        // One new query at absolute position 1 sees the past key and its own: mean(10, 4).
        let q = t(&[1, 1, 1, 1], vec![0.0]);
        let k = t(&[1, 1, 1, 1], vec![1.0]);
        let v = t(&[1, 1, 1, 1], vec![4.0]);
        let pk = t(&[1, 1, 1, 1], vec![0.0]);
        let pv = t(&[1, 1, 1, 1], vec![10.0]);
        let out = run(
            "Attention",
            3,
            &[("is_causal", Attr::Int(1))],
            &[Some(&q), Some(&k), Some(&v), None, Some(&pk), Some(&pv)],
        )
        .unwrap();
        close(&out[0], &[1, 1, 1, 1], &[7.0]);
        close(&out[1], &[1, 1, 2, 1], &[0.0, 1.0]);
        close(&out[2], &[1, 1, 2, 1], &[10.0, 4.0]);
    }

    #[test]
    fn gqa_3d_shapes_and_head_mapping() {
        // 4 query heads share 2 kv heads; kv head 0 holds values 1, kv head 1 values 5.
        let q = t(&[1, 2, 8], (0..16).map(|i| i as f32 * 0.1).collect());
        let k = t(&[1, 3, 4], (0..12).map(|i| (i % 5) as f32).collect());
        let v = t(&[1, 3, 6], [1.0, 1.0, 1.0, 5.0, 5.0, 5.0].repeat(3));
        let attrs = [
            ("q_num_heads", Attr::Int(4)),
            ("kv_num_heads", Attr::Int(2)),
        ];
        let out = run("Attention", 3, &attrs, &[Some(&q), Some(&k), Some(&v)]).unwrap();
        let row = [[1.0f32; 6], [5.0; 6]].concat();
        close(&out[0], &[1, 2, 12], &row.repeat(2));
        assert_eq!(out[1].shape(), &[1, 2, 3, 2]);
        close(&out[2], &[1, 2, 3, 3], &[[1.0f32; 9], [5.0; 9]].concat());
        // Heads that do not divide are rejected.
        let bad = [
            ("q_num_heads", Attr::Int(3)),
            ("kv_num_heads", Attr::Int(2)),
        ];
        let q3 = t(&[1, 2, 6], vec![0.0; 12]);
        assert!(run("Attention", 1, &bad, &[Some(&q3), Some(&k), Some(&v)]).is_err());
    }

    #[test]
    fn rotary_on_four_elements() {
        // Position 1's angles: pi/2 for the first pair, 0 for the second.
        let x = t(&[1, 1, 1, 4], vec![1.0, 2.0, 3.0, 4.0]);
        let cos = t(&[2, 2], vec![1.0, 1.0, 0.0, 1.0]);
        let sin = t(&[2, 2], vec![0.0, 0.0, 1.0, 0.0]);
        let pos = Tensor::from_vec(vec![1, 1], vec![1i64]).unwrap();
        let ins = [Some(&x), Some(&cos), Some(&sin), Some(&pos)];
        // Halves (1,2)/(3,4): pair (1,3) turns by pi/2, pair (2,4) stays.
        let y = run("RotaryEmbedding", 1, &[], &ins).unwrap();
        close(&y[0], &[1, 1, 1, 4], &[-3.0, 2.0, 1.0, 4.0]);
        // Interleaved pairs (1,2)/(3,4).
        let y = run("RotaryEmbedding", 1, &[("interleaved", Attr::Int(1))], &ins).unwrap();
        close(&y[0], &[1, 1, 1, 4], &[-2.0, 1.0, 3.0, 4.0]);
        // Only the first two dims rotate.
        let y = run(
            "RotaryEmbedding",
            1,
            &[("rotary_embedding_dim", Attr::Int(2))],
            &ins,
        )
        .unwrap();
        close(&y[0], &[1, 1, 1, 4], &[-2.0, 1.0, 3.0, 4.0]);
        // 3-D input with two heads of size 2, caches already per position.
        let x3 = t(&[1, 1, 4], vec![1.0, 2.0, 3.0, 4.0]);
        let c3 = t(&[1, 1, 1], vec![0.0]);
        let s3 = t(&[1, 1, 1], vec![1.0]);
        let y = run(
            "RotaryEmbedding",
            1,
            &[("num_heads", Attr::Int(2))],
            &[Some(&x3), Some(&c3), Some(&s3)],
        )
        .unwrap();
        close(&y[0], &[1, 1, 4], &[-2.0, 1.0, -4.0, 3.0]);
        // Out-of-range position ids are an error, not a panic.
        let far = Tensor::from_vec(vec![1, 1], vec![7i64]).unwrap();
        assert!(run(
            "RotaryEmbedding",
            1,
            &[],
            &[Some(&x), Some(&cos), Some(&sin), Some(&far)]
        )
        .is_err());
    }
}
