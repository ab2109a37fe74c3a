#!/usr/bin/env bash
# What structured pruning buys in latency: each model and its 50%-channel version, timed side
# by side at batch 32 in smelt's engine (the two interleaved, by `smelt prune`) and in
# onnxruntime (scripts/ort_bench.py), same threads. Prints FLOPs and the speed-ups.
# Models: MNIST-8 (made batch-dynamic) and the residual/depthwise CNN the tests build.
# Usage: scripts/bench-prune.sh [--threads 2] [--runs 30] [--batch 32]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=2; RUNS=30; BATCH=32
while [ $# -gt 0 ]; do case $1 in
  --threads) THREADS=$2; shift 2;; --runs) RUNS=$2; shift 2;; --batch) BATCH=$2; shift 2;;
  *) echo "bench-prune: unknown argument $1" >&2; exit 2;;
esac; done
ASSETS=$(scripts/fetch-assets.sh)
PY=$(scripts/setup-python.sh)
cargo build --release -q -p smelt-cli --bin smelt --example nets
SMELT=target/release/smelt
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
$SMELT convert "$ASSETS/mnist-8/model.onnx" -o "$WORK/mnist8.onnx" --dynamic-batch --json >/dev/null
target/release/examples/nets residual "$WORK/cnn.onnx"
ort_ms() { "$PY" scripts/ort_bench.py "$1" --batch "$BATCH" --threads "$THREADS" --runs "$RUNS" |
           "$PY" -c 'import json,sys; print(json.load(sys.stdin)["median_ms"])'; }
printf '%-8s %8s %12s %12s %12s %12s %9s\n' model flops smelt_ms smelt_pr_ms ort_ms ort_pr_ms speedups
for name in mnist8 cnn; do
  $SMELT --threads "$THREADS" prune "$WORK/$name.onnx" -o "$WORK/$name-pruned.onnx" --pattern channels \
    --sparsity 0.5 --bench-batch "$BATCH" --bench-runs "$RUNS" --json >"$WORK/$name.json"
  o1=$(ort_ms "$WORK/$name.onnx"); o2=$(ort_ms "$WORK/$name-pruned.onnx")
  "$PY" - "$WORK/$name.json" "$o1" "$o2" "$name" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1])); o1, o2 = float(sys.argv[2]), float(sys.argv[3])
b, a = r["before"], r["after"]
print("%-8s %8.3f %12.3f %12.3f %12.3f %12.3f  smelt %.2fx, onnxruntime %.2fx" % (
    sys.argv[4], a["flops"] / b["flops"], b["latency_ms"], a["latency_ms"], o1, o2,
    b["latency_ms"] / a["latency_ms"], o1 / o2))
PYEOF
done
