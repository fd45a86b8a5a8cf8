"""Shared by the kernel and runtime tests: the small NOSA config, tolerances, output poisoning."""

from __future__ import annotations

import contextlib

import torch

from nosa_sglang.config import NosaConfig

#: a non-default config whose selection is sparse after a few hundred tokens (block 16, stride 4)
SMALL = NosaConfig(block_size=16, kernel_stride=4, kernel_size=8, init_blocks=1, local_blocks=2,
                   query_blocks=5, topk_blocks=8)
#: relative error allowed against the reference, per input dtype
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty / empty_like return NaN (floats) or 2**30 (ints): an unwritten output fails."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(2**30) if t.dtype != torch.bool else t

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
