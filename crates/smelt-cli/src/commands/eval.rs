use crate::args::{load_model, print_json, session, DataArgs};
use serde_json::json;
use smelt_data::{mean_pool, FidelityAccumulator};
use smelt_tensor::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The ONNX model to evaluate.
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Compare against this model on the same inputs (agreement, cosine, max_abs_diff).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Samples per run.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Compare sentence embeddings: average the first output over tokens (weighted by the
    /// attention mask) before measuring fidelity.
    #[arg(long, value_parser = ["none", "mean"], default_value = "none")]
    pool: String,
}

pub fn run(a: Args, json: bool) -> Result<()> {
    let model = load_model(&a.model)?;
    let batches = a.data.load(&model, a.batch)?;
    let s = session(model)?;
    let reference = match &a.reference {
        Some(p) => Some(session(load_model(p)?)?),
        None => None,
    };
    if batches.labels.is_none() && reference.is_none() {
        bail!(
            Input,
            "the data has no labels: give --reference ORIGINAL.onnx to measure fidelity instead"
        );
    }
    let started = std::time::Instant::now();
    let mut correct = 0usize;
    let mut labelled = 0usize;
    let mut fid = FidelityAccumulator::new();
    for (i, feed) in batches.feeds.iter().enumerate() {
        let outs = s.run_feed(feed)?;
        let Some((_, out)) = outs.first() else {
            bail!(Invalid, "the model has no outputs");
        };
        if let Some(labels) = &batches.labels {
            let pred = smelt_data::top1(out)?;
            let y = &labels[i];
            smelt_data::check_labels(y, out.shape()[1], labelled)?;
            correct += pred
                .iter()
                .zip(y)
                .filter(|(p, l)| **p as i64 == **l)
                .count();
            labelled += y.len();
        }
        if let Some(r) = &reference {
            let routs = r.run_feed(feed)?;
            if a.pool == "mean" {
                let mask = feed
                    .iter()
                    .find(|(n, _)| n == "attention_mask")
                    .map(|(_, t)| t);
                fid.add(&mean_pool(&routs[0].1, mask)?, &mean_pool(out, mask)?)?;
            } else {
                fid.add(&routs[0].1, out)?;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let accuracy = (labelled > 0).then(|| correct as f64 / labelled as f64);
    let fidelity = match reference {
        Some(_) => Some(fid.finish()?),
        None => None,
    };
    if json {
        let mut v = json!({
            "model": a.model.display().to_string(),
            "samples": batches.samples,
            "seconds": seconds,
        });
        if let Some(acc) = accuracy {
            v["accuracy"] = json!(acc);
        }
        if let Some(f) = fidelity {
            v["reference"] = json!(a.reference.as_ref().map(|p| p.display().to_string()));
            v["agreement"] = json!(f.agreement);
            v["cosine"] = json!(f.cosine);
            v["max_abs_diff"] = json!(f.max_abs_diff);
        }
        print_json(&v);
        return Ok(());
    }
    println!("model      {}", a.model.display());
    println!("samples    {}", batches.samples);
    if let Some(acc) = accuracy {
        println!("accuracy   {acc:.4} ({correct}/{labelled})");
    }
    if let Some(f) = fidelity {
        if let Some(ag) = f.agreement {
            println!("agreement  {ag:.4}  (top-1 vs reference)");
        }
        println!("cosine     {:.6}", f.cosine);
        println!("max |diff| {:.3e}", f.max_abs_diff);
    }
    println!("time       {seconds:.2} s");
    Ok(())
}
