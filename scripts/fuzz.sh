#!/usr/bin/env bash
# Bounded fuzzing of every parser and of model execution (cargo-fuzz, libFuzzer, nightly).
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 60 s, every target)
# Prints executions per target; a crash stops the script and leaves its input under
# fuzz/artifacts/TARGET/ (turn it into a test in crates/*/tests/bad_input.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
export SMELT_ASSETS=${SMELT_ASSETS:-$(scripts/fetch-assets.sh)}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
# Seed corpora from real files, so the fuzzer starts from valid inputs and mutates inward.
mkdir -p fuzz/corpus/{onnx_model,external_data,run_model,npy,npz,idx,text,recipe}
for t in onnx_model external_data run_model; do
    cp -n "$SMELT_ASSETS/mnist-8/model.onnx" fuzz/corpus/$t/mnist8.onnx
    cp -n crates/smelt-onnx/tests/data/*.onnx fuzz/corpus/$t/ 2>/dev/null || true
done
cp -n recipes/*.toml fuzz/corpus/recipe/
head -c 4000 "$SMELT_ASSETS/brown/ca01" > fuzz/corpus/text/ca01 2>/dev/null || true
head -c 1600 "$SMELT_ASSETS/mnist/t10k-images-idx3-ubyte" > fuzz/corpus/idx/images
for t in "${targets[@]}"; do
    log=$(mktemp)
    (cd fuzz && cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=4096 \
        -timeout=10 -print_final_stats=1 2>"$log") || { tail -40 "$log"; exit 1; }
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    echo "$t: $execs executions in ${secs}s, no crash"
    rm -f "$log"
done
