//! Rust types generated from the vendored ONNX schema (`proto/onnx.proto`, proto2).
#![allow(clippy::all, missing_docs, rustdoc::all)]

include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
