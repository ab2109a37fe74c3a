//! Flags shared by several commands, and the glue from them to library calls.

use smelt_data::{Dataset, Layout, Preprocess, Split};
use smelt_engine::Session;
use smelt_ir::Model;
use smelt_tensor::{bail, DType, Error, Result};
use std::path::{Path, PathBuf};

/// Where evaluation data comes from and how it is preprocessed.
#[derive(clap::Args, Clone, Debug)]
pub struct DataArgs {
    /// A folder of MNIST-style idx files, an .npz holding `x` (and `y`), or, with --tokenizer,
    /// a text file or folder of text files (Brown-corpus `word/TAG` files are detected).
    #[arg(long, visible_alias = "calib")]
    pub data: Option<PathBuf>,
    /// Which split of an idx folder to read.
    #[arg(long, default_value = "test", value_parser = ["train", "test"])]
    pub split: String,
    /// Use at most this many samples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Leave out the first N samples (e.g. calibrate on sentences an evaluation does not use).
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    /// Multiply raw values by this before mean/std (e.g. 0.00392 for 0..255 -> 0..1).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f32,
    /// Per-channel mean to subtract (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub mean: Vec<f32>,
    /// Per-channel standard deviation to divide by (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub std: Vec<f32>,
    /// Layout of the data; nhwc data is transposed to the NCHW the model expects.
    #[arg(long, default_value = "nchw", value_parser = ["nchw", "nhwc"])]
    pub layout: String,
    /// tokenizer.json for text data (turns --data into text input).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Longest token sequence for text data (longer sentences are truncated).
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Pad every text batch to this length (default: the longest sentence in the batch).
    #[arg(long)]
    pub pad_to: Option<usize>,
    /// Batch sentences of similar length together (less padding; for calibration, where the
    /// order of samples does not matter).
    #[arg(skip)]
    pub sort_by_length: bool,
}

/// Inputs for one batch, by model input name.
pub use smelt_engine::Feed;

/// A dataset turned into model feeds: image batches with labels, or tokenized text.
pub struct Batches {
    pub feeds: Vec<Feed>,
    pub labels: Option<Vec<Vec<i64>>>,
    pub samples: usize,
}

impl DataArgs {
    pub fn load(&self, model: &Model, batch: usize) -> Result<Batches> {
        let Some(path) = &self.data else {
            bail!(Input, "no data given: pass --data");
        };
        if !path.exists() {
            bail!(Input, "data path {} does not exist", path.display());
        }
        let batch = batch.max(1);
        if let Some(tok) = &self.tokenizer {
            return self.load_text(model, path, tok, batch);
        }
        let input = single_input(model)?;
        let in_type = model.graph.value_info(&input).and_then(|v| v.dtype);
        let raw = matches!(in_type, Some(DType::U8) | Some(DType::I8));
        let ds = self.dataset(model)?;
        // A model exported with a fixed batch of 1 (like MNIST-8) is fed one sample at a time.
        let fixed_one = model
            .graph
            .inputs
            .iter()
            .find(|v| v.name == input)
            .and_then(|v| v.shape.as_ref())
            .is_some_and(|s| s.first() == Some(&smelt_ir::Dim::Fixed(1)));
        let batch = if fixed_one { 1 } else { batch };
        let mut feeds = Vec::new();
        let mut labels = ds.y.as_ref().map(|_| Vec::new());
        for (s, e) in ds.batch_ranges(batch) {
            let x = ds.batch(s, e);
            let x = match in_type {
                Some(t) if raw => x.cast(t)?,
                _ => x,
            };
            feeds.push(vec![(input.clone(), x)]);
            if let (Some(l), Some(y)) = (labels.as_mut(), ds.labels(s, e)) {
                l.push(y.to_vec());
            }
        }
        Ok(Batches {
            feeds,
            labels,
            samples: ds.len(),
        })
    }

    /// Labelled validation data from `path` (its test split), read with these flags.
    pub fn labelled_val(
        &self,
        model: &Model,
        path: &Path,
        limit: Option<usize>,
    ) -> Result<Dataset> {
        let mut d = self.clone();
        d.data = Some(path.to_path_buf());
        d.split = "test".into();
        d.limit = limit;
        d.skip = 0;
        let ds = d.dataset(model)?;
        if ds.y.is_none() {
            bail!(Input, "--val data has no labels");
        }
        Ok(ds)
    }

    /// The samples themselves (not batched): images with their labels, preprocessed for
    /// `model` (raw bytes for a model that takes uint8), `--skip` and `--limit` applied.
    pub fn dataset(&self, model: &Model) -> Result<Dataset> {
        let Some(path) = &self.data else {
            bail!(Input, "no data given: pass --data");
        };
        if !path.exists() {
            bail!(Input, "data path {} does not exist", path.display());
        }
        let input = single_input(model)?;
        let in_type = model.graph.value_info(&input).and_then(|v| v.dtype);
        // A model that takes raw bytes (see `quantize --quantize-inputs`) does its own
        // preprocessing: feed it the stored values unscaled.
        let raw = matches!(in_type, Some(DType::U8) | Some(DType::I8));
        let pre = Preprocess {
            scale: if raw { 1.0 } else { self.scale },
            mean: if raw { vec![] } else { self.mean.clone() },
            std: if raw { vec![] } else { self.std.clone() },
            layout: if self.layout == "nhwc" {
                Layout::Nhwc
            } else {
                Layout::Nchw
            },
        };
        let split = if self.split == "train" {
            Split::Train
        } else {
            Split::Test
        };
        let limit = self.limit.map(|l| l + self.skip);
        let mut ds = smelt_data::load_data(path, split, limit, &pre)?;
        if self.skip > 0 {
            if self.skip >= ds.len() {
                bail!(
                    Input,
                    "--skip {} leaves no samples of {}",
                    self.skip,
                    ds.len()
                );
            }
            let y = ds.labels(self.skip, ds.len()).map(<[i64]>::to_vec);
            ds = Dataset::new(ds.batch(self.skip, ds.len()), y)?;
        }
        if pre.layout == Layout::Nhwc {
            ds = Dataset::new(smelt_data::nhwc_to_nchw(ds.x)?, ds.y)?;
        }
        Ok(ds)
    }

    fn load_text(&self, model: &Model, path: &Path, tok: &Path, batch: usize) -> Result<Batches> {
        let limit = self
            .limit
            .map_or(usize::MAX, |l| l.saturating_add(self.skip));
        let mut sentences = if path.is_dir() && is_brown_dir(path) {
            smelt_data::brown_sentences(path, limit)?
        } else {
            let files = if path.is_dir() {
                let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file())
                    .collect();
                v.sort();
                v
            } else {
                vec![path.to_path_buf()]
            };
            smelt_data::read_text_lines(&files, Some(limit))?
        };
        sentences.drain(..self.skip.min(sentences.len()));
        if sentences.is_empty() {
            bail!(Input, "no text found in {}", path.display());
        }
        let names: Vec<String> = model
            .graph
            .runtime_inputs()
            .map(|v| v.name.clone())
            .collect();
        if self.sort_by_length {
            sentences.sort_by_key(|s| s.split_whitespace().count());
        }
        let mut feeds = Vec::new();
        for chunk in sentences.chunks(batch) {
            let b = smelt_data::tokenize(tok, chunk, self.max_len, self.pad_to)?;
            let mut feed = Vec::new();
            for n in &names {
                let t = match n.as_str() {
                    "input_ids" => b.input_ids.clone(),
                    "attention_mask" => b.attention_mask.clone(),
                    "token_type_ids" => b.token_type_ids.clone(),
                    other => bail!(
                        Input,
                        "text data provides input_ids, attention_mask and token_type_ids, but the model also wants '{other}'"
                    ),
                };
                feed.push((n.clone(), t));
            }
            feeds.push(feed);
        }
        Ok(Batches {
            feeds,
            labels: None,
            samples: sentences.len(),
        })
    }
}

/// Brown-corpus folders hold files named like `ca01`; their tokens carry `/TAG` suffixes.
fn is_brown_dir(p: &Path) -> bool {
    p.join("ca01").is_file()
}

fn single_input(model: &Model) -> Result<String> {
    let ins: Vec<&str> = model
        .graph
        .runtime_inputs()
        .map(|v| v.name.as_str())
        .collect();
    match ins.as_slice() {
        [one] => Ok(one.to_string()),
        _ => bail!(
            Input,
            "image data feeds one input, but the model has {} ({})",
            ins.len(),
            ins.join(", ")
        ),
    }
}

/// Refuses an output path naming the input file itself unless `force`: a failed write must
/// never cost the user the original.
pub fn refuse_overwrite(input: &Path, output: &Path, force: bool) -> Result<()> {
    let same = match (input.canonicalize(), output.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if same && !force {
        bail!(
            Input,
            "refusing to overwrite the input {} (pass --force)",
            input.display()
        );
    }
    Ok(())
}

pub fn load_model(path: &Path) -> Result<Model> {
    // The loader names the file in every error it returns.
    smelt_onnx::load(path)
}

pub fn session(model: Model) -> Result<Session> {
    Session::new(model)
}

pub fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Where masks go by default: beside the model, `NAME.masks.safetensors`.
pub fn masks_beside(model: &Path) -> PathBuf {
    let stem = model.file_stem().unwrap_or_default().to_string_lossy();
    model.with_file_name(format!("{stem}.masks.safetensors"))
}
