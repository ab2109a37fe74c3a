//! Tensors to and from numpy's .npy files (for `smelt run` and cross-checks with onnxruntime).

use npyz::WriterBuilder;
use smelt_tensor::{bail, Data, Error, Result, Tensor};
use std::path::Path;

pub fn read(path: &Path) -> Result<Tensor> {
    let io = |e: std::io::Error| Error::io(format!("reading {}", path.display()), e);
    let bytes = std::fs::read(path).map_err(io)?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| {
        // The header parser's message is a multi-line source excerpt; its first line says it.
        let e = e.to_string();
        let first = e.lines().next().unwrap_or_default().trim_end_matches(':');
        Error::Input(format!("{}: not a .npy file: {first}", path.display()))
    })?;
    if npy.order() != npyz::Order::C {
        bail!(
            Input,
            "{}: Fortran-ordered arrays are not supported",
            path.display()
        );
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    smelt_tensor::checked_numel(&shape, smelt_tensor::max_elements())?;
    let descr = npy.dtype().descr();
    let data = match descr.trim_matches('\'').trim_start_matches(['<', '|', '=']) {
        "f4" => Data::F32(npy.into_vec().map_err(io)?),
        "f8" => Data::F64(npy.into_vec().map_err(io)?),
        "i8" => Data::I64(npy.into_vec().map_err(io)?),
        "i4" => Data::I32(npy.into_vec().map_err(io)?),
        "i2" => Data::I16(npy.into_vec().map_err(io)?),
        "i1" => Data::I8(npy.into_vec().map_err(io)?),
        "u8" => Data::U64(npy.into_vec().map_err(io)?),
        "u4" => Data::U32(npy.into_vec().map_err(io)?),
        "u2" => Data::U16(npy.into_vec().map_err(io)?),
        "u1" => Data::U8(npy.into_vec().map_err(io)?),
        "b1" => Data::Bool(
            npy.into_vec::<u8>()
                .map_err(io)?
                .into_iter()
                .map(|b| b != 0)
                .collect(),
        ),
        other => bail!(Unsupported, "{}: numpy dtype {other:?}", path.display()),
    };
    Tensor::new(shape, data)
}

/// Writes atomically: a temporary file in the same folder, renamed when complete.
pub fn write(path: &Path, t: &Tensor) -> Result<()> {
    let io = |e: std::io::Error| Error::io(format!("writing {}", path.display()), e);
    let tmp = path.with_extension("npy.tmp");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
        macro_rules! put {
            ($v:expr) => {{
                let mut w = npyz::WriteOptions::new()
                    .default_dtype()
                    .shape(&shape)
                    .writer(&mut f)
                    .begin_nd()
                    .map_err(io)?;
                w.extend($v.iter().copied()).map_err(io)?;
                w.finish().map_err(io)?;
            }};
        }
        match t.data() {
            Data::F32(v) => put!(v),
            Data::F64(v) => put!(v),
            Data::I64(v) => put!(v),
            Data::I32(v) => put!(v),
            Data::I16(v) => put!(v),
            Data::I8(v) => put!(v),
            Data::U64(v) => put!(v),
            Data::U32(v) => put!(v),
            Data::U16(v) => put!(v),
            Data::U8(v) => put!(v),
            Data::Bool(v) => put!(v.iter().map(|&b| b as u8).collect::<Vec<u8>>()),
            _ => {
                let f32s = t.to_f32_vec()?;
                put!(f32s)
            }
        }
    }
    std::fs::rename(&tmp, path).map_err(io)
}
