"""Shared plumbing of the attention and selection wrappers: implementation choice and common checks.

`impl="auto"` picks Triton when the tensors live on CUDA or TRITON_INTERPRET=1 is set (the CPU test
suite runs the real kernels through the interpreter), the pure-torch path otherwise. The torch path is
the readable statement of what each kernel computes and the fallback on machines without a GPU.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from nosa_sglang.kernels._checks import KernelArgumentError, check_tensor

IMPLS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def interpret_mode() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fp32_dot(dtype: torch.dtype) -> bool:
    """Whether kernels run their dots in exact fp32: for fp32 inputs (tf32 would cost ~3e-4 relative),
    and always under the interpreter, whose bf16 tl.dot returns garbage in Triton 3.8 (seen here)."""
    return dtype == torch.float32 or interpret_mode()


def resolve_impl(impl: str, device: torch.device) -> str:
    """'torch' or 'triton' for a call whose tensors live on `device`."""
    if impl not in IMPLS:
        raise KernelArgumentError(f"impl: must be one of {IMPLS}, got {impl!r}")
    on_gpu = device.type == "cuda"
    if impl == "auto":
        return "triton" if on_gpu or interpret_mode() else "torch"
    if impl == "triton" and not on_gpu and not interpret_mode():
        raise KernelArgumentError(
            f"impl: 'triton' needs CUDA tensors or TRITON_INTERPRET=1, got tensors on {device}"
        )
    return impl


def check_float(name: str, t: object, ndim: int) -> torch.Tensor:
    t = check_tensor(name, t, ndim, FLOAT_DTYPES)
    if t.stride(-1) != 1:
        raise KernelArgumentError(f"{name}: last dim must be contiguous (stride 1), got strides {t.stride()}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise KernelArgumentError(f"{name}: expected shape {list(expected)} ({what}), got {list(t.shape)}")


def check_index(name: str, t: object, ndim: int) -> torch.Tensor:
    return check_tensor(name, t, ndim, INDEX_DTYPES)


def check_extend(name: str, q_start: object, n_queries: int, n_keys: int) -> int:
    """Queries are the last tokens of the sequence: positions q_start .. n_keys - 1 (an extend)."""
    if isinstance(q_start, bool) or not isinstance(q_start, int) or q_start < 0 or q_start + n_queries != n_keys:
        raise KernelArgumentError(
            f"{name}: must be an int with {name} + {n_queries} (query tokens) == {n_keys} (key tokens), got {q_start!r}"
        )
    return q_start


def check_devices(**tensors: torch.Tensor) -> torch.device:
    names = list(tensors)
    device = tensors[names[0]].device
    for name in names[1:]:
        if tensors[name].device != device:
            raise KernelArgumentError(f"{name}: must be on {device} like {names[0]}, got {tensors[name].device}")
    return device


def check_gqa(q_heads: int, kv_heads: int) -> int:
    """Query heads per KV head (the GQA group size)."""
    if kv_heads < 1 or q_heads % kv_heads:
        raise KernelArgumentError(f"q: Hq={q_heads} must be a positive multiple of Hkv={kv_heads}")
    return q_heads // kv_heads


def check_head_dim(name: str, d: int, triton: bool) -> None:
    """The Triton kernels tile head_dim as one power-of-two vector (64 and 128 are the model sizes)."""
    if triton and (d < 16 or d > 256 or d & (d - 1)):
        raise KernelArgumentError(f"{name}: head_dim must be a power of two in [16, 256] for impl='triton', got {d}")


def check_block_size(name: str, block_size: object, triton: bool) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise KernelArgumentError(f"{name}: must be a positive int, got {block_size!r}")
    if triton and (block_size < 16 or block_size & (block_size - 1)):
        raise KernelArgumentError(f"{name}: must be a power of two >= 16 for impl='triton', got {block_size}")
    return block_size


def default_scale(sm_scale: float | None, head_dim: int) -> float:
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(sm_scale, (int, float)) or isinstance(sm_scale, bool) or not math.isfinite(sm_scale):
        raise KernelArgumentError(f"sm_scale: must be a finite float or None, got {sm_scale!r}")
    return float(sm_scale)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """Multiprocessors of the device (a fixed 132, an H100's count, under the interpreter)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    # cached: the property query costs microseconds on every decode step otherwise
    return torch.cuda.get_device_properties(index).multi_processor_count
