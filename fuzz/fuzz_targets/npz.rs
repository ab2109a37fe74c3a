//! Any bytes as an .npz dataset, with and without preprocessing.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smelt_tensor::set_max_elements(1 << 20);
    let path = std::env::temp_dir().join(format!("smelt-fuzz-{}.npz", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let pre = smelt_data::Preprocess {
        layout: smelt_data::Layout::Nhwc,
        mean: vec![0.5, 0.25, 0.1],
        std: vec![2.0],
        ..Default::default()
    };
    let _ = smelt_data::load_npz(&path, Some(64), &Default::default());
    let _ = smelt_data::load_npz(&path, None, &pre);
});
