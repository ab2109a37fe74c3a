//! Writes the residual/depthwise test CNN (the one the pruning tests build) to an ONNX file,
//! for benchmarks: `cargo run --release --example residual_cnn -- OUT.onnx [BLOCKS] [SEED]`.

#[path = "../tests/common/nets.rs"]
mod nets;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(out) = args.get(1) else {
        eprintln!("usage: residual_cnn OUT.onnx [BLOCKS] [SEED]");
        std::process::exit(2);
    };
    let blocks = args.get(2).and_then(|b| b.parse().ok()).unwrap_or(2);
    let seed = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(7);
    if let Err(e) = smelt_onnx::save(&nets::residual_cnn(seed, blocks), std::path::Path::new(out)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
