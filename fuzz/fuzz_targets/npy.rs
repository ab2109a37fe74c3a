//! Any bytes as a .npy file (what `smelt run --input` reads).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smelt_tensor::set_max_elements(1 << 20);
    let path = std::env::temp_dir().join(format!("smelt-fuzz-{}.npy", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let _ = smelt_data::npy::read(&path);
});
