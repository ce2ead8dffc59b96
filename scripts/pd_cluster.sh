#!/usr/bin/env bash
# Keep a prefill/decode cluster up for your own requests:
#   scripts/pd_cluster.sh up [--lynx-mode lynx] [--port 30000] [sglang server args...]
#   scripts/pd_cluster.sh down
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${VENV:-.venv}/bin/python" -m sglang_lynx.cluster "$@"
