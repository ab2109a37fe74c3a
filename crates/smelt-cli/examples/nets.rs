//! Writes one of the test suite's models (built in code) to an ONNX file:
//! `cargo run --release --example nets -- residual OUT.onnx [BLOCKS] [SEED]` (the
//! residual/depthwise CNN the pruning tests and benchmarks use) or
//! `... -- mnist OUT.onnx [SEED]` (a randomly initialised MNIST CNN to train from scratch
//! with `smelt finetune`).

#[path = "../tests/common/nets.rs"]
mod nets;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: u64| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(default);
    let model = match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("residual"), Some(_)) => nets::residual_cnn(arg(4, 7), arg(3, 2) as usize),
        (Some("mnist"), Some(_)) => nets::mnist_cnn(arg(3, 0)),
        _ => {
            eprintln!("usage: nets residual OUT.onnx [BLOCKS] [SEED] | nets mnist OUT.onnx [SEED]");
            std::process::exit(2);
        }
    };
    if let Err(e) = smelt_onnx::save(&model, std::path::Path::new(&args[2])) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
