use crate::args::{load_model, print_json, refuse_overwrite};
use serde_json::json;
use smelt_ir::Pass;
use smelt_onnx::{ExternalData, SaveOptions};
use smelt_tensor::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The ONNX model to read.
    model: PathBuf,
    /// Where to write the model.
    #[arg(short, long)]
    output: PathBuf,
    /// Store tensors of at least --external-threshold bytes in this file, next to the output.
    #[arg(long)]
    external_data: Option<String>,
    #[arg(long, default_value_t = 1024)]
    external_threshold: usize,
    /// Let a model exported with batch 1 take any batch size (the dynamic-batch pass).
    #[arg(long)]
    dynamic_batch: bool,
    /// Fold weight-only quantization (integer weights cast and scaled, DequantizeLinear of
    /// constants) back into float weights: the fp32 baseline of a model shipped quantized.
    #[arg(long)]
    dequantize_weights: bool,
    /// Allow writing over the input file.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args, json: bool) -> Result<()> {
    refuse_overwrite(&a.model, &a.output, a.force)?;
    let mut model = load_model(&a.model)?;
    if a.dequantize_weights {
        let (m, rec) = smelt_quant::dequantize_weights(model)?;
        model = m;
        if !json {
            println!(
                "{}: {} constant nodes folded into float weights",
                rec.pass,
                rec.changes.len()
            );
        }
    }
    if a.dynamic_batch {
        let (m, rec) = smelt_ir::passes::DynamicBatch::default().run(model)?;
        model = m;
        if !json {
            for c in &rec.changes {
                println!("{}: {c}", rec.pass);
            }
        }
    }
    let opts = SaveOptions {
        external_data: a.external_data.as_ref().map(|f| ExternalData {
            file_name: f.clone(),
            size_threshold: a.external_threshold,
        }),
    };
    smelt_onnx::save_with(&model, &a.output, &opts)?;
    let bytes = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    if json {
        print_json(
            &json!({"output": a.output.display().to_string(), "file_bytes": bytes,
                           "nodes": model.graph.nodes.len()}),
        );
    } else {
        println!(
            "wrote {} ({} bytes, {} nodes)",
            a.output.display(),
            bytes,
            model.graph.nodes.len()
        );
    }
    Ok(())
}
