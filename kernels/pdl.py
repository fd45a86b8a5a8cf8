"""Programmatic dependent launch (PDL) for the kernels of a decode layer's chain.

Why: at small batches one decode layer is a chain of short dependent kernels on each micro-batch's
stream (token write, selection scores, top-k, residency diff, attention, split merge). Inside a CUDA
graph each one still starts only after its predecessor has fully finished and been retired. Launched
as a programmatic dependent, a kernel's programs may start while the predecessor's last programs
drain; each waits (`griddepcontrol.wait`) before its first load, so it reads nothing early. Off until
timed on a GPU: `NOSA_PDL=1` in the environment, or `pdl.ENABLED = True` (the sweeps and
`decode_throughput.py --pdl` set it). The interpreter runs no PTX, so on CPU the kernels launch plainly.
"""

from __future__ import annotations

import os

import torch
from triton.language.extra import cuda as tl_cuda

#: this Triton has programmatic dependent launch (>= 3.4: `launch_pdl`, `gdc_wait`)
HAS_PDL = hasattr(tl_cuda, "gdc_wait")
ENABLED = os.environ.get("NOSA_PDL", "") == "1"


def options(t: torch.Tensor) -> dict:
    """Launch keywords of a chain kernel (it takes a `WAIT` constexpr and waits first when it is set)."""
    if ENABLED and HAS_PDL and t.is_cuda:
        return {"WAIT": True, "launch_pdl": True}
    return {"WAIT": False}
