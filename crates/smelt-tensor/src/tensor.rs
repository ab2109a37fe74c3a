use crate::subbyte::{Int2, Int4, Uint2, Uint4};
use crate::{bail, DType, Error, Result};
use half::{bf16, f16};
use std::fmt::Debug;

/// Typed element storage; one variant per `DType`.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    I16(Vec<i16>),
    U16(Vec<u16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    I4(Vec<Int4>),
    U4(Vec<Uint4>),
    I2(Vec<Int2>),
    U2(Vec<Uint2>),
}

/// A numeric (or bool) element type stored in `Data`. Conversions go through f64 for floats and
/// i128 for integers so every ONNX cast between numeric types is exact where the target allows.
pub trait Element: Copy + Send + Sync + Default + PartialOrd + Debug + 'static {
    const DTYPE: DType;
    fn slice(d: &Data) -> Option<&[Self]>;
    fn slice_mut(d: &mut Data) -> Option<&mut [Self]>;
    fn into_vec(d: Data) -> Option<Vec<Self>>;
    fn wrap(v: Vec<Self>) -> Data;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    fn to_i128(self) -> i128;
    fn from_i128(v: i128) -> Self;
}

macro_rules! element_int {
    ($t:ty, $var:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$var;
            fn slice(d: &Data) -> Option<&[Self]> {
                if let Data::$var(v) = d {
                    Some(v)
                } else {
                    None
                }
            }
            fn slice_mut(d: &mut Data) -> Option<&mut [Self]> {
                if let Data::$var(v) = d {
                    Some(v)
                } else {
                    None
                }
            }
            fn into_vec(d: Data) -> Option<Vec<Self>> {
                if let Data::$var(v) = d {
                    Some(v)
                } else {
                    None
                }
            }
            fn wrap(v: Vec<Self>) -> Data {
                Data::$var(v)
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_i128(self) -> i128 {
                self as i128
            }
            fn from_i128(v: i128) -> Self {
                v as $t
            }
        }
    };
}
element_int!(i8, I8);
element_int!(u8, U8);
element_int!(i16, I16);
element_int!(u16, U16);
element_int!(i32, I32);
element_int!(i64, I64);
element_int!(u32, U32);
element_int!(u64, U64);

macro_rules! element_float {
    ($t:ty, $var:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$var;
            fn slice(d: &Data) -> Option<&[Self]> {
                if let Data::$var(v) = d {
                    Some(v)
                } else {
                    None
                }
            }
            fn slice_mut(d: &mut Data) -> Option<&mut [Self]> {
                if let Data::$var(v) = d {
                    Some(v)
                } else {
                    None
                }
            }
            fn into_vec(d: Data) -> Option<Vec<Self>> {
                if let Data::$var(v) = d {
                    Some(v)
                } else {
                    None
                }
            }
            fn wrap(v: Vec<Self>) -> Data {
                Data::$var(v)
            }
            fn to_f64(self) -> f64 {
                ($to)(self)
            }
            fn from_f64(v: f64) -> Self {
                ($from)(v)
            }
            fn to_i128(self) -> i128 {
                ($to)(self) as i128
            }
            fn from_i128(v: i128) -> Self {
                ($from)(v as f64)
            }
        }
    };
}
element_float!(f32, F32, |x: f32| x as f64, |v: f64| v as f32);
element_float!(f64, F64, |x: f64| x, |v: f64| v);
element_float!(f16, F16, |x: f16| x.to_f64(), f16::from_f64);
element_float!(bf16, BF16, |x: bf16| x.to_f64(), bf16::from_f64);

impl Element for bool {
    const DTYPE: DType = DType::Bool;
    fn slice(d: &Data) -> Option<&[Self]> {
        if let Data::Bool(v) = d {
            Some(v)
        } else {
            None
        }
    }
    fn slice_mut(d: &mut Data) -> Option<&mut [Self]> {
        if let Data::Bool(v) = d {
            Some(v)
        } else {
            None
        }
    }
    fn into_vec(d: Data) -> Option<Vec<Self>> {
        if let Data::Bool(v) = d {
            Some(v)
        } else {
            None
        }
    }
    fn wrap(v: Vec<Self>) -> Data {
        Data::Bool(v)
    }
    fn to_f64(self) -> f64 {
        self as u8 as f64
    }
    fn from_f64(v: f64) -> Self {
        v != 0.0
    }
    fn to_i128(self) -> i128 {
        self as i128
    }
    fn from_i128(v: i128) -> Self {
        v != 0
    }
}

/// Runs `$body` with `$v` bound to the typed `Vec` inside `$data` and `$T` naming its element
/// type, so one generic kernel serves every dtype.
///
/// The short form is for arithmetic: it covers the byte-aligned numeric types and bool, and
/// returns `Unsupported` for strings and sub-byte integers (which have no arithmetic here).
/// The `str => $str` form is for code that only moves elements: it also runs `$body` for the
/// sub-byte types (their `Element` impls keep every value in range and `T::wrap` keeps the
/// dtype), and runs `$str` for strings.
#[macro_export]
#[rustfmt::skip]
macro_rules! dispatch {
    ($data:expr, $T:ident, $v:ident => $body:expr, str => $str:expr) => {
        match $data {
            $crate::Data::F32($v) => { #[allow(dead_code)] type $T = f32; $body }
            $crate::Data::F64($v) => { #[allow(dead_code)] type $T = f64; $body }
            $crate::Data::F16($v) => { #[allow(dead_code)] type $T = $crate::f16; $body }
            $crate::Data::BF16($v) => { #[allow(dead_code)] type $T = $crate::bf16; $body }
            $crate::Data::I8($v) => { #[allow(dead_code)] type $T = i8; $body }
            $crate::Data::U8($v) => { #[allow(dead_code)] type $T = u8; $body }
            $crate::Data::I16($v) => { #[allow(dead_code)] type $T = i16; $body }
            $crate::Data::U16($v) => { #[allow(dead_code)] type $T = u16; $body }
            $crate::Data::I32($v) => { #[allow(dead_code)] type $T = i32; $body }
            $crate::Data::I64($v) => { #[allow(dead_code)] type $T = i64; $body }
            $crate::Data::U32($v) => { #[allow(dead_code)] type $T = u32; $body }
            $crate::Data::U64($v) => { #[allow(dead_code)] type $T = u64; $body }
            $crate::Data::Bool($v) => { #[allow(dead_code)] type $T = bool; $body }
            $crate::Data::I4($v) => { #[allow(dead_code)] type $T = $crate::Int4; $body }
            $crate::Data::U4($v) => { #[allow(dead_code)] type $T = $crate::Uint4; $body }
            $crate::Data::I2($v) => { #[allow(dead_code)] type $T = $crate::Int2; $body }
            $crate::Data::U2($v) => { #[allow(dead_code)] type $T = $crate::Uint2; $body }
            $crate::Data::Str(_) => $str,
        }
    };
    ($data:expr, $T:ident, $v:ident => $body:expr) => {
        match $data {
            $crate::Data::F32($v) => { #[allow(dead_code)] type $T = f32; $body }
            $crate::Data::F64($v) => { #[allow(dead_code)] type $T = f64; $body }
            $crate::Data::F16($v) => { #[allow(dead_code)] type $T = $crate::f16; $body }
            $crate::Data::BF16($v) => { #[allow(dead_code)] type $T = $crate::bf16; $body }
            $crate::Data::I8($v) => { #[allow(dead_code)] type $T = i8; $body }
            $crate::Data::U8($v) => { #[allow(dead_code)] type $T = u8; $body }
            $crate::Data::I16($v) => { #[allow(dead_code)] type $T = i16; $body }
            $crate::Data::U16($v) => { #[allow(dead_code)] type $T = u16; $body }
            $crate::Data::I32($v) => { #[allow(dead_code)] type $T = i32; $body }
            $crate::Data::I64($v) => { #[allow(dead_code)] type $T = i64; $body }
            $crate::Data::U32($v) => { #[allow(dead_code)] type $T = u32; $body }
            $crate::Data::U64($v) => { #[allow(dead_code)] type $T = u64; $body }
            $crate::Data::Bool($v) => { #[allow(dead_code)] type $T = bool; $body }
            d @ ($crate::Data::I4(_) | $crate::Data::U4(_) | $crate::Data::I2(_) | $crate::Data::U2(_)) => {
                return Err($crate::Error::Unsupported(format!("{} tensors are not supported here", d.dtype())))
            }
            $crate::Data::Str(_) => {
                return Err($crate::Error::Unsupported("string tensors are not supported here".into()))
            }
        }
    };
}

impl Data {
    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::F64(_) => DType::F64,
            Data::F16(_) => DType::F16,
            Data::BF16(_) => DType::BF16,
            Data::I8(_) => DType::I8,
            Data::U8(_) => DType::U8,
            Data::I16(_) => DType::I16,
            Data::U16(_) => DType::U16,
            Data::I32(_) => DType::I32,
            Data::I64(_) => DType::I64,
            Data::U32(_) => DType::U32,
            Data::U64(_) => DType::U64,
            Data::Bool(_) => DType::Bool,
            Data::Str(_) => DType::Str,
            Data::I4(_) => DType::I4,
            Data::U4(_) => DType::U4,
            Data::I2(_) => DType::I2,
            Data::U2(_) => DType::U2,
        }
    }

    pub fn len(&self) -> usize {
        dispatch!(self, T, v => v.len(), str => match self { Data::Str(s) => s.len(), _ => 0 })
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A zero-filled vector of `n` elements of `dtype`.
    pub fn zeros(dtype: DType, n: usize) -> Data {
        fn z<T: Element>(n: usize) -> Data {
            T::wrap(vec![T::default(); n])
        }
        match dtype {
            DType::F32 => z::<f32>(n),
            DType::F64 => z::<f64>(n),
            DType::F16 => z::<f16>(n),
            DType::BF16 => z::<bf16>(n),
            DType::I8 => z::<i8>(n),
            DType::U8 => z::<u8>(n),
            DType::I16 => z::<i16>(n),
            DType::U16 => z::<u16>(n),
            DType::I32 => z::<i32>(n),
            DType::I64 => z::<i64>(n),
            DType::U32 => z::<u32>(n),
            DType::U64 => z::<u64>(n),
            DType::Bool => z::<bool>(n),
            DType::Str => Data::Str(vec![String::new(); n]),
            DType::I4 => z::<Int4>(n),
            DType::U4 => z::<Uint4>(n),
            DType::I2 => z::<Int2>(n),
            DType::U2 => z::<Uint2>(n),
        }
    }

    /// Integer values as data of integer (or bool) `dtype`, failing on the first value outside
    /// its range: the checked way to build quantized tensors, sub-byte ones included.
    pub fn from_ints(dtype: DType, v: &[i64]) -> Result<Data> {
        fn go<T: Element>(v: &[i64]) -> Result<Data> {
            let mut out = Vec::with_capacity(v.len());
            for &x in v {
                let e = T::from_i128(x as i128);
                if e.to_i128() != x as i128 {
                    bail!(Input, "{x} is outside the range of {}", T::DTYPE);
                }
                out.push(e);
            }
            Ok(T::wrap(out))
        }
        match dtype {
            DType::I8 => go::<i8>(v),
            DType::U8 => go::<u8>(v),
            DType::I16 => go::<i16>(v),
            DType::U16 => go::<u16>(v),
            DType::I32 => go::<i32>(v),
            DType::I64 => go::<i64>(v),
            DType::U32 => go::<u32>(v),
            DType::U64 => go::<u64>(v),
            DType::Bool => go::<bool>(v),
            DType::I4 => go::<Int4>(v),
            DType::U4 => go::<Uint4>(v),
            DType::I2 => go::<Int2>(v),
            DType::U2 => go::<Uint2>(v),
            _ => bail!(Unsupported, "{dtype} is not an integer type"),
        }
    }

    /// Gathers elements by index into a new `Data` of the same dtype: the core of every
    /// layout op (transpose, slice, gather, expand).
    pub fn gather(&self, idx: impl Iterator<Item = usize>) -> Data {
        dispatch!(self, T, v => T::wrap(idx.map(|i| v[i]).collect()),
            str => match self { Data::Str(s) => Data::Str(idx.map(|i| s[i].clone()).collect()), _ => unreachable!() })
    }
}

/// A dense row-major tensor. Scalars have an empty shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Data,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Data) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            bail!(
                Shape,
                "shape {:?} needs {} elements, data has {}",
                shape,
                n,
                data.len()
            );
        }
        Ok(Tensor { shape, data })
    }

    pub fn from_vec<T: Element>(shape: Vec<usize>, v: Vec<T>) -> Result<Tensor> {
        Tensor::new(shape, T::wrap(v))
    }

    pub fn scalar<T: Element>(v: T) -> Tensor {
        Tensor {
            shape: vec![],
            data: T::wrap(vec![v]),
        }
    }

    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor {
            shape,
            data: Data::zeros(dtype, n),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
    pub fn data(&self) -> &Data {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut Data {
        &mut self.data
    }
    pub fn into_data(self) -> Data {
        self.data
    }
    pub fn into_parts(self) -> (Vec<usize>, Data) {
        (self.shape, self.data)
    }

    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        T::slice(&self.data).ok_or_else(|| {
            Error::Shape(format!(
                "expected {} tensor, got {}",
                T::DTYPE,
                self.dtype()
            ))
        })
    }

    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        let dt = self.dtype();
        T::slice_mut(&mut self.data)
            .ok_or_else(|| Error::Shape(format!("expected {} tensor, got {}", T::DTYPE, dt)))
    }

    pub fn into_vec<T: Element>(self) -> Result<Vec<T>> {
        let dt = self.dtype();
        T::into_vec(self.data)
            .ok_or_else(|| Error::Shape(format!("expected {} tensor, got {}", T::DTYPE, dt)))
    }

    /// Same data, new shape (element counts must agree).
    pub fn reshape(self, shape: Vec<usize>) -> Result<Tensor> {
        Tensor::new(shape, self.data)
    }

    /// Converts to another dtype with ONNX Cast semantics for numeric types (float to int
    /// truncates toward zero and saturates; int to int wraps), plus string parsing/printing.
    pub fn cast(&self, to: DType) -> Result<Tensor> {
        if to == self.dtype() {
            return Ok(self.clone());
        }
        let src_float = self.dtype().is_float();
        fn conv<S: Element, D: Element>(v: &[S], src_float: bool) -> Data {
            if D::DTYPE.is_float() || D::DTYPE == DType::Bool || src_float {
                D::wrap(v.iter().map(|x| D::from_f64(x.to_f64())).collect())
            } else {
                D::wrap(v.iter().map(|x| D::from_i128(x.to_i128())).collect())
            }
        }
        fn to_dst<S: Element>(v: &[S], to: DType, src_float: bool) -> Result<Data> {
            Ok(match to {
                DType::F32 => conv::<S, f32>(v, src_float),
                DType::F64 => conv::<S, f64>(v, src_float),
                DType::F16 => conv::<S, f16>(v, src_float),
                DType::BF16 => conv::<S, bf16>(v, src_float),
                DType::I8 => conv::<S, i8>(v, src_float),
                DType::U8 => conv::<S, u8>(v, src_float),
                DType::I16 => conv::<S, i16>(v, src_float),
                DType::U16 => conv::<S, u16>(v, src_float),
                DType::I32 => conv::<S, i32>(v, src_float),
                DType::I64 => conv::<S, i64>(v, src_float),
                DType::U32 => conv::<S, u32>(v, src_float),
                DType::U64 => conv::<S, u64>(v, src_float),
                DType::Bool => conv::<S, bool>(v, src_float),
                DType::I4 => conv::<S, Int4>(v, src_float),
                DType::U4 => conv::<S, Uint4>(v, src_float),
                DType::I2 => conv::<S, Int2>(v, src_float),
                DType::U2 => conv::<S, Uint2>(v, src_float),
                DType::Str => Data::Str(
                    v.iter()
                        .map(|x| format_number(x.to_f64(), S::DTYPE))
                        .collect(),
                ),
            })
        }
        let data = dispatch!(&self.data, T, v => to_dst::<T>(v, to, src_float)?, str => {
            let Data::Str(s) = &self.data else { unreachable!() };
            let parsed: Vec<f64> = s.iter().map(|x| parse_number(x)).collect::<Result<_>>()?;
            to_dst::<f64>(&parsed, to, true)?
        });
        Tensor::new(self.shape.clone(), data)
    }

    /// All elements as f32 (lossy for wide ints; used for reporting and float kernels).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        if let Data::F32(v) = &self.data {
            return Ok(v.clone());
        }
        Ok(
            dispatch!(&self.data, T, v => v.iter().map(|x| x.to_f64() as f32).collect(),
            str => bail!(Unsupported, "string tensors are not supported here")),
        )
    }

    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        Ok(
            dispatch!(&self.data, T, v => v.iter().map(|x| x.to_f64()).collect(),
            str => bail!(Unsupported, "string tensors are not supported here")),
        )
    }

    /// All elements as i64: for shape, axes and index inputs. Floats are rejected.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        if self.dtype().is_float() {
            bail!(Shape, "expected an integer tensor, got {}", self.dtype());
        }
        Ok(
            dispatch!(&self.data, T, v => v.iter().map(|x| x.to_i128() as i64).collect(),
            str => bail!(Unsupported, "string tensors are not supported here")),
        )
    }
}

fn format_number(v: f64, dtype: DType) -> String {
    if dtype.is_float() {
        if v.is_nan() {
            "NaN".into()
        } else if v.is_infinite() {
            if v > 0.0 {
                "INF".into()
            } else {
                "-INF".into()
            }
        } else {
            format!("{v}")
        }
    } else {
        format!("{}", v as i128)
    }
}

fn parse_number(s: &str) -> Result<f64> {
    let t = s.trim();
    match t.to_ascii_lowercase().as_str() {
        "nan" => return Ok(f64::NAN),
        "inf" | "+inf" | "infinity" | "+infinity" => return Ok(f64::INFINITY),
        "-inf" | "-infinity" => return Ok(f64::NEG_INFINITY),
        _ => {}
    }
    t.parse::<f64>()
        .map_err(|_| Error::Input(format!("cannot parse {s:?} as a number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cast_float_to_int_truncates_and_int_wraps() {
        let t = Tensor::from_vec(vec![3], vec![1.7f32, -1.7, 300.0]).unwrap();
        assert_eq!(
            t.cast(DType::I32).unwrap().as_slice::<i32>().unwrap(),
            &[1, -1, 300]
        );
        assert_eq!(
            t.cast(DType::U8).unwrap().as_slice::<u8>().unwrap(),
            &[1, 0, 255]
        );
        let i = Tensor::from_vec(vec![2], vec![257i64, -1]).unwrap();
        assert_eq!(
            i.cast(DType::U8).unwrap().as_slice::<u8>().unwrap(),
            &[1, 255]
        );
    }

    #[test]
    fn sub_byte_casts_wrap_like_onnx() {
        // The ONNX suite's Cast FLOAT -> INT4 / UINT4 data: values wrap modulo 16.
        let x = Tensor::from_vec(vec![5], vec![-9.0f32, -8.0, 7.9, 8.0, 15.0]).unwrap();
        let i4 = x.cast(DType::I4).unwrap();
        assert_eq!(i4.dtype(), DType::I4);
        assert_eq!(i4.to_i64_vec().unwrap(), vec![7, -8, 7, -8, -1]);
        let u4 = x.cast(DType::U4).unwrap();
        assert_eq!(u4.to_i64_vec().unwrap(), vec![7, 8, 7, 8, 15]);
        let i2 = Tensor::from_vec(vec![3], vec![-3i64, 2, 3])
            .unwrap()
            .cast(DType::I2)
            .unwrap();
        assert_eq!(i2.to_i64_vec().unwrap(), vec![1, -2, -1]);
        // Back out: int4 -> int8 / float / bool keep the value.
        assert_eq!(
            i4.cast(DType::I8).unwrap().as_slice::<i8>().unwrap(),
            &[7, -8, 7, -8, -1]
        );
        assert_eq!(u4.to_f32_vec().unwrap(), vec![7.0, 8.0, 7.0, 8.0, 15.0]);
        assert_eq!(
            i4.cast(DType::Bool).unwrap().as_slice::<bool>().unwrap(),
            &[true; 5]
        );
        assert_eq!(
            i4.cast(DType::U4).unwrap().to_i64_vec().unwrap(),
            vec![7, 8, 7, 8, 15]
        );
    }

    #[test]
    fn from_ints_checks_the_range() {
        let d = Data::from_ints(DType::I4, &[-8, 0, 7]).unwrap();
        let t = Tensor::new(vec![3], d).unwrap();
        assert_eq!(t.dtype(), DType::I4);
        assert_eq!(t.to_f32_vec().unwrap(), vec![-8.0, 0.0, 7.0]);
        assert_eq!(t.to_f64_vec().unwrap(), vec![-8.0, 0.0, 7.0]);
        let e = Data::from_ints(DType::I4, &[1, 8]).unwrap_err().to_string();
        assert!(e.contains("8 is outside the range of int4"), "{e}");
        assert!(Data::from_ints(DType::U4, &[-1]).is_err());
        assert!(Data::from_ints(DType::U2, &[4]).is_err());
        assert!(Data::from_ints(DType::I2, &[-2, 1]).is_ok());
        assert!(Data::from_ints(DType::U8, &[256]).is_err());
        assert!(Data::from_ints(DType::F32, &[1]).is_err());
        assert_eq!(
            Data::zeros(DType::U2, 2),
            Data::from_ints(DType::U2, &[0, 0]).unwrap()
        );
    }

    #[test]
    fn short_dispatch_rejects_sub_byte_and_long_form_keeps_dtype() {
        fn sum(d: &Data) -> Result<f64> {
            Ok(dispatch!(d, T, v => v.iter().map(|x| x.to_f64()).sum::<f64>()))
        }
        let d = Data::from_ints(DType::U4, &[1, 15, 3]).unwrap();
        let e = sum(&d).unwrap_err();
        assert!(
            matches!(e, Error::Unsupported(_)) && e.to_string().contains("uint4"),
            "{e}"
        );
        assert_eq!(sum(&Data::U8(vec![1, 15, 3])).unwrap(), 19.0);
        // Moving elements (gather) keeps the sub-byte dtype and values.
        let g = d.gather([2, 0, 0].into_iter());
        assert_eq!(g, Data::from_ints(DType::U4, &[3, 1, 1]).unwrap());
        assert_eq!(g.len(), 3);
    }

    #[test]
    fn new_rejects_wrong_len() {
        assert!(Tensor::from_vec(vec![2, 2], vec![1.0f32; 3]).is_err());
    }
}
