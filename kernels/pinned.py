"""Pinned, device-mapped host memory for the KV host store.

Why CuPy: torch's caching pinned allocator rounds every allocation up to a power of two (a 40 GiB store
would pin 64 GiB) and keeps freed blocks; `cupy.cuda.alloc_pinned_memory` is cudaHostAlloc of the size
asked for. With unified addressing (every 64-bit CUDA platform) such memory is mapped into the device
address space at the same address, so a Triton kernel can read it directly (zero copy) and the copy
engines can DMA it without a staging buffer.

Modes (`pinned_mode()`):
  "cupy"  CUDA present and CuPy usable: `alloc_pinned` returns CuPy-pinned memory (the normal case).
  "torch" CUDA present, CuPy missing: torch's pinned allocator (works, wastes memory by rounding).
  "cpu"   no CUDA (or no driver): plain pageable memory; only the transfer wrappers' `mode="cpu"` and
          the Triton interpreter can use it. Importing this module never touches the driver.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Literal

import torch

from nosa_sglang.kernels._checks import KernelArgumentError

PinnedMode = Literal["cupy", "torch", "cpu"]


@functools.cache
def pinned_mode() -> PinnedMode:
    """Which allocator `alloc_pinned` uses on this machine (decided once, on first use)."""
    if not torch.cuda.is_available():
        return "cpu"
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - any import/driver failure means "no CuPy", reported by the mode
        return "torch"
    return "cupy"


def alloc_pinned(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """Allocate an uninitialised host tensor that the GPU can read and write directly.

    Args:
        shape: tensor shape, e.g. (num_host_runs, run_elems).
        dtype: any torch dtype.
    Returns:
        a contiguous CPU tensor. In modes "cupy"/"torch" `is_pinned()` is True and the memory stays
        alive as long as any view of the tensor does (the CuPy allocation hangs off its storage);
        in mode "cpu" it is ordinary pageable memory.
    """
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise KernelArgumentError(f"shape: sizes must be >= 0, got {shape}")
    mode = pinned_mode()
    if mode == "cpu":
        return torch.empty(shape, dtype=dtype)
    if mode == "torch":
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    import cupy
    import numpy as np

    numel = 1
    for s in shape:
        numel *= s
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * elem
    # NOTE: allocate at least one element so even an empty tensor points at pinned memory.
    mem = cupy.cuda.alloc_pinned_memory(max(nbytes, elem))
    raw = np.frombuffer(mem, dtype=np.uint8, count=max(nbytes, elem))  # raw.base keeps `mem` alive
    flat = torch.from_numpy(raw).view(dtype)  # torch keeps `raw` alive through the storage
    return flat[:numel].view(shape)


def is_device_accessible(t: torch.Tensor) -> bool:
    """True when a CPU tensor's memory is pinned and mapped for the device (CuPy, torch, or
    cudaHostRegister'ed). Always False without CUDA."""
    if t.device.type != "cpu" or not torch.cuda.is_available():
        return False
    return bool(t.is_pinned())  # cudaPointerGetAttributes: type == cudaMemoryTypeHost


def register_host_tensor(t: torch.Tensor) -> None:
    """Pin an existing contiguous CPU tensor in place with cudaHostRegister (e.g. an mmap'ed store).

    The caller must keep `t` alive and call `unregister_host_tensor(t)` before freeing it.
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise KernelArgumentError(f"t: expected a contiguous CPU tensor, got {t.device} strides {t.stride()}")
    if pinned_mode() == "cpu":
        raise KernelArgumentError("t: cannot pin memory without CUDA (pinned_mode() == 'cpu')")
    nbytes = t.numel() * t.element_size()
    err = torch.cuda.cudart().cudaHostRegister(ctypes.c_void_p(t.data_ptr()).value, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed with error {int(err)} for {nbytes} bytes")


def unregister_host_tensor(t: torch.Tensor) -> None:
    """Undo `register_host_tensor`."""
    err = torch.cuda.cudart().cudaHostUnregister(ctypes.c_void_p(t.data_ptr()).value)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostUnregister failed with error {int(err)}")
