//! Tensor data for smelt: a dense, row-major, owned n-d array of one of the ONNX element types,
//! plus the shared error type and broadcasting helpers every other layer uses.
//!
//! Storage is a typed `Vec` per dtype (not raw bytes) so kernels get slices without casts, and
//! so a file's byte order never leaks past the importer.

mod broadcast;
mod dtype;
mod error;
pub mod interrupt;
mod subbyte;
mod tensor;

pub use broadcast::{broadcast_shapes, broadcast_strides, strides_of, BroadcastIter};
pub use dtype::DType;
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use subbyte::{pack_sub_byte, unpack_sub_byte, Int2, Int4, SubByte, Uint2, Uint4};
pub use tensor::{Data, Element, Tensor};

/// The largest element count smelt will allocate for a single tensor unless told otherwise.
/// Sizes read from files are checked against this before any allocation.
pub const DEFAULT_MAX_ELEMENTS: usize = 1 << 32;

/// Checks a shape's element count against `max` without overflowing.
pub fn checked_numel(shape: &[usize], max: usize) -> Result<usize> {
    let mut n: usize = 1;
    for &d in shape {
        n = n
            .checked_mul(d)
            .ok_or_else(|| Error::Limit(format!("shape {shape:?} overflows the element count")))?;
    }
    if n > max {
        return Err(Error::Limit(format!(
            "shape {shape:?} has {n} elements, more than the limit of {max}"
        )));
    }
    Ok(n)
}
