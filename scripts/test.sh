#!/usr/bin/env bash
# The test command (README, .ci/run): set up .venv if needed (idempotent), then run the CPU suite.
# GPU tests are marked `gpu` and skip here with a reason; run them through the device tool (README).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n "${NOSA_TEST_WORKERS:-2}" --durations=15 "$@"
