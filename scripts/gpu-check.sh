#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA GPU: the GPU tests (tests/gpu), then the router's indexes
# and the mixed-traffic benchmark, whose results are tagged with the GPU's name. Installs nothing: it
# runs with .venv where there is one (scripts/setup.sh), else with $PYTHON or python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH=.
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')"
"$PY" -m pytest -q tests/gpu
"$PY" -m bench.router_index --switches 1000
"$PY" -m bench.forward --only mixed
