#!/usr/bin/env bash
# Creates the Python environment smelt's cross-checks use: onnxruntime (the reference runtime
# and side-by-side peer) and numpy. smelt itself never needs it; tests and benchmarks do.
# Prints the interpreter path. Cached under ${XDG_CACHE_HOME:-~/.cache}/smelt/venv.
set -euo pipefail
VENV="${SMELT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/smelt/venv}"
PY="${PYTHON:-python3}"
if ! "$VENV/bin/python" -c "import onnxruntime, numpy" >/dev/null 2>&1; then
  echo "setup-python: creating $VENV with onnxruntime and numpy" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check onnxruntime numpy >&2
  "$VENV/bin/python" -c "import onnxruntime, numpy" || { echo "setup-python: onnxruntime import failed" >&2; exit 1; }
fi
echo "$VENV/bin/python"
