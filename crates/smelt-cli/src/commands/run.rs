use crate::args::{load_model, print_json, session};
use serde_json::json;
use smelt_data::npy;
use smelt_engine::analysis::{synth_inputs, InputSpec};
use smelt_engine::RunOptions;
use smelt_tensor::{bail, Result, Tensor};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The ONNX model to run.
    model: PathBuf,
    /// An input as NAME=FILE.npy (or FILE.pb, an ONNX TensorProto); repeat for each input.
    /// Inputs not given are synthesized from their declared types.
    #[arg(long = "input", value_name = "NAME=FILE")]
    inputs: Vec<String>,
    /// Also return these intermediate values.
    #[arg(long = "capture", value_name = "VALUE")]
    capture: Vec<String>,
    /// Write every output (and captured value) as NAME.npy into this folder.
    #[arg(long)]
    output_dir: Option<PathBuf>,
}

pub fn run(a: Args, json: bool) -> Result<()> {
    let model = load_model(&a.model)?;
    // A value asked for by name must exist: fused QDQ patterns drop their intermediate values.
    let s = if a.capture.is_empty() {
        session(model)?
    } else {
        smelt_engine::Session::reference(model)?
    };
    let mut given: Vec<(String, Tensor)> = Vec::new();
    for spec in &a.inputs {
        let Some((name, file)) = spec.split_once('=') else {
            bail!(Input, "--input must be NAME=FILE, got '{spec}'");
        };
        let path = PathBuf::from(file);
        let t = if path.extension().is_some_and(|e| e == "pb") {
            smelt_onnx::load_tensor(&path)?
        } else {
            npy::read(&path)?
        };
        given.push((name.to_string(), t));
    }
    for (n, t) in synth_inputs(s.graph(), &InputSpec::default()) {
        if !given.iter().any(|(g, _)| *g == n) {
            given.push((n, t));
        }
    }
    let feed: Vec<(&str, Tensor)> = given.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let (outs, captured) = s.run_with(
        &feed,
        &RunOptions {
            capture: a.capture.clone(),
            ..Default::default()
        },
    )?;
    let mut all: Vec<(String, Tensor)> = outs;
    for c in &a.capture {
        if let Some(t) = captured.get(c) {
            all.push((c.clone(), t.clone()));
        }
    }
    if let Some(dir) = &a.output_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| smelt_tensor::Error::io(format!("creating {}", dir.display()), e))?;
        for (n, t) in &all {
            npy::write(&dir.join(format!("{}.npy", sanitize(n))), t)?;
        }
    }
    if json {
        let v: Vec<serde_json::Value> = all
            .iter()
            .map(|(n, t)| {
                let vals = t.to_f64_vec().unwrap_or_default();
                json!({"name": n, "dtype": t.dtype().name(), "shape": t.shape(),
                       "values": if vals.len() <= 1000 { json!(vals) } else { json!(null) }})
            })
            .collect();
        print_json(&json!({"outputs": v}));
    } else {
        for (n, t) in &all {
            let vals = t.to_f64_vec().unwrap_or_default();
            let head: Vec<String> = vals.iter().take(10).map(|v| format!("{v:.6}")).collect();
            let more = if vals.len() > 10 { ", ..." } else { "" };
            println!(
                "{n} {} {:?}: [{}{more}]",
                t.dtype(),
                t.shape(),
                head.join(", ")
            );
        }
    }
    Ok(())
}

/// Value names may contain '/' or ':'; file names may not.
fn sanitize(n: &str) -> String {
    n.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
