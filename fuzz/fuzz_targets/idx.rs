//! Any bytes as MNIST idx files: the first half as images, the rest as labels.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smelt_tensor::set_max_elements(1 << 20);
    let dir = std::env::temp_dir().join(format!("smelt-fuzz-idx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (images, labels) = data.split_at(data.len() / 2);
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), images).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), labels).unwrap();
    let pre = smelt_data::Preprocess::default();
    let _ = smelt_data::load_idx_dir(&dir, smelt_data::Split::Test, Some(100), &pre);
});
