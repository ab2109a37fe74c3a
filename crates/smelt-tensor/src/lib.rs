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

static MAX_ELEMENTS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_ELEMENTS);

/// The process-wide cap on one tensor's element count: sizes read from files and tensors the
/// engine is about to create are checked against it (the CLI's `--max-tensor-elements`).
pub fn max_elements() -> usize {
    MAX_ELEMENTS.load(std::sync::atomic::Ordering::Relaxed)
}

pub fn set_max_elements(n: usize) {
    MAX_ELEMENTS.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// Largest model file read by default: protobuf itself cannot exceed 2 GiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1 << 31;

static MAX_FILE_BYTES: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_MAX_FILE_BYTES);

/// The process-wide cap on a model file's size (the CLI's `--max-model-bytes`).
pub fn max_file_bytes() -> u64 {
    MAX_FILE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

pub fn set_max_file_bytes(n: u64) {
    MAX_FILE_BYTES.store(n, std::sync::atomic::Ordering::Relaxed);
}

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
