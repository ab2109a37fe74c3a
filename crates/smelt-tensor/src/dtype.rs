use std::fmt;

/// Element types. The discriminants are ONNX's `TensorProto.DataType` codes, which the
/// importer and exporter translate through `from_onnx` / `onnx_code`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    U8,
    I8,
    U16,
    I16,
    I32,
    I64,
    Str,
    Bool,
    F16,
    F64,
    U32,
    U64,
    BF16,
    /// 4-bit signed integer in [-8, 7]; held one per byte in memory, packed two per byte in files.
    I4,
    /// 4-bit unsigned integer in [0, 15].
    U4,
    /// 2-bit signed integer in [-2, 1]; packed four per byte in files.
    I2,
    /// 2-bit unsigned integer in [0, 3].
    U2,
}

impl DType {
    pub fn from_onnx(code: i32) -> Option<DType> {
        Some(match code {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            4 => DType::U16,
            5 => DType::I16,
            6 => DType::I32,
            7 => DType::I64,
            8 => DType::Str,
            9 => DType::Bool,
            10 => DType::F16,
            11 => DType::F64,
            12 => DType::U32,
            13 => DType::U64,
            16 => DType::BF16,
            21 => DType::U4,
            22 => DType::I4,
            25 => DType::U2,
            26 => DType::I2,
            _ => return None,
        })
    }

    pub fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::U16 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::Str => 8,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::U32 => 12,
            DType::U64 => 13,
            DType::BF16 => 16,
            DType::U4 => 21,
            DType::I4 => 22,
            DType::U2 => 25,
            DType::I2 => 26,
        }
    }

    /// Bytes per element in memory, which is also the raw_data size for byte-aligned types
    /// (strings have no fixed size: 0). Sub-byte types report 1 (they are held unpacked); use
    /// [`DType::packed_bytes`] for the size of their data in a file.
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 | DType::Bool => 1,
            DType::I4 | DType::U4 | DType::I2 | DType::U2 => 1,
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::Str => 0,
        }
    }

    /// Bits per element as stored in a file (0 for strings).
    pub fn bits(self) -> usize {
        match self {
            DType::I4 | DType::U4 => 4,
            DType::I2 | DType::U2 => 2,
            d => d.size() * 8,
        }
    }

    /// Whether elements are narrower than a byte (packed in files, unpacked in memory).
    pub fn is_sub_byte(self) -> bool {
        matches!(self, DType::I4 | DType::U4 | DType::I2 | DType::U2)
    }

    /// Bytes that `n` elements occupy in ONNX raw_data or external data: sub-byte types are
    /// packed with the last byte padded. `None` on overflow. Strings have no fixed size (0).
    pub fn packed_bytes(self, n: usize) -> Option<usize> {
        if self.is_sub_byte() {
            Some(n.div_ceil(8 / self.bits()))
        } else {
            n.checked_mul(self.size())
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    pub fn is_int(self) -> bool {
        matches!(
            self,
            DType::U8
                | DType::I8
                | DType::U16
                | DType::I16
                | DType::I32
                | DType::I64
                | DType::U32
                | DType::U64
                | DType::I4
                | DType::U4
                | DType::I2
                | DType::U2
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::U16 => "uint16",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::Str => "string",
            DType::Bool => "bool",
            DType::F16 => "float16",
            DType::F64 => "float64",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::BF16 => "bfloat16",
            DType::I4 => "int4",
            DType::U4 => "uint4",
            DType::I2 => "int2",
            DType::U2 => "uint2",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        [
            DType::F32,
            DType::U8,
            DType::I8,
            DType::U16,
            DType::I16,
            DType::I32,
            DType::I64,
            DType::Str,
            DType::Bool,
            DType::F16,
            DType::F64,
            DType::U32,
            DType::U64,
            DType::BF16,
            DType::I4,
            DType::U4,
            DType::I2,
            DType::U2,
        ]
        .into_iter()
        .find(|d| d.name() == s)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_byte_codes_names_and_packed_sizes() {
        for (code, dt, name) in [
            (21, DType::U4, "uint4"),
            (22, DType::I4, "int4"),
            (25, DType::U2, "uint2"),
            (26, DType::I2, "int2"),
        ] {
            assert_eq!(DType::from_onnx(code), Some(dt));
            assert_eq!(dt.onnx_code(), code);
            assert_eq!(DType::parse(name), Some(dt));
            assert!(dt.is_int() && dt.is_sub_byte() && !dt.is_float());
        }
        assert_eq!(DType::I4.packed_bytes(5), Some(3));
        assert_eq!(DType::U4.packed_bytes(4), Some(2));
        assert_eq!(DType::I2.packed_bytes(5), Some(2));
        assert_eq!(DType::U2.packed_bytes(0), Some(0));
        assert_eq!(DType::F32.packed_bytes(3), Some(12));
        assert_eq!(DType::F64.packed_bytes(usize::MAX), None);
        assert_eq!(DType::I4.bits(), 4);
        assert_eq!(DType::I16.bits(), 16);
        assert!(!DType::I8.is_sub_byte());
        for code in [17, 23, 24] {
            assert_eq!(DType::from_onnx(code), None);
        }
    }
}
