#!/usr/bin/env bash
# Set up (if needed) and serve the bundled demo bank on the bundled EfficientNet-Lite0 backbone.
# Environment: SWITCHBANK_* settings (see README); HOST and PORT (default 127.0.0.1:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/switchbank serve --bank "${SWITCHBANK_BANK:-demo/bank}" --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
