//! Any bytes as an ONNX model: decoding must return Ok or a clean error, within small limits.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = smelt_onnx::LoadOptions {
        max_tensor_elements: 1 << 16,
        max_file_bytes: 1 << 20,
    };
    if let Ok(m) = smelt_onnx::decode(data, None, &opts) {
        // What loads must also write back.
        let _ = smelt_onnx::encode(&m);
    }
});
