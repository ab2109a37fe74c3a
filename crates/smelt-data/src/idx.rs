//! MNIST-style idx files: a 4-byte magic (0, 0, dtype 0x08 = ubyte, rank), big-endian u32
//! dims, then the raw bytes. Only the bytes needed for `limit` rows are read.

use crate::{Dataset, Layout, Preprocess, Split};
use smelt_tensor::{bail, checked_numel, max_elements, Error, Result, Tensor};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// Loads `{train,t10k}-images-idx3-ubyte` (and the labels file, when present) from `dir`.
///
/// Images become f32 `[N, 1, rows, cols]` (`[N, rows, cols, 1]` for `Layout::Nhwc`) holding
/// the raw 0..255 values preprocessed by `pre`. A missing labels file gives `y: None`.
pub fn load_idx_dir(
    dir: &Path,
    split: Split,
    limit: Option<usize>,
    pre: &Preprocess,
) -> Result<Dataset> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images_path = find(dir, prefix, "images", 3).ok_or_else(|| {
        Error::Input(format!(
            "no MNIST images file in {}: expected {prefix}-images-idx3-ubyte",
            dir.display()
        ))
    })?;
    let labels_path = find(dir, prefix, "labels", 1);

    let (images, n_total, rows, cols) = read_images(&images_path, limit)?;
    let n = images.len() / (rows * cols).max(1);
    let y = match &labels_path {
        Some(p) => {
            let (labels, n_labels) = read_labels(p, limit)?;
            if n_labels != n_total {
                bail!(
                    Input,
                    "label count mismatch: {} has {n_total} images but {} has {n_labels} labels",
                    images_path.display(),
                    p.display()
                );
            }
            Some(labels)
        }
        None => None,
    };
    let shape = match pre.layout {
        Layout::Nchw => vec![n, 1, rows, cols],
        Layout::Nhwc => vec![n, rows, cols, 1],
    };
    let mut x: Vec<f32> = images.iter().map(|&b| f32::from(b)).collect();
    pre.apply(&shape, &mut x)?;
    Dataset::new(Tensor::from_vec(shape, x)?, y)
}

/// Accepts both `t10k-images-idx3-ubyte` and the dotted `t10k-images.idx3-ubyte`.
fn find(dir: &Path, prefix: &str, kind: &str, rank: u32) -> Option<PathBuf> {
    [
        format!("{prefix}-{kind}-idx{rank}-ubyte"),
        format!("{prefix}-{kind}.idx{rank}-ubyte"),
    ]
    .into_iter()
    .map(|name| dir.join(name))
    .find(|p| p.is_file())
}

/// Opens `path`, checks the magic and returns (file, dims, file length).
fn open_idx(path: &Path, magic: u32, what: &str) -> Result<(File, Vec<usize>, u64)> {
    let ctx = || format!("MNIST idx file {}", path.display());
    let mut f = File::open(path).map_err(|e| Error::io(ctx(), e))?;
    let file_len = f.metadata().map_err(|e| Error::io(ctx(), e))?.len();
    let rank = (magic & 0xff) as usize;
    let header_len = 4 + 4 * rank as u64;
    if file_len < header_len {
        bail!(
            Input,
            "{}: truncated: {file_len} bytes is shorter than the {header_len}-byte header",
            ctx()
        );
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(ctx(), e))?;
    let got = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if got != magic {
        bail!(
            Input,
            "{}: bad magic 0x{got:08x}, expected 0x{magic:08x} ({what})",
            ctx()
        );
    }
    let dims = header[4..]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    Ok((f, dims, file_len - header_len))
}

/// Reads the first `limit` images; returns (bytes, images in file, rows, cols).
fn read_images(path: &Path, limit: Option<usize>) -> Result<(Vec<u8>, usize, usize, usize)> {
    let (mut f, dims, body_len) = open_idx(path, IMAGES_MAGIC, "images")?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    let numel = checked_numel(&dims, max_elements())
        .map_err(|e| e.context(format!("MNIST idx file {}", path.display())))?;
    if (numel as u64) > body_len {
        bail!(
            Input,
            "MNIST idx file {}: truncated: header says {n} images of {rows}x{cols} but file has {} bytes",
            path.display(),
            body_len + 16
        );
    }
    let take = limit.map_or(n, |l| l.min(n));
    if take == 0 || rows == 0 || cols == 0 {
        bail!(Input, "MNIST idx file {}: dataset is empty", path.display());
    }
    let mut buf = vec![0u8; take * rows * cols];
    f.read_exact(&mut buf)
        .map_err(|e| Error::io(format!("MNIST idx file {}", path.display()), e))?;
    Ok((buf, n, rows, cols))
}

/// Reads the first `limit` labels; returns (labels, labels in file).
fn read_labels(path: &Path, limit: Option<usize>) -> Result<(Vec<i64>, usize)> {
    let (mut f, dims, body_len) = open_idx(path, LABELS_MAGIC, "labels")?;
    let n = dims[0];
    if n as u64 > body_len {
        bail!(
            Input,
            "MNIST idx file {}: truncated: header says {n} labels but file has {} bytes",
            path.display(),
            body_len + 8
        );
    }
    let take = limit.map_or(n, |l| l.min(n));
    let mut buf = vec![0u8; take];
    f.read_exact(&mut buf)
        .map_err(|e| Error::io(format!("MNIST idx file {}", path.display()), e))?;
    Ok((buf.into_iter().map(i64::from).collect(), n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::asset;

    #[test]
    fn real_mnist_test_split() {
        let dir = asset("mnist");
        let d = load_idx_dir(&dir, Split::Test, Some(100), &Preprocess::default()).unwrap();
        assert_eq!(d.x.shape(), &[100, 1, 28, 28]);
        let y = d.y.as_ref().unwrap();
        assert_eq!(y.len(), 100);
        assert_eq!(&y[..5], &[7, 2, 1, 0, 4]);
        let x = d.x.as_slice::<f32>().unwrap();
        assert!(x.iter().all(|v| (0.0..=255.0).contains(v)));
        assert_eq!(x.iter().cloned().fold(0.0, f32::max), 255.0);

        let pre = Preprocess {
            scale: 1.0 / 255.0,
            mean: vec![0.1307],
            std: vec![0.3081],
            layout: Layout::Nhwc,
        };
        let n = load_idx_dir(&dir, Split::Test, Some(3), &pre).unwrap();
        assert_eq!(n.x.shape(), &[3, 28, 28, 1]);
        let raw = &x[..3 * 784];
        for (r, v) in raw.iter().zip(n.x.as_slice::<f32>().unwrap()) {
            assert!((v - (r / 255.0 - 0.1307) / 0.3081).abs() < 1e-5);
        }
    }

    #[test]
    fn real_mnist_train_split_limit() {
        let d = load_idx_dir(
            &asset("mnist"),
            Split::Train,
            Some(10),
            &Preprocess::default(),
        )
        .unwrap();
        assert_eq!(d.len(), 10);
        // The first training digit is a 5.
        assert_eq!(d.y.as_ref().unwrap()[0], 5);
    }

    fn write_idx(dir: &Path, name: &str, magic: u32, dims: &[u32], body: &[u8]) {
        let mut b = magic.to_be_bytes().to_vec();
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(body);
        std::fs::write(dir.join(name), b).unwrap();
    }

    #[test]
    fn small_dotted_files_and_missing_labels() {
        let dir = tempfile::tempdir().unwrap();
        write_idx(
            dir.path(),
            "t10k-images.idx3-ubyte",
            IMAGES_MAGIC,
            &[2, 2, 2],
            &[0, 1, 2, 3, 4, 5, 6, 255],
        );
        let d = load_idx_dir(
            dir.path(),
            Split::Test,
            None,
            &Preprocess {
                scale: 2.0,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(d.x.shape(), &[2, 1, 2, 2]);
        assert_eq!(
            d.x.as_slice::<f32>().unwrap(),
            &[0., 2., 4., 6., 8., 10., 12., 510.]
        );
        assert!(d.y.is_none());

        write_idx(
            dir.path(),
            "t10k-labels-idx1-ubyte",
            LABELS_MAGIC,
            &[3],
            &[1, 2, 3],
        );
        let e = load_idx_dir(dir.path(), Split::Test, None, &Preprocess::default()).unwrap_err();
        assert!(e.to_string().contains("label count mismatch"), "{e}");
    }

    #[test]
    fn truncated_images_are_rejected_before_allocation() {
        let dir = tempfile::tempdir().unwrap();
        write_idx(
            dir.path(),
            "t10k-images-idx3-ubyte",
            IMAGES_MAGIC,
            &[10000, 28, 28],
            &[0; 100],
        );
        let e = load_idx_dir(dir.path(), Split::Test, Some(1), &Preprocess::default()).unwrap_err();
        assert!(matches!(e, Error::Input(_)));
        let msg = e.to_string();
        assert!(
            msg.contains("truncated: header says 10000 images of 28x28 but file has 116 bytes"),
            "{msg}"
        );
        assert!(msg.contains("t10k-images-idx3-ubyte"), "{msg}");

        // A header claiming ~4G images x 64K x 64K overflows the limit instead of allocating.
        write_idx(
            dir.path(),
            "t10k-images-idx3-ubyte",
            IMAGES_MAGIC,
            &[u32::MAX, 65535, 65535],
            &[],
        );
        assert!(load_idx_dir(dir.path(), Split::Test, None, &Preprocess::default()).is_err());
    }

    #[test]
    fn wrong_magic_and_truncated_labels() {
        let dir = tempfile::tempdir().unwrap();
        write_idx(
            dir.path(),
            "train-images-idx3-ubyte",
            LABELS_MAGIC,
            &[1, 1, 1],
            &[0],
        );
        let e = load_idx_dir(dir.path(), Split::Train, None, &Preprocess::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("bad magic 0x00000801, expected 0x00000803"),
            "{e}"
        );

        write_idx(
            dir.path(),
            "train-images-idx3-ubyte",
            IMAGES_MAGIC,
            &[2, 1, 1],
            &[0, 1],
        );
        write_idx(
            dir.path(),
            "train-labels-idx1-ubyte",
            LABELS_MAGIC,
            &[2],
            &[4],
        );
        let e = load_idx_dir(dir.path(), Split::Train, None, &Preprocess::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("header says 2 labels but file has 9 bytes"),
            "{e}"
        );

        std::fs::write(dir.path().join("train-labels-idx1-ubyte"), [0u8, 0]).unwrap();
        let e = load_idx_dir(dir.path(), Split::Train, None, &Preprocess::default()).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");

        let e = load_idx_dir(dir.path(), Split::Test, None, &Preprocess::default()).unwrap_err();
        assert!(e.to_string().contains("no MNIST images file"), "{e}");
        let e =
            load_idx_dir(dir.path(), Split::Train, Some(0), &Preprocess::default()).unwrap_err();
        assert!(e.to_string().contains("dataset is empty"), "{e}");
    }
}
