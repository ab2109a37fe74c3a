//! `TensorProto` <-> `Tensor`. Every size read from a file is checked against the element limit
//! and against the bytes actually present before anything is allocated for it.

use crate::fsutil::resolve_inside;
use crate::proto::{tensor_proto, StringStringEntryProto, TensorProto};
use crate::LoadOptions;
use smelt_tensor::{
    bail, bf16, checked_numel, f16, pack_sub_byte, unpack_sub_byte, DType, Data, Error, Result,
    Tensor,
};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// What decoding a tensor may need besides the proto itself.
pub(crate) struct Ctx<'a> {
    pub opts: &'a LoadOptions,
    /// The model's folder, for external data. `None` forbids external data.
    pub base_dir: Option<&'a Path>,
}

/// Converts a `TensorProto` holding its data inline (raw_data or the typed fields) with the
/// default limits. Tensors with external data need [`crate::load`], which knows the folder.
pub fn tensor_from_proto(p: &TensorProto) -> Result<Tensor> {
    let opts = LoadOptions::default();
    from_proto(
        p,
        &Ctx {
            opts: &opts,
            base_dir: None,
        },
    )
}

/// Converts a tensor to a `TensorProto` with its data in raw_data (strings in string_data).
pub fn tensor_to_proto(t: &Tensor, name: &str) -> TensorProto {
    let mut p = header(t, name);
    match t.data() {
        Data::Str(s) => p.string_data = s.iter().map(|x| x.as_bytes().to_vec()).collect(),
        d => p.raw_data = Some(raw_bytes(d)),
    }
    p
}

/// A `TensorProto` with name, dims and data type but no data.
pub(crate) fn header(t: &Tensor, name: &str) -> TensorProto {
    TensorProto {
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(t.dtype().onnx_code()),
        name: (!name.is_empty()).then(|| name.to_string()),
        ..Default::default()
    }
}

pub(crate) fn tensor_label(p: &TensorProto) -> String {
    match p.name.as_deref() {
        Some(n) if !n.is_empty() => format!("tensor '{n}'"),
        _ => "unnamed tensor".to_string(),
    }
}

pub(crate) fn from_proto(p: &TensorProto, ctx: &Ctx) -> Result<Tensor> {
    decode(p, ctx).map_err(|e| e.context(tensor_label(p)))
}

fn decode(p: &TensorProto, ctx: &Ctx) -> Result<Tensor> {
    let code = p.data_type.unwrap_or(0);
    let Some(dtype) = DType::from_onnx(code) else {
        return Err(dtype_error(code));
    };
    if p.segment.is_some() {
        bail!(Unsupported, "segmented tensors are not supported");
    }
    let shape = dims_to_shape(&p.dims)?;
    let n = checked_numel(&shape, ctx.opts.max_tensor_elements)?;
    let external = p.data_location == Some(tensor_proto::DataLocation::External as i32);
    let data = if external {
        if dtype == DType::Str {
            bail!(Invalid, "string tensors cannot use external data");
        }
        let bytes = read_external(&p.external_data, ctx, byte_len(n, dtype)?)?;
        from_raw(dtype, &bytes, n)?
    } else {
        let typed = typed_len(p, dtype);
        match &p.raw_data {
            Some(raw) if dtype != DType::Str && (!raw.is_empty() || typed == 0) => {
                from_raw(dtype, raw, n)?
            }
            _ if typed == 0 && n > 0 => {
                bail!(
                    Invalid,
                    "shape {shape:?} needs {n} elements but the tensor holds no data"
                )
            }
            _ => from_typed(p, dtype, n)?,
        }
    };
    Tensor::new(shape, data)
}

/// An error for a data type code smelt cannot hold, naming the ONNX type.
pub(crate) fn dtype_error(code: i32) -> Error {
    match tensor_proto::DataType::try_from(code) {
        Ok(tensor_proto::DataType::Undefined) => Error::Invalid("data type is UNDEFINED".into()),
        Ok(d) => Error::Unsupported(format!(
            "data type {code} ({}) is not supported",
            d.as_str_name()
        )),
        Err(_) => Error::Invalid(format!("unknown data type code {code}")),
    }
}

fn dims_to_shape(dims: &[i64]) -> Result<Vec<usize>> {
    dims.iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| Error::Invalid(format!("negative dimension {d} in dims {dims:?}")))
        })
        .collect()
}

/// Bytes `n` elements of `dtype` take in raw or external data (sub-byte types packed).
fn byte_len(n: usize, dtype: DType) -> Result<usize> {
    dtype
        .packed_bytes(n)
        .ok_or_else(|| Error::Limit(format!("{n} elements of {dtype} overflow the byte count")))
}

fn typed_len(p: &TensorProto, dtype: DType) -> usize {
    match dtype {
        DType::F32 => p.float_data.len(),
        DType::F64 => p.double_data.len(),
        DType::I64 => p.int64_data.len(),
        DType::U32 | DType::U64 => p.uint64_data.len(),
        DType::Str => p.string_data.len(),
        _ => p.int32_data.len(),
    }
}

fn le<T, const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    b.chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}

fn from_raw(dtype: DType, b: &[u8], n: usize) -> Result<Data> {
    let want = byte_len(n, dtype)?;
    if b.len() != want {
        bail!(
            Invalid,
            "raw data has {} bytes, but {n} elements of {dtype} need {want}",
            b.len()
        );
    }
    Ok(match dtype {
        DType::F32 => Data::F32(le(b, f32::from_le_bytes)),
        DType::F64 => Data::F64(le(b, f64::from_le_bytes)),
        DType::F16 => Data::F16(le(b, |a| f16::from_bits(u16::from_le_bytes(a)))),
        DType::BF16 => Data::BF16(le(b, |a| bf16::from_bits(u16::from_le_bytes(a)))),
        DType::I8 => Data::I8(b.iter().map(|&x| x as i8).collect()),
        DType::U8 => Data::U8(b.to_vec()),
        DType::I16 => Data::I16(le(b, i16::from_le_bytes)),
        DType::U16 => Data::U16(le(b, u16::from_le_bytes)),
        DType::I32 => Data::I32(le(b, i32::from_le_bytes)),
        DType::I64 => Data::I64(le(b, i64::from_le_bytes)),
        DType::U32 => Data::U32(le(b, u32::from_le_bytes)),
        DType::U64 => Data::U64(le(b, u64::from_le_bytes)),
        DType::Bool => Data::Bool(b.iter().map(|&x| x != 0).collect()),
        DType::I4 | DType::U4 | DType::I2 | DType::U2 => unpack_sub_byte(dtype, b, n)?,
        DType::Str => bail!(Invalid, "string tensors cannot use raw data"),
    })
}

fn from_typed(p: &TensorProto, dtype: DType, n: usize) -> Result<Data> {
    let (field, len) = match dtype {
        DType::F32 => ("float_data", p.float_data.len()),
        DType::F64 => ("double_data", p.double_data.len()),
        DType::I64 => ("int64_data", p.int64_data.len()),
        DType::U32 | DType::U64 => ("uint64_data", p.uint64_data.len()),
        DType::Str => ("string_data", p.string_data.len()),
        _ => ("int32_data", p.int32_data.len()),
    };
    // Sub-byte types keep one packed byte per int32 entry (two int4 or four int2 elements).
    let want = if dtype.is_sub_byte() {
        byte_len(n, dtype)?
    } else {
        n
    };
    if len != want {
        if dtype.is_sub_byte() {
            bail!(
                Invalid,
                "{field} has {len} values, but {n} elements of {dtype} need {want} packed bytes"
            );
        }
        bail!(Invalid, "{field} has {len} values, but the shape needs {n}");
    }
    let i32s = &p.int32_data;
    // Narrow types are stored widened to int32 (f16/bf16 as their bit patterns); truncating
    // casts recover them.
    Ok(match dtype {
        DType::F32 => Data::F32(p.float_data.clone()),
        DType::F64 => Data::F64(p.double_data.clone()),
        DType::I64 => Data::I64(p.int64_data.clone()),
        DType::U64 => Data::U64(p.uint64_data.clone()),
        DType::U32 => Data::U32(p.uint64_data.iter().map(|&x| x as u32).collect()),
        DType::I32 => Data::I32(i32s.clone()),
        DType::I16 => Data::I16(i32s.iter().map(|&x| x as i16).collect()),
        DType::U16 => Data::U16(i32s.iter().map(|&x| x as u16).collect()),
        DType::I8 => Data::I8(i32s.iter().map(|&x| x as i8).collect()),
        DType::U8 => Data::U8(i32s.iter().map(|&x| x as u8).collect()),
        DType::Bool => Data::Bool(i32s.iter().map(|&x| x != 0).collect()),
        DType::F16 => Data::F16(i32s.iter().map(|&x| f16::from_bits(x as u16)).collect()),
        DType::BF16 => Data::BF16(i32s.iter().map(|&x| bf16::from_bits(x as u16)).collect()),
        DType::I4 | DType::U4 | DType::I2 | DType::U2 => {
            let bytes: Vec<u8> = i32s.iter().map(|&x| x as u8).collect();
            unpack_sub_byte(dtype, &bytes, n)?
        }
        DType::Str => Data::Str(
            p.string_data
                .iter()
                .map(|s| {
                    String::from_utf8(s.clone())
                        .map_err(|_| Error::Unsupported("a string element is not UTF-8".into()))
                })
                .collect::<Result<_>>()?,
        ),
    })
}

/// Little-endian bytes of a numeric tensor's elements, as ONNX raw_data stores them.
pub(crate) fn raw_bytes(d: &Data) -> Vec<u8> {
    fn flat<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        let mut out = Vec::with_capacity(v.len() * N);
        for &x in v {
            out.extend_from_slice(&f(x));
        }
        out
    }
    match d {
        Data::F32(v) => flat(v, f32::to_le_bytes),
        Data::F64(v) => flat(v, f64::to_le_bytes),
        Data::F16(v) => flat(v, |x| x.to_bits().to_le_bytes()),
        Data::BF16(v) => flat(v, |x| x.to_bits().to_le_bytes()),
        Data::I8(v) => v.iter().map(|&x| x as u8).collect(),
        Data::U8(v) => v.clone(),
        Data::I16(v) => flat(v, i16::to_le_bytes),
        Data::U16(v) => flat(v, u16::to_le_bytes),
        Data::I32(v) => flat(v, i32::to_le_bytes),
        Data::I64(v) => flat(v, i64::to_le_bytes),
        Data::U32(v) => flat(v, u32::to_le_bytes),
        Data::U64(v) => flat(v, u64::to_le_bytes),
        Data::Bool(v) => v.iter().map(|&x| x as u8).collect(),
        Data::I4(_) | Data::U4(_) | Data::I2(_) | Data::U2(_) => {
            pack_sub_byte(d).unwrap_or_default()
        }
        Data::Str(_) => Vec::new(),
    }
}

/// Reads `want` bytes of external data described by the location/offset/length entries.
fn read_external(entries: &[StringStringEntryProto], ctx: &Ctx, want: usize) -> Result<Vec<u8>> {
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for kv in entries {
        let value = kv.value.as_deref().unwrap_or("");
        let parse = |what: &str| {
            value.parse::<u64>().map_err(|_| {
                Error::Invalid(format!("external data {what} '{value}' is not a number"))
            })
        };
        match kv.key.as_deref().unwrap_or("") {
            "location" => location = Some(value),
            "offset" => offset = parse("offset")?,
            "length" => length = Some(parse("length")?),
            _ => {}
        }
    }
    let Some(location) = location else {
        bail!(Invalid, "external data has no location");
    };
    let Some(base) = ctx.base_dir else {
        bail!(
            Invalid,
            "external data file '{location}' cannot be read: the model was not loaded from a file"
        );
    };
    let path = resolve_inside(base, location, "external data path")?;
    let mut f = File::open(&path).map_err(|e| {
        Error::io(
            format!("cannot open external data file {}", path.display()),
            e,
        )
    })?;
    let file_len = f
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?
        .len();
    let len = length.unwrap_or(want as u64);
    if len != want as u64 {
        bail!(
            Invalid,
            "external data length {len} does not match the {want} bytes the shape needs"
        );
    }
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        bail!(
            Invalid,
            "external data at offset {offset} with length {len} runs past the end of '{location}' ({file_len} bytes)"
        );
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io(format!("cannot seek in {}", path.display()), e))?;
    let mut buf = vec![0u8; want];
    f.read_exact(&mut buf)
        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto(dt: DType, dims: Vec<i64>) -> TensorProto {
        TensorProto {
            dims,
            data_type: Some(dt.onnx_code()),
            name: Some("t".into()),
            ..Default::default()
        }
    }

    #[test]
    fn typed_fields_decode_narrow_types() {
        let mut p = proto(DType::F16, vec![2]);
        p.int32_data = vec![0x3c00, 0xc000]; // 1.0, -2.0
        let t = tensor_from_proto(&p).unwrap();
        assert_eq!(t.to_f32_vec().unwrap(), vec![1.0, -2.0]);

        let mut p = proto(DType::I8, vec![3]);
        p.int32_data = vec![-128, 5, 127];
        let t = tensor_from_proto(&p).unwrap();
        assert_eq!(t.as_slice::<i8>().unwrap(), &[-128, 5, 127]);

        let mut p = proto(DType::U32, vec![1]);
        p.uint64_data = vec![4_000_000_000];
        assert_eq!(
            tensor_from_proto(&p).unwrap().as_slice::<u32>().unwrap(),
            &[4_000_000_000]
        );

        let mut p = proto(DType::Bool, vec![2, 1]);
        p.int32_data = vec![1, 0];
        let t = tensor_from_proto(&p).unwrap();
        assert_eq!(t.shape(), &[2, 1]);
        assert_eq!(t.as_slice::<bool>().unwrap(), &[true, false]);
    }

    #[test]
    fn raw_data_round_trips_every_dtype() {
        let ts = vec![
            Tensor::from_vec(vec![2], vec![1.5f32, -0.0]).unwrap(),
            Tensor::from_vec(vec![1], vec![f64::MIN_POSITIVE]).unwrap(),
            Tensor::from_vec(vec![2], vec![f16::from_f32(0.5), f16::NAN]).unwrap(),
            Tensor::from_vec(vec![1], vec![bf16::from_f32(-3.0)]).unwrap(),
            Tensor::from_vec(vec![2], vec![-1i8, 7]).unwrap(),
            Tensor::from_vec(vec![2], vec![255u8, 0]).unwrap(),
            Tensor::from_vec(vec![1], vec![-300i16]).unwrap(),
            Tensor::from_vec(vec![1], vec![65535u16]).unwrap(),
            Tensor::from_vec(vec![1], vec![i32::MIN]).unwrap(),
            Tensor::from_vec(vec![1, 1], vec![i64::MAX]).unwrap(),
            Tensor::from_vec(vec![1], vec![u32::MAX]).unwrap(),
            Tensor::from_vec(vec![1], vec![u64::MAX]).unwrap(),
            Tensor::from_vec(vec![3], vec![true, false, true]).unwrap(),
            Tensor::new(vec![2], Data::Str(vec!["a".into(), "hé".into()])).unwrap(),
            Tensor::from_vec(vec![0, 3], Vec::<f32>::new()).unwrap(),
            Tensor::scalar(42i64),
        ];
        for t in ts {
            let p = tensor_to_proto(&t, "x");
            let back = tensor_from_proto(&p).unwrap();
            // Compare bit patterns so NaN payloads count.
            assert_eq!(raw_bytes(back.data()), raw_bytes(t.data()), "{t:?}");
            assert_eq!(back.shape(), t.shape());
            assert_eq!(back.dtype(), t.dtype());
        }
        let p = tensor_to_proto(&Tensor::from_vec(vec![2], vec![1.0f32, 2.0]).unwrap(), "w");
        assert_eq!(
            p.raw_data.as_deref(),
            Some(&[0, 0, 128, 63, 0, 0, 0, 64][..])
        );
    }

    #[test]
    fn rejects_mismatched_sizes_and_unknown_types() {
        let mut p = proto(DType::F32, vec![3]);
        p.raw_data = Some(vec![0; 8]);
        let e = tensor_from_proto(&p).unwrap_err().to_string();
        assert!(e.contains("8 bytes") && e.contains("need 12"), "{e}");

        let mut p = proto(DType::F32, vec![2]);
        p.float_data = vec![1.0];
        let e = tensor_from_proto(&p).unwrap_err().to_string();
        assert!(e.contains("float_data has 1 values"), "{e}");

        let p = proto(DType::F32, vec![4]);
        let e = tensor_from_proto(&p).unwrap_err().to_string();
        assert!(e.contains("no data"), "{e}");

        let mut p = proto(DType::F32, vec![1]);
        p.data_type = Some(17);
        let e = tensor_from_proto(&p).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("FLOAT8E4M3FN"), "{e}");
    }

    #[test]
    fn huge_and_negative_dims_fail_before_allocating() {
        let mut p = proto(DType::F32, vec![1 << 40]);
        p.raw_data = Some(vec![0; 4]);
        let e = tensor_from_proto(&p).unwrap_err();
        assert!(matches!(e, Error::Limit(_)), "{e}");
        assert!(e.to_string().contains("1099511627776"), "{e}");

        let mut p = proto(DType::F32, vec![2, -1]);
        p.raw_data = Some(vec![]);
        let e = tensor_from_proto(&p).unwrap_err().to_string();
        assert!(e.contains("negative dimension -1"), "{e}");
    }

    fn ints(dt: DType, v: &[i64]) -> Tensor {
        Tensor::new(vec![v.len()], Data::from_ints(dt, v).unwrap()).unwrap()
    }

    #[test]
    fn sub_byte_raw_data_is_packed_low_bits_first() {
        let cases: [(DType, &[i64], &[u8]); 5] = [
            (DType::I4, &[0, 1, 7, -4, -8], &[0x10, 0xc7, 0x08]),
            (DType::U4, &[15, 0, 9, 3], &[0x0f, 0x39]),
            (DType::I2, &[-2, 1, -1, 0, 1], &[0b0011_0110, 0b01]),
            (DType::U2, &[0, 1, 2, 3], &[0b1110_0100]),
            (DType::I4, &[], &[]),
        ];
        for (dt, vals, bytes) in cases {
            let t = ints(dt, vals);
            let p = tensor_to_proto(&t, "w");
            assert_eq!(p.data_type, Some(dt.onnx_code()));
            assert_eq!(p.raw_data.as_deref(), Some(bytes), "{dt}");
            let back = tensor_from_proto(&p).unwrap();
            assert_eq!(back, t);
            assert_eq!(back.to_i64_vec().unwrap(), vals);
        }
    }

    #[test]
    fn sub_byte_int32_data_holds_one_packed_byte_per_entry() {
        // The ONNX suite's DequantizeLinear int4 input: [0, 1, 7, -4, -8] as 16, 199, 8.
        let mut p = proto(DType::I4, vec![5]);
        p.int32_data = vec![16, 199, 8];
        let t = tensor_from_proto(&p).unwrap();
        assert_eq!(t.dtype(), DType::I4);
        assert_eq!(t.to_i64_vec().unwrap(), vec![0, 1, 7, -4, -8]);
        let mut p = proto(DType::U4, vec![5]);
        p.int32_data = vec![16, 167, 15];
        assert_eq!(
            tensor_from_proto(&p).unwrap().to_i64_vec().unwrap(),
            vec![0, 1, 7, 10, 15]
        );
        let mut p = proto(DType::U2, vec![4]);
        p.int32_data = vec![228];
        assert_eq!(
            tensor_from_proto(&p).unwrap().to_i64_vec().unwrap(),
            vec![0, 1, 2, 3]
        );
        // One value per entry is not the packed layout: refused, not misread.
        let mut p = proto(DType::I4, vec![3]);
        p.int32_data = vec![1, 2, 3];
        let e = tensor_from_proto(&p).unwrap_err().to_string();
        assert!(
            e.contains("int32_data has 3 values") && e.contains("need 2 packed"),
            "{e}"
        );
    }

    #[test]
    fn sub_byte_sizes_are_checked() {
        let mut p = proto(DType::I4, vec![5]);
        p.raw_data = Some(vec![0; 5]);
        let e = tensor_from_proto(&p).unwrap_err().to_string();
        assert!(e.contains("5 bytes") && e.contains("need 3"), "{e}");
        let mut p = proto(DType::U2, vec![1 << 40]);
        p.raw_data = Some(vec![0; 4]);
        assert!(matches!(
            tensor_from_proto(&p).unwrap_err(),
            Error::Limit(_)
        ));
    }

    #[test]
    fn int4_initializers_survive_encode_decode_and_external_data() {
        use smelt_ir::{Graph, Model, OpsetImport};
        let vals: Vec<i64> = (0..3001).map(|i| (i * 7 % 16) - 8).collect();
        let w = Tensor::new(vec![3001], Data::from_ints(DType::I4, &vals).unwrap()).unwrap();
        let small = ints(DType::U4, &[3, 15, 0]);
        let mut m = Model {
            ir_version: 10,
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: 21,
            }],
            producer_name: String::new(),
            producer_version: String::new(),
            domain: String::new(),
            model_version: 0,
            doc_string: String::new(),
            metadata: vec![],
            graph: Graph::default(),
        };
        m.graph.initializers.insert("w".into(), w.clone());
        m.graph.initializers.insert("zp".into(), small.clone());
        m.graph
            .nodes
            .push(smelt_ir::Node::new("Identity", "id", &["w"], &["y"]));
        m.graph.outputs.push(smelt_ir::ValueInfo::new(
            "y",
            DType::I4,
            vec![smelt_ir::Dim::Fixed(3001)],
        ));
        let bytes = crate::encode(&m).unwrap();
        let back = crate::decode(&bytes, None, &LoadOptions::default()).unwrap();
        assert_eq!(back.graph.initializers["w"], w);
        assert_eq!(back.graph.initializers["zp"], small);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let opts = crate::SaveOptions {
            external_data: Some(crate::ExternalData {
                file_name: "m.bin".into(),
                size_threshold: 1000,
            }),
        };
        crate::save_with(&m, &path, &opts).unwrap();
        // 3001 int4 values pack into 1501 bytes; the 3-element zero point stays inline.
        let len = std::fs::metadata(dir.path().join("m.bin")).unwrap().len();
        assert_eq!(len, 1501);
        let back = crate::load(&path).unwrap();
        assert_eq!(back.graph.initializers["w"], w);
        assert_eq!(back.graph.initializers["zp"], small);
    }

    #[test]
    fn external_data_without_a_folder_is_an_error() {
        let mut p = proto(DType::F32, vec![1]);
        p.data_location = Some(tensor_proto::DataLocation::External as i32);
        p.external_data = vec![StringStringEntryProto {
            key: Some("location".into()),
            value: Some("w.bin".into()),
        }];
        let e = tensor_from_proto(&p).unwrap_err().to_string();
        assert!(e.contains("not loaded from a file"), "{e}");
    }
}
