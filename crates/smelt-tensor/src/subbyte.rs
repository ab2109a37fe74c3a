//! Sub-byte integers (int4, uint4, int2, uint2). In memory each element takes one byte, wrapped
//! in a newtype whose constructors keep it inside the type's range, so an out-of-range value
//! cannot exist in a `Tensor` and generic code that only moves elements works unchanged.
//! Packing (two 4-bit or four 2-bit values per byte, first element in the lowest bits) happens
//! only at file edges, through [`pack_sub_byte`] and [`unpack_sub_byte`].

use crate::tensor::{Data, Element};
use crate::{bail, DType, Result};

/// A sub-byte integer type: its bit width and conversions to and from its packed bit pattern.
pub trait SubByte: Element {
    const BITS: u32;
    /// The element whose two's-complement (or unsigned) pattern is the low `BITS` bits of `b`;
    /// higher bits are ignored.
    fn from_bits(b: u8) -> Self;
    /// The element's low `BITS` bits.
    fn to_bits(self) -> u8;
}

macro_rules! sub_byte {
    ($(#[$doc:meta])* $name:ident, $inner:ty, $var:ident, $bits:expr, $min:expr, $max:expr) => {
        $(#[$doc])*
        #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(transparent)]
        pub struct $name($inner);

        impl $name {
            pub const MIN: $name = $name($min);
            pub const MAX: $name = $name($max);

            /// `None` when `v` is outside the type's range.
            pub fn new(v: i64) -> Option<Self> {
                ($min as i64..=$max as i64)
                    .contains(&v)
                    .then(|| $name(v as $inner))
            }

            /// `v` clamped to the type's range, as quantization needs.
            pub fn saturating(v: i64) -> Self {
                $name(v.clamp($min as i64, $max as i64) as $inner)
            }

            /// The low bits of `v` (two's complement), as ONNX Cast between integers does.
            pub fn wrapping(v: i128) -> Self {
                <Self as SubByte>::from_bits((v & 0xff) as u8)
            }

            pub fn get(self) -> $inner {
                self.0
            }
        }

        impl SubByte for $name {
            const BITS: u32 = $bits;
            fn from_bits(b: u8) -> Self {
                let shift = 8 - $bits;
                // Shifting the pattern to the top then back (arithmetically for signed types)
                // sign-extends it.
                $name(((b << shift) as $inner) >> shift)
            }
            fn to_bits(self) -> u8 {
                (self.0 as u8) & ((1u8 << $bits) - 1)
            }
        }

        impl From<$name> for i32 {
            fn from(v: $name) -> i32 {
                v.0 as i32
            }
        }

        impl Element for $name {
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
                self.0 as f64
            }
            /// Truncates toward zero, then wraps; NaN and infinities give 0 (as numpy's
            /// ml_dtypes casts, which ONNX's reference uses).
            fn from_f64(v: f64) -> Self {
                if v.is_finite() {
                    Self::wrapping(v as i128)
                } else {
                    Self::default()
                }
            }
            fn to_i128(self) -> i128 {
                self.0 as i128
            }
            fn from_i128(v: i128) -> Self {
                Self::wrapping(v)
            }
        }
    };
}

sub_byte!(
    /// A signed 4-bit integer in [-8, 7].
    Int4, i8, I4, 4, -8i8, 7i8
);
sub_byte!(
    /// An unsigned 4-bit integer in [0, 15].
    Uint4, u8, U4, 4, 0u8, 15u8
);
sub_byte!(
    /// A signed 2-bit integer in [-2, 1].
    Int2, i8, I2, 2, -2i8, 1i8
);
sub_byte!(
    /// An unsigned 2-bit integer in [0, 3].
    Uint2, u8, U2, 2, 0u8, 3u8
);

/// Packs sub-byte data as ONNX stores it: `8 / bits` elements per byte, element 0 in the lowest
/// bits, the last byte's unused bits zero. `None` for data that is not sub-byte.
pub fn pack_sub_byte(d: &Data) -> Option<Vec<u8>> {
    fn go<T: SubByte>(v: &[T]) -> Vec<u8> {
        let per = (8 / T::BITS) as usize;
        let mut out = vec![0u8; v.len().div_ceil(per)];
        for (i, x) in v.iter().enumerate() {
            out[i / per] |= x.to_bits() << ((i % per) as u32 * T::BITS);
        }
        out
    }
    Some(match d {
        Data::I4(v) => go(v),
        Data::U4(v) => go(v),
        Data::I2(v) => go(v),
        Data::U2(v) => go(v),
        _ => return None,
    })
}

/// Unpacks `n` elements of sub-byte `dtype` from packed bytes, which must be exactly
/// `dtype.packed_bytes(n)` long. Padding bits are ignored; every value lands in range by
/// construction (signed types are sign-extended).
pub fn unpack_sub_byte(dtype: DType, bytes: &[u8], n: usize) -> Result<Data> {
    fn go<T: SubByte>(b: &[u8], n: usize) -> Vec<T> {
        let per = (8 / T::BITS) as usize;
        b.iter()
            .flat_map(|&byte| (0..per).map(move |j| T::from_bits(byte >> (j as u32 * T::BITS))))
            .take(n)
            .collect()
    }
    if !dtype.is_sub_byte() {
        bail!(Invalid, "{dtype} is not a packed sub-byte type");
    }
    let want = dtype.packed_bytes(n).unwrap_or(usize::MAX);
    if bytes.len() != want {
        bail!(
            Invalid,
            "packed data has {} bytes, but {n} elements of {dtype} need {want}",
            bytes.len()
        );
    }
    Ok(match dtype {
        DType::I4 => Data::I4(go(bytes, n)),
        DType::U4 => Data::U4(go(bytes, n)),
        DType::I2 => Data::I2(go(bytes, n)),
        _ => Data::U2(go(bytes, n)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i4(v: &[i64]) -> Data {
        Data::I4(v.iter().map(|&x| Int4::new(x).unwrap()).collect())
    }

    #[test]
    fn constructors_keep_values_in_range() {
        assert_eq!(Int4::new(7).map(Int4::get), Some(7));
        assert_eq!(Int4::new(-8).map(Int4::get), Some(-8));
        assert_eq!(Int4::new(8), None);
        assert_eq!(Int4::new(-9), None);
        assert_eq!(Uint4::new(-1), None);
        assert_eq!(Uint2::new(4), None);
        assert_eq!(Int2::new(-2).map(Int2::get), Some(-2));
        assert_eq!(Int4::saturating(100).get(), 7);
        assert_eq!(Int4::saturating(-100).get(), -8);
        assert_eq!(Uint4::saturating(-3).get(), 0);
        assert_eq!(Int2::saturating(5).get(), 1);
        // Wrapping keeps the low bits: 9 = 0b1001 -> -7 as int4, 9 as uint4; 300 = 0x12c -> 12.
        assert_eq!(Int4::wrapping(9).get(), -7);
        assert_eq!(Int4::wrapping(-9).get(), 7);
        assert_eq!(Uint4::wrapping(300).get(), 12);
        assert_eq!(Uint4::wrapping(-1).get(), 15);
        assert_eq!(Int2::wrapping(3).get(), -1);
        assert_eq!(Uint2::wrapping(-3).get(), 1);
        assert_eq!(Int4::from_f64(-9.7).get(), 7);
        assert_eq!(Int4::from_f64(f64::NAN).get(), 0);
        assert_eq!(Uint4::from_f64(f64::INFINITY).get(), 0);
    }

    #[test]
    fn pack_is_low_nibble_first_and_pads_odd_counts() {
        // [0, 1, 7, -4, -8] is the ONNX test suite's int4 example: bytes 0x10, 0xc7, 0x08.
        assert_eq!(
            pack_sub_byte(&i4(&[0, 1, 7, -4, -8])).unwrap(),
            vec![0x10, 0xc7, 0x08]
        );
        let u2 = Data::U2((0..4).map(|x| Uint2::new(x).unwrap()).collect());
        assert_eq!(pack_sub_byte(&u2).unwrap(), vec![0b1110_0100]);
        let i2 = Data::I2([-2, 1, -1].iter().map(|&x| Int2::new(x).unwrap()).collect());
        assert_eq!(pack_sub_byte(&i2).unwrap(), vec![0b0011_0110]);
        assert_eq!(pack_sub_byte(&Data::I8(vec![1])), None);
        assert_eq!(pack_sub_byte(&i4(&[])).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn unpack_sign_extends_and_round_trips() {
        // 0xf8: low nibble 8 -> -8, high nibble 0xf -> -1.
        assert_eq!(
            unpack_sub_byte(DType::I4, &[0xf8], 2).unwrap(),
            i4(&[-8, -1])
        );
        assert_eq!(
            unpack_sub_byte(DType::U4, &[0xf8], 2).unwrap(),
            Data::U4(vec![Uint4::new(8).unwrap(), Uint4::new(15).unwrap()])
        );
        // The padding nibble of an odd count is ignored, even when non-zero.
        assert_eq!(
            unpack_sub_byte(DType::I4, &[0x10, 0xc7, 0xf8], 5).unwrap(),
            i4(&[0, 1, 7, -4, -8])
        );
        for n in 0..9 {
            let vals: Vec<i64> = (0..n).map(|i| (i * 5 % 16) - 8).collect();
            let d = i4(&vals);
            let b = pack_sub_byte(&d).unwrap();
            assert_eq!(b.len(), (n as usize).div_ceil(2));
            assert_eq!(unpack_sub_byte(DType::I4, &b, n as usize).unwrap(), d);
            let d2 = Data::I2(vals.iter().map(|&x| Int2::wrapping(x as i128)).collect());
            let b2 = pack_sub_byte(&d2).unwrap();
            assert_eq!(b2.len(), (n as usize).div_ceil(4));
            assert_eq!(unpack_sub_byte(DType::I2, &b2, n as usize).unwrap(), d2);
        }
        let e = unpack_sub_byte(DType::U4, &[0, 0], 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 bytes") && e.contains("need 3"), "{e}");
        assert!(unpack_sub_byte(DType::I8, &[0], 1).is_err());
    }
}
