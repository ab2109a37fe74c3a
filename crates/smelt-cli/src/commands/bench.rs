use crate::args::{load_model, print_json, session};
use serde_json::json;
use smelt_engine::analysis::{synth_inputs, InputSpec};
use smelt_tensor::{Result, Tensor};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The ONNX model to time.
    model: PathBuf,
    /// Batch size of the synthesized inputs.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Length used for symbolic non-batch input dimensions (e.g. sequence length).
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Untimed runs before measuring.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Also report time per op type (measured in separate runs after the timed ones).
    #[arg(long)]
    profile: bool,
    /// Also time this model (the original a compressed MODEL came from), in alternation with
    /// MODEL on inputs of the same shapes, and report MODEL's speed-up over it.
    #[arg(long, value_name = "BASELINE")]
    compare: Option<PathBuf>,
}

/// Median of the run times in milliseconds, timing `a` and `b` in turns so that machine noise
/// hits both alike.
fn alternate(
    runs: usize,
    mut a: impl FnMut() -> Result<()>,
    mut b: impl FnMut() -> Result<()>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut ta, mut tb) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        let t = Instant::now();
        a()?;
        ta.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        b()?;
        tb.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ta.sort_by(|x, y| x.total_cmp(y));
    tb.sort_by(|x, y| x.total_cmp(y));
    Ok((ta, tb))
}

pub fn run(a: Args, json: bool) -> Result<()> {
    let s = session(load_model(&a.model)?)?;
    let spec = InputSpec {
        batch: a.batch,
        seq_len: a.seq_len,
        seed: 0,
    };
    let inputs = synth_inputs(s.graph(), &spec);
    let feed: Vec<(&str, Tensor)> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let base = match &a.compare {
        Some(p) => {
            let b = session(load_model(p)?)?;
            let inputs = synth_inputs(b.graph(), &spec);
            Some((b, inputs))
        }
        None => None,
    };
    let base_feed: Vec<(&str, Tensor)> = base
        .iter()
        .flat_map(|(_, i)| i.iter().map(|(n, t)| (n.as_str(), t.clone())))
        .collect();
    for _ in 0..a.warmup {
        s.run(&feed)?;
        if let Some((b, _)) = &base {
            b.run(&base_feed)?;
        }
    }
    let runs = a.runs.max(1);
    let (ms, base_ms) = match &base {
        Some((b, _)) => {
            let (x, y) = alternate(
                runs,
                || s.run(&feed).map(drop),
                || b.run(&base_feed).map(drop),
            )?;
            (x, Some(y))
        }
        None => (
            alternate(runs, || s.run(&feed).map(drop), || Ok(()))?.0,
            None,
        ),
    };
    let profile = if a.profile {
        let opts = smelt_engine::RunOptions {
            profile: true,
            ..Default::default()
        };
        for _ in 0..a.runs.max(1) {
            s.run_with(&feed, &opts)?;
        }
        s.take_profile()
    } else {
        Vec::new()
    };
    let per_run = a.runs.max(1) as f64;
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    let rss = peak_rss_bytes();
    let threads = rayon::current_num_threads();
    let base_median = base_ms
        .as_ref()
        .map(|v| v[((v.len() - 1) as f64 * 0.5).round() as usize]);
    let speedup = base_median.map(|b| b / pct(0.5));
    if json {
        print_json(&json!({
            "model": a.model.display().to_string(),
            "batch": a.batch, "threads": threads, "runs": ms.len(),
            "median_ms": pct(0.5), "p10_ms": pct(0.1), "p90_ms": pct(0.9),
            "integer_layers": s.integer_layers(),
            "baseline": a.compare.as_ref().map(|p| p.display().to_string()),
            "baseline_median_ms": base_median, "speedup": speedup,
            "peak_rss_bytes": rss,
            "profile": profile.iter().map(|(op, t, n)| json!({"op_type": op, "ms_per_run": t * 1e3 / per_run, "calls_per_run": *n as f64 / per_run})).collect::<Vec<_>>(),
        }));
    } else {
        println!("model      {}", a.model.display());
        println!("batch {}  threads {}  runs {}", a.batch, threads, ms.len());
        println!(
            "median     {:.3} ms   (p10 {:.3}, p90 {:.3})",
            pct(0.5),
            pct(0.1),
            pct(0.9)
        );
        let int = s.integer_layers();
        if int > 0 {
            println!(
                "integer    {int} layers on int8 kernels ({})",
                smelt_engine::kernels::quant::int8_kernel_name()
            );
        }
        if let (Some(p), Some(b), Some(x)) = (&a.compare, base_median, speedup) {
            println!("baseline   {:.3} ms   ({})", b, p.display());
            println!("speed-up   {x:.2}x  (baseline median / model median, timed in turns)");
        }
        if let Some(r) = rss {
            println!("peak RSS   {:.1} MiB", r as f64 / (1024.0 * 1024.0));
        }
        for (op, t, n) in &profile {
            println!(
                "  {op:<24} {:>9.3} ms/run  ({} calls/run)",
                t * 1e3 / per_run,
                *n as f64 / per_run
            );
        }
    }
    Ok(())
}

/// High-water mark of resident memory for this process (Linux: VmHWM in /proc/self/status).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
