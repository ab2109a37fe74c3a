//! Generates the ONNX protobuf types from the vendored `proto/onnx.proto` with `protox`, a pure
//! Rust protobuf compiler, so building smelt never needs a system `protoc`.

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let fds = match protox::compile(["onnx.proto"], ["proto"]) {
        Ok(f) => f,
        Err(e) => panic!("cannot parse proto/onnx.proto: {e}"),
    };
    let mut cfg = prost_build::Config::new();
    if let Err(e) = cfg.compile_fds(fds) {
        panic!("cannot generate Rust code for onnx.proto: {e}");
    }
}
