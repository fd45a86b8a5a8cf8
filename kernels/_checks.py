"""Argument checks for the transfer kernels and the eviction head.

Every failure is a `KernelArgumentError` (a ValueError) whose message starts with the argument's name
and says what was allowed, so a caller can fix the call without reading the kernel.
"""

from __future__ import annotations

import torch


class KernelArgumentError(ValueError):
    """A kernel wrapper was called with an argument it cannot take (names the argument)."""


ID_DTYPES = (torch.int32, torch.int64)


def triton_interpreting(kernel: object) -> bool:
    """True when `kernel` was built by triton.jit under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_tensor(name: str, t: object, ndim: int, dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise KernelArgumentError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise KernelArgumentError(f"{name}: dtype must be one of {dtypes}, got {t.dtype}")
    return t


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise KernelArgumentError(f"{name}: must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")


def check_same_device(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> torch.device:
    device = tensors[0].device
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != device:
            raise KernelArgumentError(f"{name}: must be on {device} like {names[0]}, got {t.device}")
    return device


def check_ids(name: str, ids: object, size: int, limit_name: str, unique: bool) -> torch.Tensor:
    """Validate a 1-D run-id list: every id in [0, size), no repeats when `unique`.

    NOTE: on a CUDA tensor this synchronises the device (min/max/unique read back); the transfer
    wrappers only call it when asked to (`validate_ids=True`), never on the hot path.
    """
    ids = check_tensor(name, ids, 1, ID_DTYPES)
    check_contiguous(name, ids)
    if ids.numel() == 0:
        return ids
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= size:
        raise KernelArgumentError(
            f"{name}: ids must lie in [0, {size}) ({limit_name} has {size} runs), got min {lo} max {hi}"
        )
    if unique and torch.unique(ids).numel() != ids.numel():
        raise KernelArgumentError(f"{name}: duplicate destination ids (each destination run may be written once)")
    return ids
