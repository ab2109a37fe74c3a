//! Hot loops behind the ops. Each kernel has a narrow, slice-based interface.

pub mod conv;
pub mod gemm;
pub mod pool;
pub mod quant;
