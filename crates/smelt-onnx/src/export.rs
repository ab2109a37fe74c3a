//! `Model` -> ModelProto, the inverse of `import`.

use crate::fsutil::TempFile;
use crate::proto::{
    attribute_proto::AttributeType, tensor_proto, tensor_shape_proto, type_proto, AttributeProto,
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::tensor::{header, raw_bytes, tensor_to_proto};
use smelt_ir::{Attr, Dim, Graph, Model, Node, ValueInfo};
use smelt_tensor::{DType, Result, Tensor};

/// Collects large initializers into one external data file while the proto is built.
pub(crate) struct ExtWriter {
    pub file: TempFile,
    /// The location written into the model (relative to its folder).
    pub location: String,
    pub threshold: usize,
    pub pos: u64,
    pub written: usize,
}

impl ExtWriter {
    /// Appends `bytes` at an aligned offset and returns the entries pointing at them.
    fn append(&mut self, bytes: &[u8]) -> Result<Vec<StringStringEntryProto>> {
        // Page-align big tensors so runtimes can memory-map them; small ones pack tightly.
        let align: u64 = if bytes.len() >= 1 << 20 { 4096 } else { 64 };
        let pad = (align - self.pos % align) % align;
        if pad > 0 {
            self.file.write_all(&vec![0u8; pad as usize])?;
            self.pos += pad;
        }
        let offset = self.pos;
        self.file.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        self.written += 1;
        let kv = |k: &str, v: String| StringStringEntryProto {
            key: Some(k.to_string()),
            value: Some(v),
        };
        Ok(vec![
            kv("location", self.location.clone()),
            kv("offset", offset.to_string()),
            kv("length", bytes.len().to_string()),
        ])
    }
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

pub(crate) fn model_to_proto(m: &Model, ext: &mut Option<ExtWriter>) -> Result<ModelProto> {
    Ok(ModelProto {
        ir_version: Some(m.ir_version),
        opset_import: m
            .opsets
            .iter()
            .map(|o| OperatorSetIdProto {
                domain: Some(o.domain.clone()),
                version: Some(o.version),
            })
            .collect(),
        producer_name: opt(&m.producer_name),
        producer_version: opt(&m.producer_version),
        domain: opt(&m.domain),
        model_version: (m.model_version != 0).then_some(m.model_version),
        doc_string: opt(&m.doc_string),
        graph: Some(graph_to_proto(&m.graph, ext)?),
        metadata_props: m
            .metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: Some(k.clone()),
                value: Some(v.clone()),
            })
            .collect(),
        ..Default::default()
    })
}

fn graph_to_proto(g: &Graph, ext: &mut Option<ExtWriter>) -> Result<GraphProto> {
    let initializer = g
        .initializers
        .iter()
        .map(|(name, t)| initializer_to_proto(name, t, ext))
        .collect::<Result<_>>()?;
    Ok(GraphProto {
        node: g
            .nodes
            .iter()
            .map(|n| node_to_proto(n, ext))
            .collect::<Result<_>>()?,
        name: Some(g.name.clone()),
        initializer,
        doc_string: opt(&g.doc_string),
        input: g.inputs.iter().map(value_info_to_proto).collect(),
        output: g.outputs.iter().map(value_info_to_proto).collect(),
        value_info: g.value_info.iter().map(value_info_to_proto).collect(),
        ..Default::default()
    })
}

fn initializer_to_proto(
    name: &str,
    t: &Tensor,
    ext: &mut Option<ExtWriter>,
) -> Result<crate::proto::TensorProto> {
    if let Some(w) = ext.as_mut() {
        let bytes = t.dtype().packed_bytes(t.numel()).unwrap_or(usize::MAX);
        if t.dtype() != DType::Str && bytes > 0 && bytes >= w.threshold {
            let mut p = header(t, name);
            p.external_data = w.append(&raw_bytes(t.data()))?;
            p.data_location = Some(tensor_proto::DataLocation::External as i32);
            return Ok(p);
        }
    }
    Ok(tensor_to_proto(t, name))
}

fn node_to_proto(n: &Node, ext: &mut Option<ExtWriter>) -> Result<NodeProto> {
    Ok(NodeProto {
        input: n.inputs.clone(),
        output: n.outputs.clone(),
        name: opt(&n.name),
        op_type: Some(n.op_type.clone()),
        domain: opt(&n.domain),
        attribute: n
            .attrs
            .iter()
            .map(|(k, v)| attr_to_proto(k, v, ext))
            .collect::<Result<_>>()?,
        doc_string: opt(&n.doc_string),
        ..Default::default()
    })
}

fn attr_to_proto(name: &str, v: &Attr, ext: &mut Option<ExtWriter>) -> Result<AttributeProto> {
    let mut a = AttributeProto {
        name: Some(name.to_string()),
        ..Default::default()
    };
    let ty = match v {
        Attr::Float(x) => {
            a.f = Some(*x);
            AttributeType::Float
        }
        Attr::Int(x) => {
            a.i = Some(*x);
            AttributeType::Int
        }
        Attr::String(x) => {
            a.s = Some(x.clone());
            AttributeType::String
        }
        Attr::Tensor(t) => {
            a.t = Some(tensor_to_proto(t, ""));
            AttributeType::Tensor
        }
        Attr::Graph(g) => {
            a.g = Some(graph_to_proto(g, ext)?);
            AttributeType::Graph
        }
        Attr::Floats(x) => {
            a.floats = x.clone();
            AttributeType::Floats
        }
        Attr::Ints(x) => {
            a.ints = x.clone();
            AttributeType::Ints
        }
        Attr::Strings(x) => {
            a.strings = x.clone();
            AttributeType::Strings
        }
        Attr::Tensors(ts) => {
            a.tensors = ts.iter().map(|t| tensor_to_proto(t, "")).collect();
            AttributeType::Tensors
        }
        Attr::Graphs(gs) => {
            a.graphs = gs
                .iter()
                .map(|g| graph_to_proto(g, ext))
                .collect::<Result<_>>()?;
            AttributeType::Graphs
        }
    };
    a.r#type = Some(ty as i32);
    Ok(a)
}

fn value_info_to_proto(v: &ValueInfo) -> ValueInfoProto {
    let r#type = if v.dtype.is_none() && v.shape.is_none() {
        None
    } else {
        let shape = v.shape.as_ref().map(|dims| TensorShapeProto {
            dim: dims
                .iter()
                .map(|d| tensor_shape_proto::Dimension {
                    value: match d {
                        Dim::Fixed(x) => {
                            Some(tensor_shape_proto::dimension::Value::DimValue(*x as i64))
                        }
                        Dim::Sym(s) => {
                            Some(tensor_shape_proto::dimension::Value::DimParam(s.clone()))
                        }
                        Dim::Unknown => None,
                    },
                    denotation: None,
                })
                .collect(),
        });
        Some(TypeProto {
            denotation: None,
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: v.dtype.map(DType::onnx_code),
                shape,
            })),
        })
    };
    ValueInfoProto {
        name: Some(v.name.clone()),
        r#type,
        doc_string: opt(&v.doc_string),
        ..Default::default()
    }
}
