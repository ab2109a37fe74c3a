//! Any bytes as a text corpus, read line by line and tokenized with MiniLM's tokenizer
//! (from $SMELT_ASSETS, which scripts/fetch-assets.sh prints).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn tokenizer() -> &'static PathBuf {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let assets =
            std::env::var("SMELT_ASSETS").expect("set SMELT_ASSETS (scripts/fetch-assets.sh)");
        let p = PathBuf::from(assets).join("minilm/tokenizer.json");
        assert!(p.exists(), "{} is missing", p.display());
        p
    })
}

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("smelt-fuzz-{}.txt", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok(lines) = smelt_data::read_text_lines(&[path], Some(16)) {
        let _ = smelt_data::tokenize(tokenizer(), &lines, 32, None);
    }
});
