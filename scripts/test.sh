#!/usr/bin/env bash
# The whole test suite. Fetches assets and the onnxruntime reference environment first (both
# cached), then runs every crate's tests in release mode (the engine is too slow unoptimised
# for real models) and the ONNX conformance floor.
set -euo pipefail
cd "$(dirname "$0")/.."
export SMELT_ASSETS=$(scripts/fetch-assets.sh)
export SMELT_PYTHON=$(scripts/setup-python.sh)
# Build the binaries with the workspace's unified features so the tests reuse every artifact.
cargo build --release --workspace --bins
cargo test --release --workspace
target/release/smelt-conformance --check tools/conformance/passing.txt --report target/conformance.txt
