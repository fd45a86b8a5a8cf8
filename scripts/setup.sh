#!/usr/bin/env bash
# Create (or refresh) .venv for a CPU machine of this project's kind: Python 3.11, torch 2.14.1 +
# torchvision 0.29.1 from the local disk, sglang 0.5.17 without its GPU deps, the pure-Python packages
# its modules import, and this project (editable). Idempotent: a finished step is skipped next time.
# Fails loudly, naming the step.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv="$root/.venv"
stamp="$venv/.nosa-setup-done"
step() { echo "[setup] $*" >&2; }
fail() { echo "[setup] FAILED at step: $current" >&2; exit 1; }
trap fail ERR

current="find python3.11"
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { echo "[setup] need Python >= 3.11, found $("$PY" --version)" >&2; exit 1; }

want=$(cat requirements/cpu-sglang.txt requirements/cpu-dev.txt pyproject.toml setup.py scripts/setup.sh | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  step "venv up to date ($venv)"; exit 0
fi

current="create venv"
step "$current"; [[ -x "$venv/bin/python" ]] || "$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "setuptools>=75" wheel
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)

current="install torch==2.14.1 torchvision==0.29.1 (local disk)"
step "$current"; "${pip[@]}" torch==2.14.1 torchvision==0.29.1

current="install sglang==0.5.17 --no-deps"
step "$current"; "${pip[@]}" --no-deps sglang==0.5.17

current="install sglang's pure-Python imports (requirements/cpu-sglang.txt)"
step "$current"; "${pip[@]}" -r requirements/cpu-sglang.txt

current="install project deps (requirements/cpu-dev.txt)"
step "$current"; "${pip[@]}" -r requirements/cpu-dev.txt

current="install nosa-sglang (editable)"
step "$current"; "${pip[@]}" --no-deps --no-build-isolation -e .

current="check imports"
step "$current"
"$venv/bin/python" - <<'PY'
import torch, triton, sglang, grpc, nosa_sglang, nosa_sglang.kernels, nosa_sglang.runtime
from sglang.srt.layers.attention import attention_registry  # noqa: F401
print(f"[setup] torch {torch.__version__}, triton {triton.__version__}, sglang {sglang.__version__}")
PY
echo "$want" > "$stamp"
step "done: $venv"
