#!/usr/bin/env bash
# Build this tree as a wheel into .whl/ (git-ignored) for the device tool's `carry` (see README, GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f .whl/nosa_sglang-*.whl
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl . 2>&1 | grep -v WARNING || true
# NOTE: the GPU machine has grpcio/protobuf but not these (pure-Python) extras
# (prometheus-client: SGLang's --enable-metrics, which the trimmed SGLang wheel set leaves out)
.venv/bin/pip download -q --no-deps -d .whl grpcio-health-checking==1.76.0 grpcio-reflection==1.76.0 \
  prometheus-client==0.26.0 pytest-timeout 2>&1 | grep -v WARNING || true
rm -rf nosa_sglang.egg-info  # NOTE: left by the build; in the repo root it shadows the installed entry points
ls .whl/*.whl
