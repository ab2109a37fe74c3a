//! Matrix multiplication through rten-gemm (packed, SIMD, multi-threaded with rayon).
