#!/usr/bin/env bash
# Source at the start of every device-tool call (after `scripts/gpu_wheel.sh` ran here): installs the
# carried wheels, this project's included, into /tmp/site, so nosa_sglang.kernels / .runtime import as
# they will for users.
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v -i warning
python3 -P -c "import nosa_sglang.kernels, nosa_sglang.runtime, torch, triton; print('env:', torch.__version__, triton.__version__, torch.cuda.get_device_name())"
