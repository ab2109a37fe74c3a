#!/usr/bin/env bash
# Reproduces the fine-tuning figures in the README (issue 5's acceptance runs): MNIST-8 pruned
# to 80% (global magnitude; in one shot, and gradually while training) and to 50% of its
# channels (taylor), each fine-tuned for 2 epochs;
# W8A8 and W4A8 quantization-aware training; a random CNN trained from scratch for 1 epoch.
# Accuracy on the 10,000 MNIST test images, in smelt and (for the written models) onnxruntime.
# Takes about 7 minutes on 2 cores. Usage: scripts/bench-finetune.sh
set -euo pipefail
cd "$(dirname "$0")/.."
A=$(scripts/fetch-assets.sh)
PY=$(scripts/setup-python.sh)
cargo build --release -q -p smelt-cli --bin smelt --example nets
S=target/release/smelt
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
acc() { $S eval "$1" --data "$A/mnist" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["accuracy"])'; }
ort() { "$PY" scripts/ort_eval.py "$1" --task mnist --data "$A/mnist" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["accuracy"])'; }
row() { printf '%-44s %8s %8s %8s\n' "$1" "$2" "$3" "$4"; }
row run before smelt onnxruntime
M8="$A/mnist-8/model.onnx"; TRAIN=(--data "$A/mnist" --split train)

$S prune "$M8" -o "$W/m80.onnx" --sparsity 0.8 --scope global --bench-runs 0 --json >/dev/null
$S finetune "$W/m80.onnx" -o "$W/m80-ft.onnx" "${TRAIN[@]}" --masks "$W/m80.masks.safetensors" \
  --epochs 2 --loss-temperature 1000 --lr 0.3 --json >/dev/null
row "80% global + 2 epochs (T 1000, lr 0.3)" "$(acc "$W/m80.onnx")" "$(acc "$W/m80-ft.onnx")" "$(ort "$W/m80-ft.onnx")"

$S finetune "$M8" -o "$W/g80.onnx" "${TRAIN[@]}" --prune-to 0.8 --prune-scope global --prune-until 0.5 \
  --epochs 2 --loss-temperature 1000 --lr 0.3 --json >/dev/null
row "gradual 80% global over 2 epochs (T 1000)" "$(acc "$M8")" "$(acc "$W/g80.onnx")" "$(ort "$W/g80.onnx")"

$S prune "$M8" -o "$W/c50.onnx" --pattern channels --sparsity 0.5 --criterion taylor \
  --calib "$A/mnist" --split train --limit 1024 --bench-runs 0 --json >/dev/null
$S finetune "$W/c50.onnx" -o "$W/c50-ft.onnx" "${TRAIN[@]}" --epochs 2 --loss-temperature 300 \
  --lr 0.1 --json >/dev/null
row "50% channels (taylor) + 2 epochs (T 300)" "$(acc "$W/c50.onnx")" "$(acc "$W/c50-ft.onnx")" "$(ort "$W/c50-ft.onnx")"

for q in "w8a8 3e-5" "w4a8 1e-4"; do
  set -- $q
  $S finetune "$M8" -o "$W/$1.onnx" "${TRAIN[@]}" --qat "$1" --max-steps 300 --lr "$2" --seed 1 --json >/dev/null
  row "QAT $1, 300 steps (lr $2)" "$(acc "$M8")" "$(acc "$W/$1.onnx")" "$(ort "$W/$1.onnx")"
done

target/release/examples/nets mnist "$W/cnn.onnx"
$S finetune "$W/cnn.onnx" -o "$W/cnn-trained.onnx" "${TRAIN[@]}" --lr 0.05 --warmup 100 --json >/dev/null
row "random CNN, 1 epoch from scratch" "$(acc "$W/cnn.onnx")" "$(acc "$W/cnn-trained.onnx")" "$(ort "$W/cnn-trained.onnx")"
