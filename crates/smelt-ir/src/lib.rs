//! The graph IR at the middle of smelt. It mirrors ONNX's dataflow model (values named by
//! strings, nodes with attributes, initializers) but knows nothing of protobuf: the importer
//! and exporter in `smelt-onnx` translate. Every transformation is a [`Pass`] over a [`Model`].

mod graph;
mod model;
mod pass;
pub mod passes;
pub mod pattern;

pub use graph::{subgraphs, Attr, Dim, Graph, Node, ValueInfo};
pub use model::{Model, OpsetImport};
pub use pass::{Pass, PassRecord};
pub use smelt_tensor::{DType, Error, Result, Tensor};
