//! ModelProto -> `Model`.

use crate::proto::{
    attribute_proto::AttributeType, tensor_shape_proto::dimension, type_proto, AttributeProto,
    GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto,
};
use crate::tensor::{dtype_error, from_proto, Ctx};
use indexmap::IndexMap;
use smelt_ir::{Attr, Dim, Graph, Model, Node, OpsetImport, ValueInfo};
use smelt_tensor::{bail, DType, Error, Result};

/// Converts a decoded model. Model-local functions (`functions`) and training info are not
/// carried: nodes calling such functions will fail later as unknown ops, others work.
pub(crate) fn model_from_proto(mut m: ModelProto, ctx: &Ctx) -> Result<Model> {
    // The weights are moved out and converted one by one, each proto freed once converted: a
    // large model never holds two full copies of its weights.
    let weights = m
        .graph
        .as_mut()
        .map(|g| std::mem::take(&mut g.initializer))
        .unwrap_or_default();
    let Some(graph) = m.graph.as_ref() else {
        bail!(Invalid, "the file has no graph (is it an ONNX model?)");
    };
    let opsets = m
        .opset_import
        .iter()
        .map(|o| {
            let domain = o.domain.clone().unwrap_or_default();
            let version = o.version.ok_or_else(|| {
                Error::Invalid(format!("opset import for domain '{domain}' has no version"))
            })?;
            Ok(OpsetImport { domain, version })
        })
        .collect::<Result<Vec<_>>>()?;
    check_versions(&m, &opsets)?;
    let graph = graph_from_proto(graph, weights, ctx)?;
    if graph.outputs.is_empty() {
        bail!(Invalid, "graph '{}' declares no outputs", graph.name);
    }
    Ok(Model {
        ir_version: m.ir_version.unwrap_or(0),
        opsets,
        producer_name: m.producer_name.unwrap_or_default(),
        producer_version: m.producer_version.unwrap_or_default(),
        domain: m.domain.unwrap_or_default(),
        model_version: m.model_version.unwrap_or(0),
        doc_string: m.doc_string.unwrap_or_default(),
        metadata: m
            .metadata_props
            .into_iter()
            .map(|kv| (kv.key.unwrap_or_default(), kv.value.unwrap_or_default()))
            .collect(),
        graph,
    })
}

/// Newest IR version and default-domain opset smelt knows (those of ONNX 1.23): a file from a
/// newer ONNX may use semantics smelt would silently get wrong, so it is refused up front.
pub const MAX_IR_VERSION: i64 = 13;
pub const MAX_OPSET: i64 = 27;

fn check_versions(m: &ModelProto, opsets: &[OpsetImport]) -> Result<()> {
    match m.ir_version {
        None | Some(0) => bail!(Invalid, "the model declares no IR version"),
        Some(v) if !(1..=MAX_IR_VERSION).contains(&v) => bail!(
            Unsupported,
            "IR version {v} is not supported (smelt reads IR versions 1 to {MAX_IR_VERSION})"
        ),
        _ => {}
    }
    let is_default = |d: &str| d.is_empty() || d == "ai.onnx";
    let default = opsets.iter().find(|o| is_default(&o.domain));
    match default {
        Some(o) if !(1..=MAX_OPSET).contains(&o.version) => bail!(
            Unsupported,
            "opset {} of the ONNX domain is not supported (smelt knows opsets 1 to {MAX_OPSET})",
            o.version
        ),
        Some(_) => {}
        None => {
            let uses_default = m
                .graph
                .iter()
                .flat_map(|g| &g.node)
                .any(|n| is_default(n.domain.as_deref().unwrap_or("")));
            if uses_default {
                bail!(
                    Invalid,
                    "the model imports no opset for the ONNX domain its nodes use"
                );
            }
        }
    }
    Ok(())
}

/// `weights` are `g`'s initializers, given apart so the caller can hand them over (see
/// `model_from_proto`).
fn graph_from_proto(g: &GraphProto, weights: Vec<TensorProto>, ctx: &Ctx) -> Result<Graph> {
    let name = g.name.clone().unwrap_or_default();
    let inner = || -> Result<Graph> {
        if !g.sparse_initializer.is_empty() {
            bail!(
                Unsupported,
                "sparse initializers ({} of them) are not supported",
                g.sparse_initializer.len()
            );
        }
        let mut initializers = IndexMap::with_capacity(weights.len());
        for t in weights {
            let tname = t.name.clone().unwrap_or_default();
            if tname.is_empty() {
                bail!(Invalid, "an initializer has no name");
            }
            let tensor = from_proto(&t, ctx)?;
            drop(t);
            if initializers.insert(tname.clone(), tensor).is_some() {
                bail!(Invalid, "initializer '{tname}' is defined twice");
            }
        }
        let values = |v: &[ValueInfoProto]| v.iter().map(value_info).collect::<Result<Vec<_>>>();
        let nodes = g
            .node
            .iter()
            .enumerate()
            .map(|(i, n)| node_from_proto(n, i, ctx))
            .collect::<Result<_>>()?;
        Ok(Graph {
            name: name.clone(),
            doc_string: g.doc_string.clone().unwrap_or_default(),
            inputs: values(&g.input)?,
            outputs: values(&g.output)?,
            value_info: values(&g.value_info)?,
            initializers,
            nodes,
        })
    };
    inner().map_err(|e| {
        if name.is_empty() {
            e
        } else {
            e.context(format!("graph '{name}'"))
        }
    })
}

fn node_from_proto(n: &NodeProto, index: usize, ctx: &Ctx) -> Result<Node> {
    let op_type = n.op_type.clone().unwrap_or_default();
    let name = n.name.clone().unwrap_or_default();
    if op_type.is_empty() {
        bail!(Invalid, "node {index} ('{name}') has no op_type");
    }
    let mut node = Node {
        name,
        op_type,
        domain: n.domain.clone().unwrap_or_default(),
        inputs: n.input.clone(),
        outputs: n.output.clone(),
        attrs: IndexMap::with_capacity(n.attribute.len()),
        doc_string: n.doc_string.clone().unwrap_or_default(),
    };
    for a in &n.attribute {
        let (key, v) = attr_from_proto(a, ctx).map_err(|e| e.context(node.label()))?;
        if node.attrs.insert(key.clone(), v).is_some() {
            bail!(
                Invalid,
                "{}: attribute '{key}' is given twice",
                node.label()
            );
        }
    }
    Ok(node)
}

/// The type of an attribute from files old enough to leave `type` unset: the one value present.
fn infer_attr_type(a: &AttributeProto) -> Option<AttributeType> {
    Some(if a.f.is_some() {
        AttributeType::Float
    } else if a.i.is_some() {
        AttributeType::Int
    } else if a.s.is_some() {
        AttributeType::String
    } else if a.t.is_some() {
        AttributeType::Tensor
    } else if a.g.is_some() {
        AttributeType::Graph
    } else if !a.floats.is_empty() {
        AttributeType::Floats
    } else if !a.ints.is_empty() {
        AttributeType::Ints
    } else if !a.strings.is_empty() {
        AttributeType::Strings
    } else if !a.tensors.is_empty() {
        AttributeType::Tensors
    } else if !a.graphs.is_empty() {
        AttributeType::Graphs
    } else if a.sparse_tensor.is_some() || !a.sparse_tensors.is_empty() {
        AttributeType::SparseTensor
    } else if a.tp.is_some() || !a.type_protos.is_empty() {
        AttributeType::TypeProto
    } else {
        return None;
    })
}

fn attr_from_proto(a: &AttributeProto, ctx: &Ctx) -> Result<(String, Attr)> {
    let name = a.name.clone().unwrap_or_default();
    if name.is_empty() {
        bail!(Invalid, "an attribute has no name");
    }
    if let Some(r) = &a.ref_attr_name {
        bail!(
            Unsupported,
            "attribute '{name}' refers to function attribute '{r}', which only functions may do"
        );
    }
    let code = a.r#type.unwrap_or(0);
    let ty = if code == 0 {
        infer_attr_type(a)
            .ok_or_else(|| Error::Invalid(format!("attribute '{name}' has no type and no value")))?
    } else {
        AttributeType::try_from(code).map_err(|_| {
            Error::Invalid(format!("attribute '{name}' has unknown type code {code}"))
        })?
    };
    let missing = || {
        Error::Invalid(format!(
            "attribute '{name}' of type {} has no value",
            ty.as_str_name()
        ))
    };
    let in_attr = |e: Error| e.context(format!("attribute '{name}'"));
    let v = match ty {
        AttributeType::Float => Attr::Float(a.f.ok_or_else(missing)?),
        AttributeType::Int => Attr::Int(a.i.ok_or_else(missing)?),
        AttributeType::String => Attr::String(a.s.clone().ok_or_else(missing)?),
        AttributeType::Tensor => {
            Attr::Tensor(from_proto(a.t.as_ref().ok_or_else(missing)?, ctx).map_err(in_attr)?)
        }
        AttributeType::Graph => Attr::Graph(Box::new({
            let g = a.g.as_ref().ok_or_else(missing)?;
            graph_from_proto(g, g.initializer.clone(), ctx).map_err(in_attr)?
        })),
        AttributeType::Floats => Attr::Floats(a.floats.clone()),
        AttributeType::Ints => Attr::Ints(a.ints.clone()),
        AttributeType::Strings => Attr::Strings(a.strings.clone()),
        AttributeType::Tensors => Attr::Tensors(
            a.tensors
                .iter()
                .map(|t| from_proto(t, ctx))
                .collect::<Result<_>>()
                .map_err(in_attr)?,
        ),
        AttributeType::Graphs => Attr::Graphs(
            a.graphs
                .iter()
                .map(|g| graph_from_proto(g, g.initializer.clone(), ctx))
                .collect::<Result<_>>()
                .map_err(in_attr)?,
        ),
        other => bail!(
            Unsupported,
            "attribute '{name}' has type {}, which smelt does not support",
            other.as_str_name()
        ),
    };
    Ok((name, v))
}

fn value_info(v: &ValueInfoProto) -> Result<ValueInfo> {
    let name = v.name.clone().unwrap_or_default();
    if name.is_empty() {
        bail!(
            Invalid,
            "a graph input, output or value_info entry has no name"
        );
    }
    let mut info = ValueInfo {
        name,
        dtype: None,
        shape: None,
        doc_string: v.doc_string.clone().unwrap_or_default(),
    };
    // Sequence, map, optional and sparse types are kept as "unknown": smelt only computes on tensors.
    if let Some(type_proto::Value::TensorType(tt)) =
        v.r#type.as_ref().and_then(|t| t.value.as_ref())
    {
        info.dtype = match tt.elem_type.unwrap_or(0) {
            0 => None,
            code => Some(
                DType::from_onnx(code)
                    .ok_or_else(|| dtype_error(code).context(format!("value '{}'", info.name)))?,
            ),
        };
        if let Some(shape) = &tt.shape {
            let dims = shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(dimension::Value::DimValue(x)) => {
                        usize::try_from(*x).map(Dim::Fixed).map_err(|_| {
                            Error::Invalid(format!(
                                "value '{}' has negative dimension {x}",
                                info.name
                            ))
                        })
                    }
                    Some(dimension::Value::DimParam(s)) if !s.is_empty() => Ok(Dim::Sym(s.clone())),
                    _ => Ok(Dim::Unknown),
                })
                .collect::<Result<_>>()?;
            info.shape = Some(dims);
        }
    }
    Ok(info)
}
