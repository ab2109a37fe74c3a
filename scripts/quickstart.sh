#!/usr/bin/env bash
# The main job on the default model: fetch assets, build smelt, evaluate MNIST-8 on the MNIST test set.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=$(scripts/fetch-assets.sh)
cargo build --release -q -p smelt-cli
target/release/smelt inspect "$ASSETS/mnist-8/model.onnx"
echo
target/release/smelt eval "$ASSETS/mnist-8/model.onnx" --data "$ASSETS/mnist" --split test
