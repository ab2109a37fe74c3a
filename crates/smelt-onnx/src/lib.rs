//! ONNX files <-> the smelt IR.
//!
//! The protobuf types are generated at build time from the vendored ONNX schema
//! (`proto/onnx.proto`). Import validates everything a hostile file could abuse (sizes,
//! negative dims, external data paths) before allocating; export is the exact inverse, so a
//! load/save round trip keeps what onnxruntime needs for bit-identical results.
//!
//! Not carried: model-local functions (ignored on load: models that call them fail later as
//! unknown ops), training info, quantization annotations, sparse initializers (rejected),
//! and non-tensor value types (kept as an unknown type, written back without a type).

mod export;
mod fsutil;
mod import;
pub mod proto;
mod tensor;

use prost::Message;
use smelt_ir::Model;
use smelt_tensor::{bail, max_elements, Error, Result, Tensor};
use std::path::Path;

pub use fsutil::write_atomic;
pub use tensor::{tensor_from_proto, tensor_to_proto};

/// Limits applied while reading, so a malformed or hostile file fails cleanly instead of
/// exhausting memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Largest element count accepted for any one tensor.
    pub max_tensor_elements: usize,
    /// Largest model (protobuf) file accepted, in bytes. External data is bounded per tensor
    /// by `max_tensor_elements` instead.
    pub max_file_bytes: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_tensor_elements: max_elements(),
            max_file_bytes: smelt_tensor::max_file_bytes(),
        }
    }
}

/// Where to put large initializers when saving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalData {
    /// File name relative to the model's folder (no absolute paths, no `..`).
    pub file_name: String,
    /// Initializers of at least this many bytes go to the external file.
    pub size_threshold: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SaveOptions {
    pub external_data: Option<ExternalData>,
}

/// Reads an ONNX model with the default limits.
pub fn load(path: &Path) -> Result<Model> {
    load_with(path, &LoadOptions::default())
}

/// Reads an ONNX model; external data is resolved relative to the model's folder.
pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Model> {
    let bytes = read_limited(path, opts.max_file_bytes)?;
    decode_owned(bytes, Some(fsutil::parent_dir(path)), opts).map_err(|e| e.context(path.display()))
}

/// Decodes a serialized ModelProto. `base_dir` is the folder external data lives in; with
/// `None`, tensors stored externally are an error.
pub fn decode(bytes: &[u8], base_dir: Option<&Path>, opts: &LoadOptions) -> Result<Model> {
    let m = decode_proto(bytes, opts)?;
    let ctx = tensor::Ctx { opts, base_dir };
    import::model_from_proto(m, &ctx)
}

/// [`decode`], freeing the file's bytes once parsed: they, the parsed protobuf and the model
/// would otherwise be three copies of the weights at once.
fn decode_owned(bytes: Vec<u8>, base_dir: Option<&Path>, opts: &LoadOptions) -> Result<Model> {
    let m = decode_proto(&bytes, opts)?;
    drop(bytes);
    let ctx = tensor::Ctx { opts, base_dir };
    import::model_from_proto(m, &ctx)
}

fn decode_proto(bytes: &[u8], opts: &LoadOptions) -> Result<proto::ModelProto> {
    if bytes.len() as u64 > opts.max_file_bytes {
        bail!(
            Limit,
            "model is {} bytes, more than the limit of {}",
            bytes.len(),
            opts.max_file_bytes
        );
    }
    if bytes.is_empty() {
        bail!(Invalid, "the file is empty");
    }
    proto::ModelProto::decode(bytes)
        .map_err(|e| Error::Invalid(format!("not a valid ONNX protobuf: {e}")))
}

/// Serializes a model with all tensors inline.
pub fn encode(model: &Model) -> Result<Vec<u8>> {
    let p = export::model_to_proto(model, &mut None)?;
    check_proto_size(p.encoded_len())?;
    Ok(p.encode_to_vec())
}

/// Writes a model with all tensors inline.
pub fn save(model: &Model, path: &Path) -> Result<()> {
    save_with(model, path, &SaveOptions::default())
}

/// Writes a model, optionally moving large initializers to an external data file. Both files
/// are written under temporary names and renamed into place, the data file first, so the
/// destination never holds a half-written model.
pub fn save_with(model: &Model, path: &Path, opts: &SaveOptions) -> Result<()> {
    let mut ext = match &opts.external_data {
        None => None,
        Some(e) => {
            fsutil::check_relative(&e.file_name, "external data file name")?;
            let dest = fsutil::parent_dir(path).join(&e.file_name);
            let model_dest = path.file_name().map(|n| fsutil::parent_dir(path).join(n));
            if model_dest.as_deref() == Some(dest.as_path()) {
                bail!(
                    Input,
                    "the external data file '{}' would overwrite the model itself",
                    e.file_name
                );
            }
            Some(export::ExtWriter {
                file: fsutil::TempFile::create(&dest)?,
                location: e.file_name.clone(),
                threshold: e.size_threshold,
                pos: 0,
                written: 0,
            })
        }
    };
    let p = export::model_to_proto(model, &mut ext)?;
    check_proto_size(p.encoded_len())?;
    let bytes = p.encode_to_vec();
    drop(p);
    let mut model_file = fsutil::TempFile::create(path)?;
    model_file.write_all(&bytes)?;
    model_file.finish()?;
    if let Some(w) = ext {
        // An empty data file is not created: no tensor reached the threshold.
        if w.written > 0 {
            w.file.commit()?;
        }
    }
    model_file.commit()
}

fn check_proto_size(n: usize) -> Result<()> {
    if n > i32::MAX as usize {
        bail!(
            Limit,
            "the model would be {n} bytes, over protobuf's 2 GiB limit; save it with external data"
        );
    }
    Ok(())
}

fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    if meta.len() > max {
        bail!(
            Limit,
            "{} is {} bytes, more than the limit of {max}",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))
}

/// Reads a serialized TensorProto (`.pb`), as the ONNX test data sets store inputs/outputs.
pub fn load_tensor(path: &Path) -> Result<Tensor> {
    let opts = LoadOptions::default();
    let bytes = read_limited(path, opts.max_file_bytes)?;
    let inner = || -> Result<Tensor> {
        let p = proto::TensorProto::decode(bytes.as_slice())
            .map_err(|e| Error::Invalid(format!("not a valid TensorProto: {e}")))?;
        tensor::from_proto(
            &p,
            &tensor::Ctx {
                opts: &opts,
                base_dir: Some(fsutil::parent_dir(path)),
            },
        )
    };
    inner().map_err(|e| e.context(path.display()))
}

/// Writes `t` as a serialized TensorProto named `name`.
pub fn save_tensor(t: &Tensor, name: &str, path: &Path) -> Result<()> {
    let p = tensor_to_proto(t, name);
    check_proto_size(p.encoded_len())?;
    fsutil::write_atomic(path, &p.encode_to_vec())
}
