#!/usr/bin/env bash
# Set up (if needed) and serve the bundled demo bank on the bundled EfficientNet-Lite0 backbone.
# Environment: SWITCHBANK_* settings (see README); HOST and PORT (default 127.0.0.1:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Cosine routing: on the demo tasks it routes 95.7% of test images to their own switch against
# 84.1% for the paper's Euclidean metric (bench/results/table2.md).
export SWITCHBANK_ROUTER_METRIC=${SWITCHBANK_ROUTER_METRIC:-cosine}
exec .venv/bin/switchbank serve --bank "${SWITCHBANK_BANK:-demo/bank}" --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
