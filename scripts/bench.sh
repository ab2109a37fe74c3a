#!/usr/bin/env bash
# Side-by-side latency: smelt's engine vs onnxruntime, same models, same input shapes, same
# thread count, in one run. Prints median latencies, peak memory (RSS) and the ratios
# smelt/onnxruntime (lower is better for smelt), the median over rounds in which the two take
# turns. Usage: scripts/bench.sh [--threads 2] [--runs 20] [--rounds 5] [--only mnist8]
# (--only keeps the rows whose model name starts with it)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=2; RUNS=20; ROUNDS=5; ONLY=
while [ $# -gt 0 ]; do case $1 in --threads) THREADS=$2; shift 2;; --runs) RUNS=$2; shift 2;; --rounds) ROUNDS=$2; shift 2;; --only) ONLY=$2; shift 2;; *) echo "unknown $1" >&2; exit 2;; esac; done
ASSETS=$(scripts/fetch-assets.sh)
PY=$(scripts/setup-python.sh)
cargo build --release -q -p smelt-cli
SMELT=target/release/smelt
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
# MNIST-8 is exported with batch 1; the dynamic-batch pass lets both runtimes take batch 32.
# Each model comes in fp32 and W8A8 (static, per-channel int8 weights, uint8 activations, QDQ):
# the W8A8 files are smelt's own quantizer output, which both runtimes execute on integer kernels.
$SMELT convert "$ASSETS/mnist-8/model.onnx" -o "$WORK/mnist8-fp32.onnx" --dynamic-batch --json >/dev/null
$SMELT quantize "$WORK/mnist8-fp32.onnx" -o "$WORK/mnist8-w8a8.onnx" --calib "$ASSETS/mnist" \
    --split train --limit 200 --json >/dev/null
$SMELT convert "$ASSETS/minilm-int8/model.onnx" -o "$WORK/minilm-fp32.onnx" --dequantize-weights --json >/dev/null
$SMELT quantize "$WORK/minilm-fp32.onnx" -o "$WORK/minilm-w8a8.onnx" --calib "$ASSETS/brown" \
    --tokenizer "$ASSETS/minilm/tokenizer.json" --limit 64 --json >/dev/null
printf '%-12s %6s %10s %10s %7s %9s %9s %7s\n' model batch smelt_ms ort_ms ratio smelt_MB ort_MB ratio
for spec in mnist8-fp32:1 mnist8-fp32:32 mnist8-w8a8:1 mnist8-w8a8:32 \
            minilm-fp32:1 minilm-fp32:32 minilm-w8a8:1 minilm-w8a8:32; do
  IFS=: read -r name batch <<<"$spec"
  [[ $name == "$ONLY"* ]] || continue
  model="$WORK/$name.onnx"
  # The two runtimes take turns, ROUNDS times: a VM's speed drifts over a minute by more
  # than the gaps measured here, and a whole series of one then of the other would charge
  # that drift to one side. Each round gives a ratio; the table shows the medians.
  per=$(( (RUNS + ROUNDS - 1) / ROUNDS ))
  rounds=()
  for _ in $(seq "$ROUNDS"); do
    s=$($SMELT bench "$model" --batch "$batch" --seq-len 128 --threads "$THREADS" --runs "$per" --json)
    o=$("$PY" scripts/ort_bench.py "$model" --batch "$batch" --seq-len 128 --threads "$THREADS" --runs "$per")
    rounds+=("$s" "$o")
  done
  "$PY" -c "
import json, statistics as st, sys
v = [json.loads(a) for a in sys.argv[1:]]
s, o = v[0::2], v[1::2]
med = lambda xs: st.median(xs)
sms, oms = med([x['median_ms'] for x in s]), med([x['median_ms'] for x in o])
ratio = med([a['median_ms'] / b['median_ms'] for a, b in zip(s, o)])
sm = max(x['peak_rss_bytes'] for x in s) / 2**20
om = max(x['peak_rss_bytes'] for x in o) / 2**20
print('%-12s %6s %10.3f %10.3f %7.2f %9.0f %9.0f %7.2f' % ('$name', '$batch', sms, oms, ratio,
      sm, om, sm / om))" "${rounds[@]}"
done
