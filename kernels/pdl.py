"""Programmatic dependent launch (PDL) for the kernels of a decode layer's chain.

Why: at small batches one decode layer is a chain of short dependent kernels on each micro-batch's
stream (token write, selection scores, top-k, residency diff, attention, split merge). Inside a CUDA
graph each one still starts only after its predecessor has fully finished and been retired. Launched
as a programmatic dependent, a kernel's programs may start while the predecessor's last programs
drain; each waits (`griddepcontrol.wait`: its predecessor has completed and its writes are visible)
before its first load or store, so it reads nothing early, then lets its own dependents launch
(`griddepcontrol.launch_dependents`): they queue for the slots its programs free. Off: timed on an
H200 it changed no kernel or step by more than noise (benchmarks/results/kernels.md, session 7).
On: `NOSA_PDL=1` in the environment, or `pdl.ENABLED = True` (the sweeps and
`decode_throughput.py --pdl` set it). PDL needs sm_90; the interpreter runs no PTX, so elsewhere the
kernels launch plainly.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda

#: this Triton has programmatic dependent launch (>= 3.4: `launch_pdl`, `gdc_wait`)
HAS_PDL = hasattr(tl_cuda, "gdc_wait")
ENABLED = os.environ.get("NOSA_PDL", "") == "1"


def options(t: torch.Tensor) -> dict:
    """Launch keywords of a chain kernel (it takes a `WAIT` constexpr and waits first when it is set)."""
    if ENABLED and HAS_PDL and t.is_cuda and _hopper_or_newer(t.device.index or 0):
        return {"WAIT": True, "launch_pdl": True}
    return {"WAIT": False}


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9  # NOTE: griddepcontrol is sm_90 PTX


@triton.jit
def prologue(WAIT: tl.constexpr):
    """A chain kernel's first statement. With WAIT (launched as a programmatic dependent): wait until the
    predecessor has completed and its writes are visible, then let this kernel's own dependents launch
    (they queue for the slots its programs free)."""
    if WAIT:
        tl_cuda.gdc_wait()
        tl_cuda.gdc_launch_dependents()
