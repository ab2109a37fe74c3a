#!/usr/bin/env bash
# Side-by-side latency: smelt's engine vs onnxruntime, same models, same input shapes, same
# thread count, in one run. Prints median latencies and the ratio smelt/onnxruntime (lower is
# better for smelt). Usage: scripts/bench.sh [--threads 2] [--runs 20]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=2; RUNS=20
while [ $# -gt 0 ]; do case $1 in --threads) THREADS=$2; shift 2;; --runs) RUNS=$2; shift 2;; *) echo "unknown $1" >&2; exit 2;; esac; done
ASSETS=$(scripts/fetch-assets.sh)
PY=$(scripts/setup-python.sh)
cargo build --release -q -p smelt-cli
SMELT=target/release/smelt
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
# MNIST-8 is exported with batch 1; the dynamic-batch pass lets both runtimes take batch 32.
$SMELT convert "$ASSETS/mnist-8/model.onnx" -o "$WORK/mnist8-dyn.onnx" --dynamic-batch --json >/dev/null
printf '%-14s %6s %12s %12s %8s\n' model batch smelt_ms ort_ms ratio
for spec in "mnist8:$WORK/mnist8-dyn.onnx:1" "mnist8:$WORK/mnist8-dyn.onnx:32" \
            "minilm:$ASSETS/minilm-int8/model.onnx:1" "minilm:$ASSETS/minilm-int8/model.onnx:32"; do
  IFS=: read -r name model batch <<<"$spec"
  s=$($SMELT bench "$model" --batch "$batch" --seq-len 128 --threads "$THREADS" --runs "$RUNS" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["median_ms"])')
  o=$("$PY" scripts/ort_bench.py "$model" --batch "$batch" --seq-len 128 --threads "$THREADS" --runs "$RUNS" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["median_ms"])')
  "$PY" -c "import sys; s,o=float('$s'),float('$o'); print('%-14s %6s %12.3f %12.3f %8.2f' % ('$name', '$batch', s, o, s/o))"
done
