//! Fuzzed models loaded from a folder that holds a small data file, a sibling folder with a
//! secret and a symlink out: external-data references must stay inside and within bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("smelt-fuzz-ext-{}", std::process::id()));
        let dir = root.join("model");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("w.bin"), [7u8; 64]).unwrap();
        std::fs::write(root.join("secret.bin"), [1u8; 64]).unwrap();
        #[cfg(unix)]
        let _ = std::os::unix::fs::symlink(root.join("secret.bin"), dir.join("link.bin"));
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let opts = smelt_onnx::LoadOptions {
        max_tensor_elements: 1 << 16,
        max_file_bytes: 1 << 20,
    };
    if let Ok(m) = smelt_onnx::decode(data, Some(folder()), &opts) {
        for t in m.graph.initializers.values() {
            // Nothing from outside the folder: the secret's bytes are all 1.
            if let Ok(b) = t.as_slice::<u8>() {
                assert!(b.len() < 16 || b.iter().any(|&x| x != 1), "read the secret");
            }
        }
    }
});
