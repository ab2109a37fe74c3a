#!/usr/bin/env bash
# Side-by-side post-training quantization: `smelt quantize` vs onnxruntime.quantization, same
# model, same calibration inputs, same settings, in one run.
#
#   scripts/compare-quant.sh            MNIST-8, W8A8 static (int8 per-channel symmetric weights,
#                                       uint8 asymmetric activations, QDQ), 500 train images, for
#                                       each observer minmax / percentile (99.999) / entropy. Both
#                                       outputs are scored in onnxruntime (top-1 on the 10k test
#                                       set), smelt's also by `smelt eval`. Exits 1 if smelt's
#                                       accuracy is below onnxruntime's for any observer.
#   scripts/compare-quant.sh --time     MiniLM fp32 (`smelt convert --dequantize-weights` of the int8
#                                       graph), 200 Brown sentences, minmax: wall time of both
#                                       quantizers, their ratio, and each output's mean-pooled
#                                       cosine to the fp32 model (onnxruntime).
# Options: --limit N (calibration samples), --tolerance T (accuracy smelt may trail by, default 0),
#          --method M (--time only, default minmax), --keep DIR (keep the quantized models).
# Exit status: 0 ok, 1 smelt below onnxruntime, 2 a step failed. $SMELT overrides the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
TIME=0; LIMIT=""; TOL=0; METHOD=minmax; KEEP=""
while [ $# -gt 0 ]; do case $1 in
  --time) TIME=1; shift;;
  --limit) LIMIT=$2; shift 2;;
  --tolerance) TOL=$2; shift 2;;
  --method) METHOD=$2; shift 2;;
  --keep) KEEP=$2; shift 2;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0;;
  *) echo "compare-quant: unknown argument $1" >&2; exit 2;;
esac; done
die() { echo "compare-quant: error: $*" >&2; exit 2; }

ASSETS=$(scripts/fetch-assets.sh)
PY=$(scripts/setup-python.sh)
SMELT=${SMELT:-target/release/smelt}
[ -x "$SMELT" ] || cargo build --release -q -p smelt-cli
"$SMELT" quantize --help >/dev/null 2>&1 || die "$SMELT has no 'quantize' command: rebuild it (cargo build --release -p smelt-cli)"
if [ -n "$KEEP" ]; then mkdir -p "$KEEP"; WORK=$(cd "$KEEP" && pwd); else WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi

now() { date +%s.%N; }
# jget FILE KEY: one field of a JSON document (a JSON line or smelt's pretty-printed object).
jget() { "$PY" -c 'import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print("n/a" if v is None else v)' "$1" "$2"; }
# run LOG CMD...: runs CMD with stdout to LOG.out and stderr to LOG.err; on failure shows both.
run() {
  local log=$1; shift
  if ! "$@" >"$log.out" 2>"$log.err"; then
    echo "compare-quant: failed: $*" >&2; tail -20 "$log.err" >&2; tail -5 "$log.out" >&2; return 2
  fi
}

if [ $TIME = 0 ]; then
  LIMIT=${LIMIT:-500}
  MODEL=$ASSETS/mnist-8/model.onnx
  COMMON_SMELT=(--mode static --weight-type int8 --granularity channel --act-type uint8
                --calib "$ASSETS/mnist" --split train --limit "$LIMIT")
  COMMON_ORT=(--mode static --weight-type int8 --per-channel --act-type uint8
              --calib "$ASSETS/mnist" --split train --limit "$LIMIT")
  run "$WORK/fp32-eval" "$PY" scripts/ort_eval.py "$MODEL" --task mnist --data "$ASSETS/mnist"
  echo "MNIST-8 W8A8 static, per-channel int8 weights, uint8 activations, $LIMIT train images for calibration"
  echo "fp32 accuracy (onnxruntime): $(jget "$WORK/fp32-eval.out" accuracy)"
  printf '%-11s %12s %12s %12s %9s %9s %9s\n' method smelt_acc smelt_acc_se ort_acc diff smelt_s ort_s
  fail=0
  for m in minmax percentile entropy; do
    s=$WORK/smelt-$m; o=$WORK/ort-$m
    pct=(); [ "$m" = percentile ] && pct=(--percentile 99.999)
    t0=$(now)
    run "$s-q" "$SMELT" quantize "$MODEL" -o "$s.onnx" "${COMMON_SMELT[@]}" --observer "$m" "${pct[@]}" --json
    t1=$(now)
    run "$o-q" "$PY" scripts/ort_quantize.py "$MODEL" -o "$o.onnx" "${COMMON_ORT[@]}" --method "$m" "${pct[@]}"
    t2=$(now)
    run "$s-oe" "$PY" scripts/ort_eval.py "$s.onnx" --task mnist --data "$ASSETS/mnist"
    run "$o-oe" "$PY" scripts/ort_eval.py "$o.onnx" --task mnist --data "$ASSETS/mnist"
    run "$s-se" "$SMELT" eval "$s.onnx" --data "$ASSETS/mnist" --json
    sa=$(jget "$s-oe.out" accuracy); oa=$(jget "$o-oe.out" accuracy); se=$(jget "$s-se.out" accuracy)
    line=$("$PY" - "$m" "$sa" "$se" "$oa" "$t0" "$t1" "$t2" "$TOL" <<'PYEOF'
import sys
m, sa, se, oa, t0, t1, t2, tol = sys.argv[1:]
sa, oa, tol = float(sa), float(oa), float(tol)
bad = sa < oa - tol - 1e-12
print("%-11s %12.4f %12s %12.4f %+9.4f %9.2f %9.2f%s" % (
    m, sa, se if se == "n/a" else "%.4f" % float(se), oa, sa - oa, float(t1) - float(t0),
    float(t2) - float(t1), "   <-- smelt below onnxruntime" if bad else ""))
if se != "n/a" and abs(float(se) - sa) > 0.001:
    print("  note: smelt eval and onnxruntime disagree on smelt's model by %.4f" % (float(se) - sa))
sys.exit(3 if bad else 0)
PYEOF
) && rc=0 || rc=$?
    echo "$line"
    [ $rc = 3 ] && fail=1
    [ $rc != 0 ] && [ $rc != 3 ] && die "table row for $m failed"
  done
  echo "(smelt_acc: smelt's model scored by onnxruntime; smelt_acc_se: the same model scored by smelt eval;"
  echo " times: wall seconds of each quantizer process; onnxruntime lifts MNIST-8 from opset 8 to 13 first)"
  [ $fail = 0 ] || { echo "compare-quant: FAIL: smelt's accuracy is below onnxruntime's" >&2; exit 1; }
  echo "compare-quant: OK: smelt >= onnxruntime for every observer"
  exit 0
fi

# --- timing: MiniLM -------------------------------------------------------------------------
LIMIT=${LIMIT:-200}
TOK=$ASSETS/minilm/tokenizer.json
FP32=$WORK/minilm-fp32.onnx
LABEL="minilm fp32 (smelt convert --dequantize-weights of minilm-int8)"
if ! run "$WORK/convert" "$SMELT" convert "$ASSETS/minilm-int8/model.onnx" -o "$FP32" --dequantize-weights; then
  echo "compare-quant: WARNING: no fp32 MiniLM (smelt convert --dequantize-weights failed); timing the int8 graph as a stand-in" >&2
  FP32=$ASSETS/minilm-int8/model.onnx
  LABEL="minilm-int8 graph (STAND-IN: no fp32 twin)"
fi
pct=(); [ "$METHOD" = percentile ] && pct=(--percentile 99.999)
t0=$(now)
run "$WORK/smelt-q" "$SMELT" quantize "$FP32" -o "$WORK/smelt-minilm.onnx" --mode static --weight-type int8 \
  --granularity channel --act-type uint8 --observer "$METHOD" "${pct[@]}" \
  --calib "$ASSETS/brown" --tokenizer "$TOK" --max-len 128 --limit "$LIMIT" --json
t1=$(now)
run "$WORK/ort-q" "$PY" scripts/ort_quantize.py "$FP32" -o "$WORK/ort-minilm.onnx" --mode static --weight-type int8 \
  --per-channel --act-type uint8 --method "$METHOD" "${pct[@]}" \
  --calib "$ASSETS/brown" --tokenizer "$TOK" --max-len 128 --limit "$LIMIT"
t2=$(now)
# Fidelity is informative here, not a gate: a model one runtime cannot load shows n/a.
cos() { # model -> "mean/min" cosine vs the fp32 model
  if run "$WORK/cos" "$PY" scripts/ort_eval.py "$1" --task minilm --reference "$FP32" --data "$ASSETS/brown" \
       --tokenizer "$TOK" --limit "$LIMIT" 2>/dev/null; then
    "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.5f/%.5f" % (d["cosine_mean"], d["cosine_min"]))' "$WORK/cos.out"
  else echo "n/a"; fi
}
sc=$(cos "$WORK/smelt-minilm.onnx"); oc=$(cos "$WORK/ort-minilm.onnx")
"$PY" - "$t0" "$t1" "$t2" "$(jget "$WORK/ort-q.out" seconds)" "$sc" "$oc" "$LABEL" "$LIMIT" "$METHOD" <<'PYEOF'
import sys
t0, t1, t2, ort_call, sc, oc, model, n, method = sys.argv[1:]
s, o = float(t1) - float(t0), float(t2) - float(t1)
print(f"MiniLM static W8A8 ({method}, per-channel int8 weights, uint8 activations), {n} Brown sentences")
print(f"model: {model}")
print("%-12s %10s %16s %18s" % ("tool", "wall_s", "quantize_call_s", "cosine mean/min"))
print("%-12s %10.2f %16s %18s" % ("smelt", s, "-", sc))
print("%-12s %10.2f %16.2f %18s" % ("onnxruntime", o, float(ort_call), oc))
print("ratio smelt/onnxruntime (wall): %.2f  (lower is better for smelt)" % (s / o))
PYEOF
