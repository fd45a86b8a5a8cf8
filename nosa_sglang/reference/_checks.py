"""Argument checks shared by the reference functions: errors name the argument and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, ndim: int | tuple[int, ...], floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(f"{name}: expected {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype {FLOAT_DTYPES}, got {t.dtype}")
    return t


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}: dim {dim} must equal {what}={expected}, got shape {tuple(t.shape)}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: the reference never computes in half."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
