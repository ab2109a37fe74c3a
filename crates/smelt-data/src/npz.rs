//! numpy `.npz` datasets: array `x` (any numeric dtype, rank >= 1) and optional integer `y`.

use crate::{Dataset, Preprocess};
use npyz::npz::NpzArchive;
use npyz::{DType, Deserialize, NpyFile, Order, TypeChar};
use smelt_tensor::{bail, checked_numel, max_elements, Error, Result, Tensor};
use std::io::Read;
use std::path::Path;

/// Loads `x` (converted to f32 and preprocessed) and `y` (as i64) from an `.npz` file, keeping
/// the first `limit` rows. The data keeps its stored layout; see [`crate::Preprocess`].
pub fn load_npz(path: &Path, limit: Option<usize>, pre: &Preprocess) -> Result<Dataset> {
    let ctx = || format!("npz file {}", path.display());
    let mut npz = NpzArchive::open(path).map_err(|e| Error::io(ctx(), e))?;
    let names: Vec<String> = npz.array_names().map(str::to_string).collect();

    let x: Array<f32> = match npz.by_name("x").map_err(|e| Error::io(ctx(), e))? {
        Some(file) => {
            read_array(file, limit).map_err(|e| e.context(format!("{}: array `x`", ctx())))?
        }
        None => {
            let found = if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            };
            bail!(Input, "{}: no array named `x` (found: {found})", ctx());
        }
    };

    let y = match npz.by_name("y").map_err(|e| Error::io(ctx(), e))? {
        None => None,
        Some(file) => {
            let y: Array<i64> =
                read_array(file, limit).map_err(|e| e.context(format!("{}: array `y`", ctx())))?;
            let ok_rank = y.shape.len() == 1 || (y.shape.len() == 2 && y.shape[1] == 1);
            if !ok_rank {
                bail!(
                    Input,
                    "{}: labels `y` must have shape [N] or [N, 1], got {:?}",
                    ctx(),
                    y.shape
                );
            }
            if y.total_rows != x.total_rows {
                bail!(
                    Input,
                    "{}: label count mismatch: `x` has {} rows but `y` has {} labels",
                    ctx(),
                    x.total_rows,
                    y.total_rows
                );
            }
            Some(y.values)
        }
    };
    let Array {
        shape, mut values, ..
    } = x;
    if shape[0] == 0 {
        bail!(Input, "{}: dataset is empty", ctx());
    }
    pre.apply(&shape, &mut values)
        .map_err(|e| e.context(ctx()))?;
    Dataset::new(Tensor::from_vec(shape, values)?, y).map_err(|e| e.context(ctx()))
}

/// The first rows of an array, in C order.
struct Array<O> {
    /// Rows in the file (before `limit`).
    total_rows: usize,
    /// Shape of the rows kept.
    shape: Vec<usize>,
    values: Vec<O>,
}

/// Element types an array is converted to; labels refuse float sources.
trait Target: Copy {
    const ACCEPTS_FLOAT: bool;
    fn from_i64(v: i64) -> Self;
    fn from_u64(v: u64) -> Self;
    fn from_f64(v: f64) -> Self;
}

impl Target for f32 {
    const ACCEPTS_FLOAT: bool = true;
    fn from_i64(v: i64) -> Self {
        v as f32
    }
    fn from_u64(v: u64) -> Self {
        v as f32
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Target for i64 {
    const ACCEPTS_FLOAT: bool = false;
    fn from_i64(v: i64) -> Self {
        v
    }
    fn from_u64(v: u64) -> Self {
        i64::try_from(v).unwrap_or(i64::MAX)
    }
    fn from_f64(v: f64) -> Self {
        v as i64
    }
}

fn read_array<R: Read, O: Target>(file: NpyFile<R>, limit: Option<usize>) -> Result<Array<O>> {
    if file.uses_pickled_array() {
        bail!(Unsupported, "pickled object arrays are not supported");
    }
    let shape: Vec<usize> = file
        .shape()
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| Error::Limit(format!("dimension {d} is too large")))
        })
        .collect::<Result<_>>()?;
    if shape.is_empty() {
        bail!(Input, "needs a leading row axis, got a 0-d array");
    }
    let numel = checked_numel(&shape, max_elements())?;
    let total_rows = shape[0];
    let keep_rows = limit.map_or(total_rows, |l| l.min(total_rows));
    let row: usize = shape[1..].iter().product();
    let fortran = file.order() == Order::Fortran && shape.len() > 1;
    // Fortran order interleaves rows, so the whole array is read and reordered.
    let count = if fortran { numel } else { keep_rows * row };

    let DType::Plain(ts) = file.dtype() else {
        bail!(
            Unsupported,
            "structured dtype {:?} (need a plain numeric array)",
            file.dtype()
        );
    };
    let (tc, size) = (ts.type_char(), ts.size_field());
    let mut values: Vec<O> = match (tc, size) {
        (TypeChar::Int, 1) => collect::<i8, _, _>(file, count, |v| O::from_i64(v.into()))?,
        (TypeChar::Int, 2) => collect::<i16, _, _>(file, count, |v| O::from_i64(v.into()))?,
        (TypeChar::Int, 4) => collect::<i32, _, _>(file, count, |v| O::from_i64(v.into()))?,
        (TypeChar::Int, 8) => collect::<i64, _, _>(file, count, O::from_i64)?,
        (TypeChar::Uint, 1) => collect::<u8, _, _>(file, count, |v| O::from_u64(v.into()))?,
        (TypeChar::Uint, 2) => collect::<u16, _, _>(file, count, |v| O::from_u64(v.into()))?,
        (TypeChar::Uint, 4) => collect::<u32, _, _>(file, count, |v| O::from_u64(v.into()))?,
        (TypeChar::Uint, 8) => collect::<u64, _, _>(file, count, O::from_u64)?,
        (TypeChar::Bool, 1) if O::ACCEPTS_FLOAT => {
            collect::<bool, _, _>(file, count, |v| O::from_i64(v.into()))?
        }
        (TypeChar::Float, 4) if O::ACCEPTS_FLOAT => {
            collect::<f32, _, _>(file, count, |v| O::from_f64(v.into()))?
        }
        (TypeChar::Float, 8) if O::ACCEPTS_FLOAT => collect::<f64, _, _>(file, count, O::from_f64)?,
        (TypeChar::Float, _) | (TypeChar::Bool, _) if !O::ACCEPTS_FLOAT => {
            bail!(Input, "labels must be integers, got dtype {ts}")
        }
        _ => bail!(
            Unsupported,
            "dtype {ts} (need an integer, bool, float32 or float64 array)"
        ),
    };
    if fortran {
        values = fortran_to_c(&values, &shape);
        values.truncate(keep_rows * row);
    }
    let mut kept = shape;
    kept[0] = keep_rows;
    Ok(Array {
        total_rows,
        shape: kept,
        values,
    })
}

/// Reads `count` elements; the output grows as data arrives, so a header that lies about its
/// size cannot make us allocate more than the file really holds.
fn collect<T: Deserialize, O, R: Read>(
    file: NpyFile<R>,
    count: usize,
    conv: impl Fn(T) -> O,
) -> Result<Vec<O>> {
    let reader = file
        .data::<T>()
        .map_err(|e| Error::Unsupported(format!("cannot read this dtype: {e}")))?;
    let mut out = Vec::with_capacity(count.min(1 << 20));
    for v in reader.take(count) {
        out.push(conv(v.map_err(|e| Error::io("reading array data", e))?));
    }
    if out.len() != count {
        bail!(
            Input,
            "truncated: expected {count} elements, found {}",
            out.len()
        );
    }
    Ok(out)
}

/// Reorders column-major data into row-major order.
fn fortran_to_c<O: Copy>(v: &[O], shape: &[usize]) -> Vec<O> {
    let r = shape.len();
    // Column-major strides: the first axis moves fastest.
    let mut fstride = vec![1usize; r];
    for k in 1..r {
        fstride[k] = fstride[k - 1] * shape[k - 1];
    }
    let mut out = Vec::with_capacity(v.len());
    let mut idx = vec![0usize; r];
    for _ in 0..v.len() {
        let src: usize = idx.iter().zip(&fstride).map(|(i, s)| i * s).sum();
        out.push(v[src]);
        for k in (0..r).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

/// Writes float32 and int64 tensors as an `.npz` archive (e.g. a dataset `x`, `y`).
pub fn write_npz(path: &Path, arrays: &[(&str, &Tensor)]) -> Result<()> {
    use npyz::WriterBuilder;
    let io = |e: std::io::Error| Error::io(format!("writing {}", path.display()), e);
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut w = npyz::npz::NpzWriter::new(&mut buf);
        for (name, t) in arrays {
            let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
            macro_rules! put {
                ($ty:ty) => {{
                    let mut a = w
                        .array::<$ty>(name, Default::default())
                        .map_err(io)?
                        .default_dtype()
                        .shape(&shape)
                        .begin_nd()
                        .map_err(io)?;
                    a.extend(t.as_slice::<$ty>()?.iter().copied()).map_err(io)?;
                    a.finish().map_err(io)?;
                }};
            }
            match t.dtype() {
                smelt_tensor::DType::F32 => put!(f32),
                smelt_tensor::DType::I64 => put!(i64),
                d => bail!(
                    Unsupported,
                    "npz array `{name}`: writing {d} is not supported"
                ),
            }
        }
    }
    std::fs::write(path, buf.into_inner()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{load_data, nhwc_to_nchw, Layout, Split};
    use npyz::npz::NpzWriter;
    use npyz::{AutoSerialize, Serialize, WriterBuilder};
    use std::path::PathBuf;

    fn put<T: Serialize + AutoSerialize + Copy>(
        w: &mut NpzWriter<std::io::BufWriter<std::fs::File>>,
        name: &str,
        shape: &[u64],
        order: Order,
        v: &[T],
    ) {
        let mut a = w
            .array::<T>(name, Default::default())
            .unwrap()
            .default_dtype()
            .shape(shape)
            .order(order)
            .begin_nd()
            .unwrap();
        a.extend(v.iter().copied()).unwrap();
        a.finish().unwrap();
    }

    fn tmp_npz(
        dir: &tempfile::TempDir,
        f: impl FnOnce(&mut NpzWriter<std::io::BufWriter<std::fs::File>>),
    ) -> PathBuf {
        let p = dir.path().join("d.npz");
        let mut w = NpzWriter::create(&p).unwrap();
        f(&mut w);
        drop(w);
        p
    }

    #[test]
    fn uint8_nhwc_images_with_labels() {
        let dir = tempfile::tempdir().unwrap();
        // [3, 2, 2, 2] NHWC: value = 10*n + 2*pixel + c
        let x: Vec<u8> = (0..3u8)
            .flat_map(|n| (0..4u8).flat_map(move |p| (0..2u8).map(move |c| 10 * n + 2 * p + c)))
            .collect();
        let p = tmp_npz(&dir, |w| {
            put(w, "x", &[3, 2, 2, 2], Order::C, &x);
            put(w, "y", &[3], Order::C, &[4i64, 5, 6]);
        });
        let pre = Preprocess {
            scale: 0.5,
            mean: vec![0.0, 1.0],
            std: vec![1.0, 2.0],
            layout: Layout::Nhwc,
        };
        let d = load_data(&p, Split::Test, Some(2), &pre).unwrap();
        assert_eq!(d.x.shape(), &[2, 2, 2, 2]);
        assert_eq!(d.y.as_deref(), Some(&[4i64, 5][..]));
        let v = d.x.as_slice::<f32>().unwrap();
        // Row 1, pixel 0: raw [10, 11] -> [5, (5.5 - 1) / 2]
        assert_eq!(&v[8..10], &[5.0, 2.25]);

        let nchw = nhwc_to_nchw(d.x.clone()).unwrap();
        assert_eq!(nchw.shape(), &[2, 2, 2, 2]);
        // Sample 0, channel 1: raw 1, 3, 5, 7 -> (x/2 - 1)/2
        assert_eq!(
            &nchw.as_slice::<f32>().unwrap()[4..8],
            &[-0.25, 0.25, 0.75, 1.25]
        );
    }

    #[test]
    fn float_x_without_labels_and_fortran_order() {
        let dir = tempfile::tempdir().unwrap();
        // Logical [[1, 2, 3], [4, 5, 6]] stored column-major.
        let p = tmp_npz(&dir, |w| {
            put(
                w,
                "x",
                &[2, 3],
                Order::Fortran,
                &[1.0f64, 4.0, 2.0, 5.0, 3.0, 6.0],
            )
        });
        let d = load_npz(&p, None, &Preprocess::default()).unwrap();
        assert!(d.y.is_none());
        assert_eq!(d.x.shape(), &[2, 3]);
        assert_eq!(
            d.x.as_slice::<f32>().unwrap(),
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );

        let p = tmp_npz(&dir, |w| put(w, "x", &[4], Order::C, &[-1i16, 2, 3, 4]));
        let d = load_npz(&p, Some(2), &Preprocess::default()).unwrap();
        assert_eq!(d.x.shape(), &[2]);
        assert_eq!(d.x.as_slice::<f32>().unwrap(), &[-1.0, 2.0]);
    }

    #[test]
    fn npz_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = tmp_npz(&dir, |w| put(w, "images", &[2], Order::C, &[1.0f32, 2.0]));
        let e = load_npz(&p, None, &Preprocess::default()).unwrap_err();
        assert!(matches!(e, Error::Input(_)));
        assert!(
            e.to_string().contains("no array named `x` (found: images)"),
            "{e}"
        );
        assert!(e.to_string().contains("d.npz"), "{e}");

        let p = tmp_npz(&dir, |w| {
            put(w, "x", &[2, 1], Order::C, &[1.0f32, 2.0]);
            put(w, "y", &[3], Order::C, &[1u8, 2, 3]);
        });
        let e = load_npz(&p, None, &Preprocess::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("`x` has 2 rows but `y` has 3 labels"),
            "{e}"
        );

        let p = tmp_npz(&dir, |w| {
            put(w, "x", &[2, 1], Order::C, &[1.0f32, 2.0]);
            put(w, "y", &[2], Order::C, &[1.0f32, 2.0]);
        });
        let e = load_npz(&p, None, &Preprocess::default()).unwrap_err();
        assert!(e.to_string().contains("labels must be integers"), "{e}");

        let p = tmp_npz(&dir, |w| put(w, "x", &[0, 3], Order::C, &[] as &[f32]));
        let e = load_npz(&p, None, &Preprocess::default()).unwrap_err();
        assert!(e.to_string().contains("dataset is empty"), "{e}");

        let bad = dir.path().join("bad.npz");
        std::fs::write(&bad, b"not a zip").unwrap();
        assert!(load_npz(&bad, None, &Preprocess::default()).is_err());
    }

    #[test]
    fn lying_header_is_an_error_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lie.npz");
        let mut w = NpzWriter::create(&p).unwrap();
        {
            use std::io::Write;
            let z = w.zip_writer();
            z.start_file("x.npy", Default::default()).unwrap();
            let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 4), }";
            let mut h = header.to_string();
            while (11 + h.len()) & 63 != 0 {
                h.push(' ');
            }
            h.push('\n');
            let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
            bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
            bytes.extend_from_slice(h.as_bytes());
            bytes.extend_from_slice(&[0u8; 16]);
            z.write_all(&bytes).unwrap();
        }
        drop(w);
        let e = load_npz(&p, None, &Preprocess::default()).unwrap_err();
        assert!(e.to_string().contains("array `x`"), "{e}");
    }
}
