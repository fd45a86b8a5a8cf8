"""Shared pytest setup.

Without a CUDA GPU the Triton kernels run through Triton's CPU interpreter: TRITON_INTERPRET=1 must be
set before the first `triton.jit` runs (at kernel-module import), and conftest.py is imported before any
test module. Tests marked `gpu` are skipped here, with the reason.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu; run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
