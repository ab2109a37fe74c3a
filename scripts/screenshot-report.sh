#!/usr/bin/env bash
# Renders a smelt report in headless Chromium and saves a screenshot, to check that the page
# and all its charts draw in a real browser.
# usage: scripts/screenshot-report.sh REPORT_DIR [OUT.png]   (needs Debian's chromium package)
set -euo pipefail
dir=$(cd "$1" && pwd)
out=${2:-$dir/screenshot.png}
command -v chromium >/dev/null || { echo "chromium is not installed (apt-get install chromium)" >&2; exit 1; }
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1000,${HEIGHT:-2600} \
    --screenshot="$out" "file://$dir/report.html" 2>/dev/null
echo "$out"
