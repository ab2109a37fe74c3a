//! smelt's CPU engine. [`Session`] prepares a model (checks every op is known, orders the
//! nodes) and runs it, returning graph outputs and, on request, any intermediate value.
//!
//! Layout: `ops/` holds one file per op family (forward semantics as ONNX defines them),
//! `kernels/` the hot loops those ops call (GEMM, convolution), `passes` the graph passes that
//! need evaluation (constant folding).

pub mod analysis;
pub mod buffers;
pub mod grad;
pub mod kernels;
pub mod ops;
pub mod passes;
mod session;

pub use session::{for_each_run, Captured, Feed, Outputs, RunOptions, Session};
