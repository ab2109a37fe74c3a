//! `smelt`: the command-line face of the library. Parses flags, calls the library crates,
//! prints a summary (or one JSON object with `--json`). No model logic lives here.

mod args;
mod commands;
mod memcap;
mod ort;
mod progress;

#[global_allocator]
static ALLOC: memcap::Capped = memcap::Capped;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "smelt",
    version,
    about = "Make neural networks smaller and faster, and prove it",
    propagate_version = true
)]
struct Cli {
    /// Worker threads for the engine (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Print one JSON object on stdout instead of the human summary.
    #[arg(long, global = true)]
    json: bool,
    /// Refuse any tensor (read from a file or computed) with more elements than this.
    #[arg(long, global = true, default_value_t = smelt_tensor::DEFAULT_MAX_ELEMENTS)]
    max_tensor_elements: usize,
    /// Refuse model files larger than this many bytes (external data is bounded per tensor).
    #[arg(long, global = true, default_value_t = smelt_tensor::DEFAULT_MAX_FILE_BYTES)]
    max_model_bytes: u64,
    /// Stop with an error before the heap passes this size: a number of bytes, or with a
    /// K, M or G suffix (default: no cap).
    #[arg(long, global = true, value_parser = parse_bytes)]
    max_memory: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compress a bundled model (MNIST-8) with the default recipe and report: offline.
    Demo(commands::demo::Args),
    /// Ops, parameters, bytes, FLOPs and sparsity of a model.
    Inspect(commands::inspect::Args),
    /// Accuracy on labelled data, or fidelity against a reference model.
    Eval(commands::eval::Args),
    /// Latency (median, p10, p90) and peak memory over repeated runs.
    Bench(commands::bench::Args),
    /// Run once on given inputs and print or save the outputs.
    Run(commands::run::Args),
    /// Load and save a model (re-encode, move weights to or from an external data file).
    Convert(commands::convert::Args),
    /// Quantize weights (and activations, inputs) to int8 / int4, exported as ONNX QDQ.
    Quantize(Box<commands::quantize::Args>),
    /// Prune weights (unstructured, N:M) or whole channels, heads and blocks.
    Prune(Box<commands::prune::Args>),
    /// Fine-tune weights on labelled data (keeps pruning masks; can distill from a teacher).
    Finetune(Box<commands::finetune::Args>),
    /// Apply a recipe (prune, fine-tune, quantize stages), measure before and after, report.
    Compress(Box<commands::compress::Args>),
}

/// Keeps freed tensor buffers in the process for the next run instead of handing them back to
/// the kernel: glibc maps large blocks fresh for each allocation by default, and the page faults
/// of touching new memory cost more than a transformer's elementwise ops themselves.
///
/// One arena: ops run on pool workers, and a worker's own glibc arena grows in heaps of at
/// most 64 MiB that it maps and unmaps as tensors come and go. With a worker arena, MiniLM
/// W8A8 at batch 32 took 365K page faults in 3 runs and each 25 MB GELU output took 13 ms to
/// allocate; in the main arena, 36K faults and 1.3 ms. Tensor buffers are few and large, so
/// the shared arena's lock costs nothing measurable.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // Safety: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// `4096`, `512K`, `300M`, `2G` (binary multiples).
fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1usize << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("expected a positive size such as 4096, 512M or 2G, got {s:?}"))
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    smelt_tensor::set_max_elements(cli.max_tensor_elements);
    smelt_tensor::set_max_file_bytes(cli.max_model_bytes);
    if let Some(cap) = cli.max_memory {
        memcap::set_cap(cap);
    }
    // Sessions run on pool workers (see `Session::run_with`): give them the main thread's
    // usual 8 MiB of stack, not the 2 MiB a spawned thread gets, for deeply nested subgraphs.
    let threads = cli.threads.map_or(0, |t| t.max(1));
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .stack_size(8 << 20)
        .build_global()
    {
        eprintln!("error: cannot start {threads} threads: {e}");
        return ExitCode::FAILURE;
    }
    // Library code returns errors; a panic is a bug, but it still must not reach the user raw.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error (a bug in smelt, please report it): {info}");
    }));
    // In the commands whose loops check it (training steps, search candidates), Ctrl-C asks
    // them to stop at a safe point (see smelt_tensor::interrupt); a second one exits at once.
    // Elsewhere Ctrl-C ends the process as usual. Outputs are written atomically either way.
    if matches!(cli.cmd, Cmd::Compress(_) | Cmd::Finetune(_) | Cmd::Demo(_)) {
        let _ = ctrlc::set_handler(|| {
            if smelt_tensor::interrupt::requested() {
                std::process::exit(130);
            }
            eprintln!("\nstopping at the next safe point (Ctrl-C again to quit now)");
            smelt_tensor::interrupt::request();
        });
    }
    let json = cli.json;
    // The whole command runs on a pool worker: a session started there runs in place, where
    // from the main thread each run would first hop to a worker and wait for it to wake (on 2
    // threads that hop took MNIST-8's batch-1 run from 0.06 to 0.11 ms).
    let result = rayon::scope(move |_| {
        std::panic::catch_unwind(move || match cli.cmd {
            Cmd::Demo(a) => commands::demo::run(a, json),
            Cmd::Inspect(a) => commands::inspect::run(a, json),
            Cmd::Eval(a) => commands::eval::run(a, json),
            Cmd::Bench(a) => commands::bench::run(a, json),
            Cmd::Run(a) => commands::run::run(a, json),
            Cmd::Convert(a) => commands::convert::run(a, json),
            Cmd::Quantize(a) => commands::quantize::run(*a, json),
            Cmd::Prune(a) => commands::prune::run(*a, json),
            Cmd::Finetune(a) => commands::finetune::run(*a, json),
            Cmd::Compress(a) => commands::compress::run(*a, json),
        })
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(smelt_tensor::Error::Interrupted)) => {
            eprintln!("error: interrupted");
            ExitCode::from(130)
        }
        Ok(Err(e)) => {
            // One line, so scripts can grep it: messages from parsers may span several.
            let msg = e.to_string();
            let msg: Vec<&str> = msg
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("error: {}", msg.join(" "));
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::from(2),
    }
}
