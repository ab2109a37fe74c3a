//! Any bytes as a pruning-masks file (safetensors), as `smelt finetune --masks` reads it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = smelt_prune::mask::Masks::from_safetensors(data);
});
