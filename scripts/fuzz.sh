#!/usr/bin/env bash
# Bounded fuzzing of every parser and of model execution (cargo-fuzz, libFuzzer, nightly).
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 60 s, every target)
# Prints executions per target; a crash stops the script and leaves its input under
# fuzz/artifacts/TARGET/ (turn it into a case in crates/smelt-cli/tests/bad_input.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
assets=${SMELT_ASSETS:-}
[ -n "$assets" ] || assets=$(scripts/fetch-assets.sh)
python=${SMELT_PYTHON:-}
[ -n "$python" ] || python=$(scripts/setup-python.sh)
export SMELT_ASSETS=$assets
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)

# Seed corpora from real files, so the fuzzer starts from valid inputs and mutates inward.
c=fuzz/corpus
mkdir -p $c/{onnx_model,external_data,run_model,npy,npz,idx,text,recipe,masks,checkpoint}
seed() { [ -e "$2" ] || cp "$1" "$2"; }
for t in onnx_model external_data run_model; do
    seed "$assets/mnist-8/model.onnx" $c/$t/mnist8.onnx
done
for r in recipes/*.toml; do seed "$r" $c/recipe/"$(basename "$r")"; done
head -c 4000 "$assets/brown/ca01" > $c/text/ca01
"$python" - "$c" <<'PY'
import sys, numpy as np
c = sys.argv[1]
np.save(f"{c}/npy/x.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
np.savez(f"{c}/npz/d.npz", x=np.zeros((2, 1, 4, 4), np.uint8), y=np.array([3, 1]))
# idx: two little-endian bytes for the split, then an images file and a labels file.
images = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (4).to_bytes(4, "big") * 2 + bytes(32)
labels = bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([3, 1])
open(f"{c}/idx/two", "wb").write(len(images).to_bytes(2, "little") + images + labels)
PY
# Masks and a checkpoint from short real runs; the checkpoint target loads states against it.
cargo build --release -q -p smelt-cli
work=fuzz/seed-checkpoint
rm -rf "$work" && mkdir -p "$work"
target/release/smelt prune "$assets/mnist-8/model.onnx" -o "$work/p.onnx" --sparsity 0.5 \
    --masks $c/masks/mnist8.safetensors --bench-runs 0 >/dev/null
target/release/smelt finetune "$assets/mnist-8/model.onnx" -o "$work/f.onnx" \
    --data "$assets/mnist" --split train --limit 64 --epochs 1 --checkpoint "$work/ck" >/dev/null
cp "$work"/ck/epoch-1/state.safetensors $c/checkpoint/mnist8.safetensors
export SMELT_FUZZ_CHECKPOINT=$PWD/$work/ck/epoch-1

for t in "${targets[@]}"; do
    log=$(mktemp)
    (cd fuzz && cargo +nightly fuzz run -O "$t" -- -max_total_time="$secs" -rss_limit_mb=4096 \
        -timeout=10 -print_final_stats=1 2>"$log") || { tail -40 "$log"; exit 1; }
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    echo "$t: $execs executions in ${secs}s, no crash"
    rm -f "$log"
done
