//! What a tensor becomes when quantized: the integer type, how scales are shared, symmetry.

use serde::Serialize;
use smelt_tensor::{bail, DType, Result};

/// Integer storage types smelt quantizes to. Sub-byte types are written packed by the ONNX
/// exporter; in memory every element takes one byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QType {
    U8,
    I8,
    /// int8 storage holding 7-bit codes ([-64, 63]): x86 int8 kernels without VNNI add
    /// pairs of u8 x i8 products in 16 bits, which saturate unless one side has 7 bits.
    I7,
    U4,
    I4,
    U2,
    I2,
}

impl QType {
    pub fn parse(s: &str) -> Result<QType> {
        Ok(match s {
            "uint8" | "u8" => QType::U8,
            "int8" | "i8" => QType::I8,
            "int7" | "i7" => QType::I7,
            "uint4" | "u4" => QType::U4,
            "int4" | "i4" => QType::I4,
            "uint2" | "u2" => QType::U2,
            "int2" | "i2" => QType::I2,
            _ => bail!(
                Input,
                "unknown quantized type '{s}' (expected int8, uint8, int7, int4, uint4, int2 or \
                 uint2)"
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            QType::U8 => "uint8",
            QType::I8 => "int8",
            QType::I7 => "int7",
            QType::U4 => "uint4",
            QType::I4 => "int4",
            QType::U2 => "uint2",
            QType::I2 => "int2",
        }
    }

    /// Bits each element takes in storage (int7 is stored as int8).
    pub fn bits(self) -> u32 {
        match self {
            QType::U8 | QType::I8 | QType::I7 => 8,
            QType::U4 | QType::I4 => 4,
            QType::U2 | QType::I2 => 2,
        }
    }

    pub fn signed(self) -> bool {
        matches!(self, QType::I8 | QType::I7 | QType::I4 | QType::I2)
    }

    /// Full storage range, e.g. [-128, 127].
    pub fn range(self) -> (i32, i32) {
        if self == QType::I7 {
            return (-64, 63);
        }
        let b = self.bits();
        if self.signed() {
            (-(1 << (b - 1)), (1 << (b - 1)) - 1)
        } else {
            (0, (1 << b) - 1)
        }
    }

    /// The range a symmetric scheme uses: signed types drop the lowest code so that +x and -x
    /// quantize to opposite codes (the convention onnxruntime and most backends use).
    pub fn symmetric_range(self) -> (i32, i32) {
        let (lo, hi) = self.range();
        if self.signed() {
            (lo + 1, hi)
        } else {
            (lo, hi)
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            QType::U8 => DType::U8,
            QType::I8 | QType::I7 => DType::I8,
            QType::U4 => DType::U4,
            QType::I4 => DType::I4,
            QType::U2 => DType::U2,
            QType::I2 => DType::I2,
        }
    }

    /// The ONNX opset that first allows this type in QuantizeLinear/DequantizeLinear.
    pub fn min_opset(self) -> i64 {
        match self {
            QType::U8 | QType::I8 | QType::I7 => 10,
            QType::U4 | QType::I4 => 21,
            QType::U2 | QType::I2 => 25,
        }
    }
}

/// How scales are shared across a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Granularity {
    PerTensor,
    /// One scale per slice along the output-channel axis (chosen per op by the caller).
    PerChannel,
    /// One scale per `size` consecutive elements along the reduction axis, per output channel.
    Block(usize),
}

impl Granularity {
    pub fn parse(s: &str, block: usize) -> Result<Granularity> {
        Ok(match s {
            "tensor" | "per-tensor" => Granularity::PerTensor,
            "channel" | "per-channel" => Granularity::PerChannel,
            "block" | "group" => {
                if block < 2 {
                    bail!(Input, "block size must be at least 2, got {block}");
                }
                Granularity::Block(block)
            }
            _ => bail!(
                Input,
                "unknown granularity '{s}' (expected tensor, channel or block)"
            ),
        })
    }
}

/// How to pick each group's clipping range for weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Clip {
    /// The group's min and max: no clipping.
    MinMax,
    /// Search a shrunk range minimising the group's squared reconstruction error.
    Mse,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct WeightScheme {
    pub qtype: QType,
    pub granularity: Granularity,
    pub symmetric: bool,
    pub clip: Clip,
}

impl WeightScheme {
    /// The scheme named on a command line or in a recipe: `weight_type` defaults to int8
    /// (int4 for weight-only), `granularity` to per-channel (blocks of `block_size` below 8
    /// bits); symmetric, min-max clipping.
    pub fn parse(
        weight_only: bool,
        weight_type: Option<&str>,
        granularity: Option<&str>,
        block_size: usize,
    ) -> Result<WeightScheme> {
        let qtype = QType::parse(weight_type.unwrap_or(if weight_only { "int4" } else { "int8" }))?;
        let gran = granularity.unwrap_or(if qtype.bits() < 8 { "block" } else { "channel" });
        Ok(WeightScheme {
            qtype,
            granularity: Granularity::parse(gran, block_size)?,
            ..WeightScheme::default()
        })
    }
}

impl Default for WeightScheme {
    fn default() -> Self {
        WeightScheme {
            qtype: QType::I8,
            granularity: Granularity::PerChannel,
            symmetric: true,
            clip: Clip::MinMax,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(QType::I8.range(), (-128, 127));
        assert_eq!(QType::I8.symmetric_range(), (-127, 127));
        assert_eq!(QType::U4.range(), (0, 15));
        assert_eq!(QType::I4.symmetric_range(), (-7, 7));
        assert_eq!(QType::I7.symmetric_range(), (-63, 63));
        assert_eq!(QType::I7.range(), (-64, 63));
        assert_eq!(QType::I2.range(), (-2, 1));
        assert!(QType::parse("int5").is_err());
        assert_eq!(
            Granularity::parse("block", 64).unwrap(),
            Granularity::Block(64)
        );
    }
}
