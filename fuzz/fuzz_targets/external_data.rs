//! Fuzzed models loaded from a folder that holds a small data file, with a secret file next to
//! the folder and a symlink to it inside: external-data references must stay inside the folder
//! and within bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// 64 distinctive bytes: no run of 8 of them occurs by chance in what the folder holds.
fn secret() -> Vec<u8> {
    (0..64u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 ^ 0x5a)
        .collect()
}

fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("smelt-fuzz-ext-{}", std::process::id()));
        let dir = root.join("model");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("w.bin"), [7u8; 64]).unwrap();
        std::fs::write(root.join("secret.bin"), secret()).unwrap();
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
        let secret = secret();
        for (name, t) in &m.graph.initializers {
            let raw = smelt_onnx::tensor_to_proto(t, name)
                .raw_data
                .unwrap_or_default();
            // A run of the secret that the fuzzed file itself does not hold came from outside
            // (libFuzzer learns compared bytes, so the file may well hold some inline).
            let run = raw
                .windows(32)
                .find(|w| secret.windows(32).any(|s| s == *w));
            if let Some(run) = run {
                assert!(
                    data.windows(32).any(|d| d == run),
                    "initializer '{name}' holds the secret from outside the folder"
                );
            }
        }
    }
});
