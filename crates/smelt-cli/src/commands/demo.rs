//! `smelt demo`: the default recipe on a model and data bundled into the binary, offline.
//! The bundle (crates/smelt-cli/demo/, licences in its README) is MNIST-8 and the first
//! 1,000 MNIST training and test images.

use super::compress::{compress, Ablation, How, Run};
use smelt_compress::pipeline::Data;
use smelt_compress::Recipe;
use smelt_data::{load_idx_dir, Preprocess, Split};
use smelt_tensor::{bail, Result};
use smelt_train::Samples;
use std::path::PathBuf;

const MODEL: &[u8] = include_bytes!("../../demo/mnist-8.onnx");
const FILES: [(&str, &[u8]); 4] = [
    (
        "train-images-idx3-ubyte",
        include_bytes!("../../demo/train-images-idx3-ubyte"),
    ),
    (
        "train-labels-idx1-ubyte",
        include_bytes!("../../demo/train-labels-idx1-ubyte"),
    ),
    (
        "t10k-images-idx3-ubyte",
        include_bytes!("../../demo/t10k-images-idx3-ubyte"),
    ),
    (
        "t10k-labels-idx1-ubyte",
        include_bytes!("../../demo/t10k-labels-idx1-ubyte"),
    ),
];
const RECIPE: &str = include_str!("../../../../recipes/prune50-int8.toml");

#[derive(clap::Args)]
pub struct Args {
    /// Folder for the compressed model, its masks and the report.
    #[arg(long, default_value = "smelt-demo")]
    out: PathBuf,
    /// Timed runs of each model, side by side, at batch 1 and 32.
    #[arg(long, default_value_t = 20)]
    bench_runs: usize,
}

pub fn run(a: Args, json: bool) -> Result<()> {
    let recipe = Recipe::parse(RECIPE)?;
    let model = smelt_onnx::decode(MODEL, None, &Default::default())?;
    let data_dir = a.out.join("data");
    std::fs::create_dir_all(&data_dir).map_err(|e| {
        smelt_tensor::Error::Input(format!("cannot create {}: {e}", data_dir.display()))
    })?;
    for (name, bytes) in FILES {
        smelt_onnx::write_atomic(&data_dir.join(name), bytes)?;
    }
    let pre = Preprocess::default();
    let train = load_idx_dir(&data_dir, Split::Train, None, &pre)?;
    let test = load_idx_dir(&data_dir, Split::Test, None, &pre)?;
    let (Some(ty), Some(vy)) = (&train.y, &test.y) else {
        bail!(Invalid, "the bundled data lost its labels");
    };
    if !json {
        println!(
            "smelt demo: MNIST-8 (bundled) with {} training and {} test images, recipe {}:\n  {}\n",
            ty.len(),
            vy.len(),
            recipe.name,
            recipe.description.clone()
        );
    }
    let data = Data {
        train: Samples { x: &train.x, y: ty },
        val: Some(Samples { x: &test.x, y: vy }),
    };
    compress(
        model,
        How::Recipe(recipe),
        Some(&data),
        &Run {
            name: "MNIST-8 (bundled demo)",
            output: &a.out.join("mnist-8-compressed.onnx"),
            report_dir: Some(&a.out.join("report")),
            seed: 0,
            bench_runs: a.bench_runs,
            ort_python: None,
            ablation: Some(Ablation::Greedy),
        },
        json,
    )
}
