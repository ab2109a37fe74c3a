//! Any bytes as a training checkpoint's state (safetensors with JSON metadata), next to a valid
//! model, as `smelt finetune --resume` reads it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("smelt-fuzz-ckpt-{}/epoch-1", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The models of a real checkpoint (scripts/fuzz.sh makes one), so that fuzzed states
        // get past the model loading and meet the checks that tie them to its weights.
        let src = PathBuf::from(
            std::env::var("SMELT_FUZZ_CHECKPOINT")
                .expect("set SMELT_FUZZ_CHECKPOINT (scripts/fuzz.sh)"),
        );
        for f in ["model.onnx", "best.onnx", "masks.safetensors"] {
            if src.join(f).exists() {
                std::fs::copy(src.join(f), dir.join(f)).unwrap();
            }
        }
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = folder();
    std::fs::write(dir.join("state.safetensors"), data).unwrap();
    let _ = smelt_train::checkpoint::Checkpoint::load(dir);
});
