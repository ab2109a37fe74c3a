use crate::args::{load_model, print_json};
use serde_json::json;
use smelt_engine::analysis::{infer_shapes, model_stats, InputSpec};
use smelt_tensor::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The ONNX model.
    model: PathBuf,
    /// Sequence length used for symbolic non-batch input dimensions when measuring FLOPs.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// List every node's MACs and parameters.
    #[arg(long)]
    layers: bool,
}

pub fn run(a: Args, json: bool) -> Result<()> {
    let file_bytes = std::fs::metadata(&a.model).map(|m| m.len()).unwrap_or(0);
    let model = load_model(&a.model)?;
    let opset = model.onnx_opset();
    // Statistics describe the file as written; the session folds constants for speed.
    let original = model.clone();
    let s = smelt_engine::Session::reference(model)?;
    let spec = InputSpec {
        batch: 1,
        seq_len: a.seq_len,
        seed: 0,
    };
    let shapes = infer_shapes(&s, &spec)?;
    let st = model_stats(&original, &shapes);
    let g = &original.graph;
    let io = |vs: &[smelt_ir::ValueInfo]| -> Vec<serde_json::Value> {
        vs.iter()
            .map(|v| {
                json!({
                    "name": v.name,
                    "dtype": v.dtype.map(|d| d.name()),
                    "shape": v.shape.as_ref().map(|s| s.iter().map(|d| match d {
                        smelt_ir::Dim::Fixed(n) => json!(n),
                        smelt_ir::Dim::Sym(s) => json!(s),
                        smelt_ir::Dim::Unknown => json!(null),
                    }).collect::<Vec<_>>()),
                })
            })
            .collect()
    };
    let inputs: Vec<smelt_ir::ValueInfo> = g.runtime_inputs().cloned().collect();
    if json {
        let layers: Vec<serde_json::Value> = st
            .nodes
            .iter()
            .filter(|n| n.macs > 0 || n.params > 0)
            .map(|n| {
                json!({"name": n.name, "op_type": n.op_type, "macs": n.macs, "flops": 2 * n.macs,
                       "params": n.params, "sparsity": n.sparsity})
            })
            .collect();
        print_json(&json!({
            "model": a.model.display().to_string(),
            "opset": opset,
            "file_bytes": file_bytes,
            "params": st.params,
            "weight_bytes": st.weight_bytes,
            "flops": st.flops,
            "sparsity": st.sparsity(),
            "nodes": g.nodes.len(),
            "ops": st.ops,
            "inputs": io(&inputs),
            "outputs": io(&g.outputs),
            "layers": layers,
        }));
        return Ok(());
    }
    println!("model      {}", a.model.display());
    println!("opset      {opset}");
    println!("file       {} bytes", file_bytes);
    println!(
        "params     {} ({} bytes of weights)",
        st.params, st.weight_bytes
    );
    println!(
        "flops      {} per sample ({:.3} MFLOPs)",
        st.flops,
        st.flops as f64 / 1e6
    );
    println!("sparsity   {:.2}%", 100.0 * st.sparsity());
    println!("nodes      {}", g.nodes.len());
    let ops: Vec<String> = st.ops.iter().map(|(k, v)| format!("{k} x{v}")).collect();
    println!("ops        {}", ops.join(", "));
    for v in &inputs {
        println!("input      {} {}", v.name, describe(v));
    }
    for v in &g.outputs {
        println!("output     {} {}", v.name, describe(v));
    }
    if a.layers {
        println!(
            "\n{:<40} {:<14} {:>14} {:>10} {:>9}",
            "node", "op", "MACs", "params", "sparsity"
        );
        for n in st.nodes.iter().filter(|n| n.macs > 0 || n.params > 0) {
            println!(
                "{:<40} {:<14} {:>14} {:>10} {:>8.2}%",
                n.name,
                n.op_type,
                n.macs,
                n.params,
                100.0 * n.sparsity
            );
        }
    }
    Ok(())
}

/// "float32 [batch, 1, 28, 28]" for a declared value.
fn describe(v: &smelt_ir::ValueInfo) -> String {
    let dt = v.dtype.map_or("?", |d| d.name());
    let Some(shape) = &v.shape else {
        return format!("{dt} (rank unknown)");
    };
    let dims: Vec<String> = shape
        .iter()
        .map(|d| match d {
            smelt_ir::Dim::Fixed(n) => n.to_string(),
            smelt_ir::Dim::Sym(s) => s.clone(),
            smelt_ir::Dim::Unknown => "?".into(),
        })
        .collect();
    format!("{dt} [{}]", dims.join(", "))
}
