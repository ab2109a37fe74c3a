//! Datasets and metrics shared by eval, calibration, fine-tuning and search.
//!
//! Image data is always returned as f32 `[N, ...]` after preprocessing, so every consumer can
//! feed batches straight into a model without knowing the file format. Text is tokenized into
//! the three int64 tensors BERT-style encoders take.

mod idx;
mod metrics;
pub mod npy;
mod npz;
mod text;

use smelt_tensor::{bail, Error, Result, Tensor};
use std::path::{Path, PathBuf};

pub use idx::load_idx_dir;
pub use metrics::{
    accuracy, check_labels, fidelity, mean_pool, top1, Fidelity, FidelityAccumulator,
};
pub use npz::{load_npz, write_npz};
pub use text::{brown_sentences, read_text_lines, tokenize, TextBatch};

/// Memory layout of image data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Layout {
    #[default]
    Nchw,
    Nhwc,
}

/// Which half of a dataset with a train/test split to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Split {
    Train,
    #[default]
    Test,
}

/// How raw values become model inputs: `((raw * scale) - mean[c]) / std[c]`.
///
/// `layout` is the layout the *data* is in, which tells the normaliser where the channel axis
/// is. Loaders never transpose on their own: idx files (one channel) are produced in the
/// requested layout directly, and npz arrays are returned as stored. A model that wants NCHW
/// fed from NHWC data goes through [`nhwc_to_nchw`] explicitly, so the transpose is visible at
/// the call site rather than hidden behind a flag.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    pub scale: f32,
    /// Per-channel mean; empty means none, one value applies to every channel.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation; empty means none, one value applies to every channel.
    pub std: Vec<f32>,
    pub layout: Layout,
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess {
            scale: 1.0,
            mean: Vec::new(),
            std: Vec::new(),
            layout: Layout::Nchw,
        }
    }
}

impl Preprocess {
    /// Applies scale, mean and std in place to `x` (shape `shape`).
    pub fn apply(&self, shape: &[usize], x: &mut [f32]) -> Result<()> {
        let per_channel = !self.mean.is_empty() || !self.std.is_empty();
        if !per_channel {
            if self.scale != 1.0 {
                x.iter_mut().for_each(|v| *v *= self.scale);
            }
            return Ok(());
        }
        if shape.len() < 2 {
            bail!(
                Input,
                "mean/std normalisation needs data with a channel axis, got shape {shape:?}"
            );
        }
        let (channels, inner) = match self.layout {
            Layout::Nchw => (shape[1], shape[2..].iter().product::<usize>()),
            Layout::Nhwc => (shape[shape.len() - 1], 1),
        };
        let expand = |v: &[f32], default: f32, what: &str| -> Result<Vec<f32>> {
            match v.len() {
                0 => Ok(vec![default; channels]),
                1 => Ok(vec![v[0]; channels]),
                n if n == channels => Ok(v.to_vec()),
                n => Err(Error::Input(format!(
                    "{what} has {n} values but the data has {channels} channels \
                     ({:?} layout, shape {shape:?})",
                    self.layout
                ))),
            }
        };
        let mean = expand(&self.mean, 0.0, "mean")?;
        let std = expand(&self.std, 1.0, "std")?;
        if let Some(s) = std.iter().find(|s| **s == 0.0 || !s.is_finite()) {
            bail!(Input, "std values must be finite and non-zero, got {s}");
        }
        let inv: Vec<f32> = std.iter().map(|s| 1.0 / s).collect();
        if channels == 0 || inner == 0 {
            return Ok(());
        }
        for (i, v) in x.iter_mut().enumerate() {
            let c = (i / inner) % channels;
            *v = (*v * self.scale - mean[c]) * inv[c];
        }
        Ok(())
    }
}

/// A loaded dataset: inputs `x` as f32 `[N, ...]` and optional integer labels.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub x: Tensor,
    pub y: Option<Vec<i64>>,
}

impl Dataset {
    /// Builds a dataset, checking that `x` is f32 with a row axis and that labels match rows.
    pub fn new(x: Tensor, y: Option<Vec<i64>>) -> Result<Dataset> {
        if x.rank() == 0 {
            bail!(
                Input,
                "dataset inputs need a leading row axis, got a scalar"
            );
        }
        x.as_slice::<f32>()?;
        if x.shape()[0] == 0 {
            bail!(Input, "dataset is empty");
        }
        if let Some(y) = &y {
            if y.len() != x.shape()[0] {
                bail!(
                    Input,
                    "label count mismatch: {} labels for {} inputs",
                    y.len(),
                    x.shape()[0]
                );
            }
        }
        Ok(Dataset { x, y })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.x.shape().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shape of one row (the trailing dims of `x`).
    pub fn row_shape(&self) -> &[usize] {
        self.x.shape().get(1..).unwrap_or(&[])
    }

    /// Rows `start..end` as a new tensor `[end - start, ...]`; the range is clamped to the data.
    pub fn batch(&self, start: usize, end: usize) -> Tensor {
        let (start, end) = self.clamp(start, end);
        let row: usize = self.row_shape().iter().product();
        let mut shape = self.x.shape().to_vec();
        shape[0] = end - start;
        let data = match self.x.as_slice::<f32>() {
            Ok(all) => all[start * row..end * row].to_vec(),
            // Dataset::new guarantees f32; a hand-built Dataset of another dtype gets converted.
            Err(_) => self
                .x
                .to_f32_vec()
                .map(|all| all[start * row..end * row].to_vec())
                .unwrap_or_else(|_| vec![0.0; (end - start) * row]),
        };
        Tensor::from_vec(shape, data).expect("row slice length matches its shape")
    }

    /// Labels for rows `start..end` (clamped), if the dataset has labels.
    pub fn labels(&self, start: usize, end: usize) -> Option<&[i64]> {
        let (start, end) = self.clamp(start, end);
        self.y.as_deref().and_then(|y| y.get(start..end))
    }

    /// `(start, end)` ranges covering the dataset in batches of `batch_size` (the last may be short).
    pub fn batch_ranges(&self, batch_size: usize) -> Vec<(usize, usize)> {
        let bs = batch_size.max(1);
        (0..self.len())
            .step_by(bs)
            .map(|s| (s, (s + bs).min(self.len())))
            .collect()
    }

    fn clamp(&self, start: usize, end: usize) -> (usize, usize) {
        let end = end.min(self.len());
        (start.min(end), end)
    }
}

/// Loads a dataset from a directory of MNIST idx files or a `.npz` file.
pub fn load_data(
    path: &Path,
    split: Split,
    limit: Option<usize>,
    pre: &Preprocess,
) -> Result<Dataset> {
    if path.is_dir() {
        return load_idx_dir(path, split, limit, pre);
    }
    let is_npz = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("npz"));
    if is_npz {
        if !path.is_file() {
            bail!(Input, "dataset file {} does not exist", path.display());
        }
        return load_npz(path, limit, pre);
    }
    if !path.exists() {
        bail!(Input, "dataset path {} does not exist", path.display());
    }
    bail!(
        Input,
        "cannot load dataset {}: expected a directory of MNIST idx files or a .npz file",
        path.display()
    )
}

/// Transposes `[N, spatial..., C]` to `[N, C, spatial...]` (any dtype, rank >= 3).
pub fn nhwc_to_nchw(t: Tensor) -> Result<Tensor> {
    let shape = t.shape().to_vec();
    let r = shape.len();
    if r < 3 {
        bail!(Shape, "nhwc_to_nchw needs rank >= 3, got shape {shape:?}");
    }
    let n = shape[0];
    let c = shape[r - 1];
    let spatial: usize = shape[1..r - 1].iter().product();
    let mut out_shape = Vec::with_capacity(r);
    out_shape.push(n);
    out_shape.push(c);
    out_shape.extend_from_slice(&shape[1..r - 1]);
    // Output index (b, ch, s) reads input index (b, s, ch).
    let idx = (0..n).flat_map(move |b| {
        (0..c).flat_map(move |ch| (0..spatial).map(move |s| (b * spatial + s) * c + ch))
    });
    let data = t.data().gather(idx);
    Tensor::new(out_shape, data)
}

/// Where fetched assets live: `$SMELT_ASSETS`, else `${XDG_CACHE_HOME:-$HOME/.cache}/smelt/assets`.
pub fn assets_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SMELT_ASSETS").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("smelt").join("assets"))
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::path::PathBuf;

    /// An asset path that must exist; tests fail loudly rather than skip when it does not.
    pub fn asset(rel: &str) -> PathBuf {
        let dir = super::assets_dir().expect("no asset directory: run scripts/fetch-assets.sh");
        let p = dir.join(rel);
        assert!(
            p.exists(),
            "missing test asset {}: run scripts/fetch-assets.sh",
            p.display()
        );
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_per_channel_nchw_and_nhwc() {
        let pre = Preprocess {
            scale: 0.5,
            mean: vec![1.0, 2.0],
            std: vec![2.0, 4.0],
            layout: Layout::Nchw,
        };
        // [1, 2, 2]: channel 0 = [2, 4], channel 1 = [6, 10]
        let mut x = vec![2.0, 4.0, 6.0, 10.0];
        pre.apply(&[1, 2, 2], &mut x).unwrap();
        assert_eq!(x, vec![0.0, 0.5, 0.25, 0.75]);

        let pre = Preprocess {
            layout: Layout::Nhwc,
            ..pre
        };
        // [1, 2, 2] NHWC: channel alternates
        let mut x = vec![2.0, 6.0, 4.0, 10.0];
        pre.apply(&[1, 2, 2], &mut x).unwrap();
        assert_eq!(x, vec![0.0, 0.25, 0.5, 0.75]);
    }

    #[test]
    fn preprocess_rejects_bad_channel_count_and_zero_std() {
        let pre = Preprocess {
            mean: vec![0.1, 0.2, 0.3],
            ..Default::default()
        };
        let e = pre.apply(&[1, 2, 2], &mut [0.0; 4]).unwrap_err();
        assert!(e.to_string().contains("2 channels"), "{e}");
        let pre = Preprocess {
            std: vec![0.0],
            ..Default::default()
        };
        assert!(pre.apply(&[1, 2, 2], &mut [0.0; 4]).is_err());
    }

    #[test]
    fn dataset_batch_and_labels() {
        let x = Tensor::from_vec(vec![3, 2], vec![0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let d = Dataset::new(x, Some(vec![7, 8, 9])).unwrap();
        assert_eq!(d.len(), 3);
        let b = d.batch(1, 3);
        assert_eq!(b.shape(), &[2, 2]);
        assert_eq!(b.as_slice::<f32>().unwrap(), &[2.0, 3.0, 4.0, 5.0]);
        assert_eq!(d.labels(2, 10), Some(&[9i64][..]));
        assert_eq!(d.batch(5, 9).shape(), &[0, 2]);
        assert_eq!(d.batch_ranges(2), vec![(0, 2), (2, 3)]);

        let x = Tensor::from_vec(vec![3, 2], vec![0.0f32; 6]).unwrap();
        let e = Dataset::new(x, Some(vec![1])).unwrap_err();
        assert!(e.to_string().contains("label count mismatch"), "{e}");
        let x = Tensor::from_vec(vec![0, 2], Vec::<f32>::new()).unwrap();
        assert_eq!(
            Dataset::new(x, None).unwrap_err().to_string(),
            "dataset is empty"
        );
    }

    #[test]
    fn nhwc_to_nchw_transposes() {
        // [1, 2, 2, 3]: value = h*100 + w*10 + c
        let v: Vec<i32> = (0..2)
            .flat_map(|h| (0..2).flat_map(move |w| (0..3).map(move |c| h * 100 + w * 10 + c)))
            .collect();
        let t = Tensor::from_vec(vec![1, 2, 2, 3], v).unwrap();
        let o = nhwc_to_nchw(t).unwrap();
        assert_eq!(o.shape(), &[1, 3, 2, 2]);
        assert_eq!(
            o.as_slice::<i32>().unwrap(),
            &[0, 10, 100, 110, 1, 11, 101, 111, 2, 12, 102, 112]
        );
        assert!(nhwc_to_nchw(Tensor::from_vec(vec![2, 2], vec![0f32; 4]).unwrap()).is_err());
    }

    #[test]
    fn load_data_rejects_unknown_paths() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("data.csv");
        std::fs::write(&f, "1,2\n").unwrap();
        let e = load_data(&f, Split::Test, None, &Preprocess::default()).unwrap_err();
        assert!(e.to_string().contains("expected a directory"), "{e}");
        let e = load_data(
            &dir.path().join("nope.npz"),
            Split::Test,
            None,
            &Preprocess::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
