#!/usr/bin/env bash
# Build this tree as a wheel into .whl/ (git-ignored) for the device tool's `carry` (see README, GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f .whl/nosa_sglang-*.whl
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl . 2>&1 | grep -v WARNING || true
ls .whl/nosa_sglang-*.whl
