#!/usr/bin/env bash
# Creates the Python environment smelt's cross-checks use: onnxruntime (the reference runtime
# and side-by-side peer), numpy, and for the quantization comparison (scripts/compare-quant.sh)
# onnx (onnxruntime.quantization needs it) and tokenizers (the Python twin of the crate smelt
# tokenizes with). smelt itself never needs it; tests and benchmarks do.
# Prints the interpreter path. Cached under ${XDG_CACHE_HOME:-~/.cache}/smelt/venv.
set -euo pipefail
VENV="${SMELT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/smelt/venv}"
PY="${PYTHON:-python3}"
PKGS=(onnxruntime==1.32.0 numpy==2.4.6 onnx==1.23.2 tokenizers==0.23.2)
# An existing venv missing a package (an older one made before onnx/tokenizers) is topped up.
if ! "$VENV/bin/python" -c "import onnxruntime, numpy, onnx, tokenizers" >/dev/null 2>&1; then
  echo "setup-python: installing ${PKGS[*]} into $VENV" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PKGS[@]}" >&2
  "$VENV/bin/python" -c "import onnxruntime, numpy, onnx, tokenizers" || { echo "setup-python: import failed" >&2; exit 1; }
fi
echo "$VENV/bin/python"
