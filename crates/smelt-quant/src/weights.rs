//! Weight quantization: per-tensor, per-channel and block-wise scales, with an optional
//! per-group search for the clipping range that minimises reconstruction error.

use crate::params::{Affine, ErrorStats};
use crate::scheme::{Clip, Granularity, QType, WeightScheme};
use rayon::prelude::*;
use smelt_tensor::{bail, Data, Int2, Int4, Result, Tensor, Uint2, Uint4};

/// A weight tensor in integer form plus what the exporter needs to write its
/// DequantizeLinear: `scale_shape` is the shape of the scale / zero-point tensors, `axis` the
/// ONNX `axis` attribute and `block` the `block_size` attribute.
#[derive(Clone, Debug)]
pub struct QuantizedWeight {
    pub qtype: QType,
    pub shape: Vec<usize>,
    pub codes: Vec<i32>,
    pub params: Vec<Affine>,
    pub scale_shape: Vec<usize>,
    pub axis: Option<usize>,
    pub block: Option<usize>,
    pub error: ErrorStats,
}

/// Which elements share a scale. `channel_axis` is the output-channel axis (Conv: 0, MatMul
/// B [K, N]: 1); `reduce_axis` the axis blocks run along (Conv: 1, MatMul B: 0).
#[derive(Clone, Copy, Debug)]
pub struct Axes {
    pub channel_axis: usize,
    pub reduce_axis: usize,
}

/// Maps each element to its group, in the row-major order of the scale tensor.
struct Grouping {
    n_groups: usize,
    scale_shape: Vec<usize>,
    axis: Option<usize>,
    block: Option<usize>,
    dim: usize,
    inner: usize,
    step: usize,
}

impl Grouping {
    fn new(shape: &[usize], g: Granularity, axes: Axes) -> Result<Grouping> {
        let rank = shape.len();
        let split = |a: usize| {
            let outer: usize = shape[..a].iter().product();
            let inner: usize = shape[a + 1..].iter().product();
            (outer, shape[a], inner)
        };
        Ok(match g {
            Granularity::PerTensor => Grouping {
                n_groups: 1,
                scale_shape: vec![],
                axis: None,
                block: None,
                dim: 1,
                inner: shape.iter().product(),
                step: 1,
            },
            Granularity::PerChannel => {
                if axes.channel_axis >= rank {
                    bail!(
                        Shape,
                        "channel axis {} out of range for shape {shape:?}",
                        axes.channel_axis
                    );
                }
                let (_, dim, inner) = split(axes.channel_axis);
                Grouping {
                    n_groups: dim,
                    scale_shape: vec![dim],
                    axis: Some(axes.channel_axis),
                    block: None,
                    dim,
                    inner,
                    step: 1,
                }
            }
            Granularity::Block(size) => {
                // ONNX blocks run along one axis only: a Conv with few input channels would get
                // a scale per few weights. When one output channel's whole kernel fits in a
                // block, a scale per output channel is as fine as asked, with fewer scales.
                if axes.reduce_axis < rank
                    && shape[axes.reduce_axis..].iter().product::<usize>() <= size
                    && shape[axes.reduce_axis + 1..].iter().product::<usize>() > 1
                    && axes.channel_axis != axes.reduce_axis
                {
                    return Grouping::new(shape, Granularity::PerChannel, axes);
                }
                if axes.reduce_axis >= rank || size == 0 {
                    bail!(
                        Shape,
                        "block axis {} out of range for shape {shape:?}",
                        axes.reduce_axis
                    );
                }
                let (outer, dim, inner) = split(axes.reduce_axis);
                let nb = dim.div_ceil(size);
                let mut scale_shape = shape.to_vec();
                scale_shape[axes.reduce_axis] = nb;
                Grouping {
                    n_groups: outer * nb * inner,
                    scale_shape,
                    axis: Some(axes.reduce_axis),
                    block: Some(size),
                    dim,
                    inner,
                    step: size,
                }
            }
        })
    }

    #[inline]
    fn group_of(&self, i: usize) -> usize {
        match self.block {
            None if self.n_groups == 1 => 0,
            None => (i / self.inner) % self.dim,
            Some(_) => {
                let r = i % self.inner;
                let d = (i / self.inner) % self.dim;
                let o = i / (self.inner * self.dim);
                (o * self.dim.div_ceil(self.step) + d / self.step) * self.inner + r
            }
        }
    }
}

/// Quantizes a float weight tensor. NaN or infinite weights are refused: they would poison
/// every scale of their group.
pub fn quantize_weight(w: &Tensor, scheme: &WeightScheme, axes: Axes) -> Result<QuantizedWeight> {
    let x = w.to_f32_vec()?;
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        bail!(Invalid, "weight element {i} is {} (not finite)", x[i]);
    }
    let grouping = Grouping::new(w.shape(), scheme.granularity, axes)?;
    // Collect each group's members once; groups are small enough to search independently.
    let mut members: Vec<Vec<f32>> = vec![Vec::new(); grouping.n_groups];
    for (i, &v) in x.iter().enumerate() {
        members[grouping.group_of(i)].push(v);
    }
    let qtype = scheme.qtype;
    let params: Vec<Affine> = members
        .par_iter()
        .map(|vals| choose_affine(vals, qtype, scheme.symmetric, scheme.clip))
        .collect();
    let range = if scheme.symmetric {
        qtype.symmetric_range()
    } else {
        qtype.range()
    };
    // In parallel: a word-embedding table is millions of elements (the results do not depend
    // on how the work is split).
    let codes: Vec<i32> = x
        .par_iter()
        .enumerate()
        .map(|(i, &v)| params[grouping.group_of(i)].quantize(v, range))
        .collect();
    let approx: Vec<f32> = codes
        .par_iter()
        .enumerate()
        .map(|(i, &q)| params[grouping.group_of(i)].dequantize(q))
        .collect();
    Ok(QuantizedWeight {
        qtype,
        shape: w.shape().to_vec(),
        error: ErrorStats::between(&x, &approx),
        codes,
        params,
        scale_shape: grouping.scale_shape,
        axis: grouping.axis,
        block: grouping.block,
    })
}

/// Candidate shrink factors of the min-max range for the MSE clipping search.
const SHRINK_STEPS: usize = 40;
const SHRINK_MIN: f32 = 0.5;

pub(crate) fn choose_affine(vals: &[f32], qtype: QType, symmetric: bool, clip: Clip) -> Affine {
    let (lo, hi) = vals
        .iter()
        .fold((0.0f32, 0.0f32), |(a, b), &v| (a.min(v), b.max(v)));
    let full = Affine::from_range(lo, hi, qtype, symmetric);
    if clip == Clip::MinMax || vals.is_empty() {
        return full;
    }
    let range = if symmetric {
        qtype.symmetric_range()
    } else {
        qtype.range()
    };
    let sse = |a: &Affine| -> f64 {
        vals.iter()
            .map(|&v| {
                let d = (v - a.fake(v, range)) as f64;
                d * d
            })
            .sum()
    };
    let mut best = (sse(&full), full);
    for k in 1..=SHRINK_STEPS {
        let f = 1.0 - (1.0 - SHRINK_MIN) * k as f32 / SHRINK_STEPS as f32;
        let cand = Affine::from_range(lo * f, hi * f, qtype, symmetric);
        let e = sse(&cand);
        if e < best.0 {
            best = (e, cand);
        }
    }
    best.1
}

impl QuantizedWeight {
    /// The float values the quantized weight stands for.
    pub fn dequantized(&self) -> Result<Tensor> {
        let g = self.grouping()?;
        let v: Vec<f32> = self
            .codes
            .iter()
            .enumerate()
            .map(|(i, &q)| self.params[g.group_of(i)].dequantize(q))
            .collect();
        Tensor::from_vec(self.shape.clone(), v)
    }

    fn grouping(&self) -> Result<Grouping> {
        let g = match (self.axis, self.block) {
            (None, _) => Granularity::PerTensor,
            (Some(_), None) => Granularity::PerChannel,
            (Some(_), Some(b)) => Granularity::Block(b),
        };
        let a = self.axis.unwrap_or(0);
        Grouping::new(
            &self.shape,
            g,
            Axes {
                channel_axis: a,
                reduce_axis: a,
            },
        )
    }

    /// The integer codes as a tensor of the quantized type.
    pub fn codes_tensor(&self) -> Result<Tensor> {
        Tensor::new(self.shape.clone(), codes_data(self.qtype, &self.codes))
    }

    pub fn scale_tensor(&self) -> Result<Tensor> {
        Tensor::from_vec(
            self.scale_shape.clone(),
            self.params.iter().map(|p| p.scale).collect::<Vec<f32>>(),
        )
    }

    pub fn zero_point_tensor(&self) -> Result<Tensor> {
        let zps: Vec<i32> = self.params.iter().map(|p| p.zero_point).collect();
        Tensor::new(self.scale_shape.clone(), codes_data(self.qtype, &zps))
    }

    pub fn scale_range(&self) -> (f32, f32) {
        self.params.iter().fold((f32::MAX, 0.0f32), |(a, b), p| {
            (a.min(p.scale), b.max(p.scale))
        })
    }
}

/// Codes already lie inside the type's range (quantize clamps), so the narrowing is exact.
pub fn codes_data(qtype: QType, codes: &[i32]) -> Data {
    match qtype {
        QType::U8 => Data::U8(codes.iter().map(|&c| c as u8).collect()),
        QType::I8 | QType::I7 => Data::I8(codes.iter().map(|&c| c as i8).collect()),
        QType::U4 => Data::U4(codes.iter().map(|&c| Uint4::saturating(c as i64)).collect()),
        QType::I4 => Data::I4(codes.iter().map(|&c| Int4::saturating(c as i64)).collect()),
        QType::U2 => Data::U2(codes.iter().map(|&c| Uint2::saturating(c as i64)).collect()),
        QType::I2 => Data::I2(codes.iter().map(|&c| Int2::saturating(c as i64)).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape, v).unwrap()
    }

    const MATMUL_B: Axes = Axes {
        channel_axis: 1,
        reduce_axis: 0,
    };

    #[test]
    fn per_channel_uses_each_columns_range() {
        // B [K=2, N=2]: column 0 spans 1.27, column 1 spans 0.127.
        let w = t(vec![2, 2], vec![1.27, 0.1, -0.5, -0.127]);
        let q = quantize_weight(&w, &WeightScheme::default(), MATMUL_B).unwrap();
        assert_eq!(q.scale_shape, vec![2]);
        assert_eq!(q.axis, Some(1));
        assert!((q.params[0].scale - 0.01).abs() < 1e-7);
        assert!((q.params[1].scale - 0.001).abs() < 1e-8);
        assert_eq!(q.codes, vec![127, 100, -50, -127]);
        assert!(q.error.sqnr_db > 40.0);
    }

    #[test]
    fn blocks_run_along_the_reduction_axis() {
        // B [K=4, N=1] in blocks of 2: rows 0-1 and rows 2-3 get their own scales.
        let w = t(vec![4, 1], vec![1.0, -0.6, 100.0, 30.0]);
        let s = WeightScheme {
            qtype: QType::I4,
            granularity: Granularity::Block(2),
            ..Default::default()
        };
        let q = quantize_weight(&w, &s, MATMUL_B).unwrap();
        assert_eq!(q.scale_shape, vec![2, 1]);
        assert_eq!(q.block, Some(2));
        assert_eq!(q.axis, Some(0));
        assert!((q.params[0].scale - 1.0 / 7.0).abs() < 1e-7);
        assert!((q.params[1].scale - 100.0 / 7.0).abs() < 1e-5);
        assert_eq!(q.codes, vec![7, -4, 7, 2]); // -0.6*7 = -4.2, 30*7/100 = 2.1
        let d = q.dequantized().unwrap().to_f32_vec().unwrap();
        assert!((d[0] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn conv_with_few_input_channels_gets_a_scale_per_output_channel() {
        // [O=2, I=1, 2, 2] in blocks of 32: blocking along I would give every weight its own
        // scale; one scale per output channel is used instead.
        let w = t(
            vec![2, 1, 2, 2],
            vec![1.5, -2.0, 0.5, 0.25, 7.0, 1.0, -1.0, 3.6],
        );
        let s = WeightScheme {
            qtype: QType::I4,
            granularity: Granularity::Block(32),
            ..Default::default()
        };
        let conv = Axes {
            channel_axis: 0,
            reduce_axis: 1,
        };
        let q = quantize_weight(&w, &s, conv).unwrap();
        assert_eq!(
            (q.scale_shape.clone(), q.axis, q.block),
            (vec![2], Some(0), None)
        );
        assert!((q.params[0].scale - 2.0 / 7.0).abs() < 1e-7);
        assert!((q.params[1].scale - 1.0).abs() < 1e-7);
        assert_eq!(q.codes, vec![5, -7, 2, 1, 7, 1, -1, 4]);
    }

    #[test]
    fn ragged_last_block_and_per_tensor() {
        let w = t(vec![3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let s = WeightScheme {
            granularity: Granularity::Block(2),
            ..Default::default()
        };
        let q = quantize_weight(&w, &s, MATMUL_B).unwrap();
        assert_eq!(q.scale_shape, vec![2, 2]);
        assert!((q.params[2].scale - 5.0 / 127.0).abs() < 1e-7);
        let p = WeightScheme {
            granularity: Granularity::PerTensor,
            symmetric: false,
            qtype: QType::U8,
            ..Default::default()
        };
        let q = quantize_weight(&w, &p, MATMUL_B).unwrap();
        assert_eq!(q.params.len(), 1);
        assert!(q.scale_shape.is_empty());
    }

    #[test]
    fn mse_clipping_beats_min_max_on_outliers() {
        let mut v: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 1000) as f32 / 1000.0 - 0.5) * 0.2)
            .collect();
        v[3] = 1.0; // a single outlier stretches the min-max range 10x
        let w = t(vec![1000, 1], v);
        let base = WeightScheme {
            qtype: QType::I4,
            ..Default::default()
        };
        let mm = quantize_weight(&w, &base, MATMUL_B).unwrap();
        let mse = quantize_weight(
            &w,
            &WeightScheme {
                clip: Clip::Mse,
                ..base
            },
            MATMUL_B,
        )
        .unwrap();
        assert!(
            mse.error.mse < 0.8 * mm.error.mse,
            "{} vs {}",
            mse.error.mse,
            mm.error.mse
        );
    }

    #[test]
    fn non_finite_weights_are_refused() {
        let w = t(vec![2], vec![1.0, f32::NAN]);
        let e = quantize_weight(
            &w,
            &WeightScheme::default(),
            Axes {
                channel_axis: 0,
                reduce_axis: 0,
            },
        );
        assert!(e.unwrap_err().to_string().contains("not finite"));
    }
}
