//! Any text as a compression recipe (TOML): parsed and checked, or refused with a message.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = smelt_compress::Recipe::parse(text);
    }
});
