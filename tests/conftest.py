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


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed, printed so that a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add contention on the 2-core CI machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
