//! Any bytes as MNIST idx files: the first two bytes say where the images file ends and the
//! labels file begins.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smelt_tensor::set_max_elements(1 << 20);
    let dir = std::env::temp_dir().join(format!("smelt-fuzz-idx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if data.len() < 2 {
        return;
    }
    let (head, rest) = data.split_at(2);
    let at = usize::from(u16::from_le_bytes([head[0], head[1]])).min(rest.len());
    let (images, labels) = rest.split_at(at);
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), images).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), labels).unwrap();
    let pre = smelt_data::Preprocess::default();
    let _ = smelt_data::load_idx_dir(&dir, smelt_data::Split::Test, Some(100), &pre);
});
