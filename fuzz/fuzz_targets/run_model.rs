//! Fuzzed models that load are built into a session and run on small inputs: every op must
//! fail cleanly on shapes, attributes and values it cannot take, never panic or run away.
#![no_main]
use libfuzzer_sys::fuzz_target;
use smelt_ir::Dim;
use smelt_tensor::{DType, Tensor};

fuzz_target!(|data: &[u8]| {
    smelt_tensor::set_max_elements(1 << 16);
    let opts = smelt_onnx::LoadOptions {
        max_tensor_elements: 1 << 16,
        max_file_bytes: 1 << 20,
    };
    let Ok(model) = smelt_onnx::decode(data, None, &opts) else {
        return;
    };
    let mut feed = Vec::new();
    for v in model.graph.runtime_inputs() {
        let shape: Vec<usize> = match &v.shape {
            Some(dims) => dims
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n,
                    _ => 2,
                })
                .collect(),
            None => vec![2],
        };
        if shape.len() > 6 {
            return;
        }
        let Ok(n) = smelt_tensor::checked_numel(&shape, 4096) else {
            return;
        };
        let dtype = v.dtype.unwrap_or(DType::F32);
        let t = match dtype {
            DType::F32 => Tensor::from_vec(shape, (0..n).map(|i| i as f32 * 0.25 - 1.0).collect()),
            DType::I64 => Tensor::from_vec(shape, (0..n).map(|i| (i % 3) as i64).collect()),
            DType::I32 => Tensor::from_vec(shape, (0..n).map(|i| (i % 3) as i32).collect()),
            DType::U8 => Tensor::from_vec(shape, (0..n).map(|i| i as u8).collect()),
            DType::Bool => Tensor::from_vec(shape, (0..n).map(|i| i % 2 == 0).collect()),
            _ => return,
        };
        let Ok(t) = t else { return };
        feed.push((v.name.clone(), t));
    }
    let Ok(session) = smelt_engine::Session::new(model) else {
        return;
    };
    let inputs: Vec<(&str, Tensor)> = feed.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let _ = session.run(&inputs);
});
