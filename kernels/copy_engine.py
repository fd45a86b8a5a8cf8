"""Copy-engine (DMA) transfers of runs: coalesce the id lists into spans, then issue the copies.

The copy engines cannot gather, so each maximal span of runs that is consecutive in both source and
destination becomes one cudaMemcpyAsync. Random misses rarely coalesce, so the cost that matters is
the host time per copy; three ways to issue them are kept so the benchmark can say which is cheapest:
  "batch"  one cudaMemcpyBatchAsync (CUDA >= 12.8) for all spans of K and V: one driver call. It
           rejects the legacy default stream, so it needs a side stream (the runtime's h2d stream).
  "cupy"   cupy.cuda.runtime.memcpyAsync per span (a thin Cython call into cudart).
  "torch"  Tensor.copy_(non_blocking=True) on slices per span (slowest on the host; also runs on CPU
           tensors, which is how the span logic is tested without a GPU).
"auto" picks cupy (torch without CuPy). batch is opt-in: it moved H2D spans no faster than cupy on an
H100 (5.2 vs 5.2 GB/s, 16 KiB runs), and inside the runtime on an H200 (CUDA 13) it crashed the process
once (segfault in the driver call, under CUDA graphs with moving rows), which a slow path must never do.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Literal, NamedTuple

import numpy as np
import torch

CopyBackend = Literal["auto", "batch", "cupy", "torch"]
_CUDA_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction inferred from the (unified) addresses
_SRC_ACCESS_ORDER_STREAM = 1  # cudaMemcpySrcAccessOrderStream


class RunSpans(NamedTuple):
    """Maximal spans of runs consecutive in both source and destination (int64 numpy arrays)."""

    src_start: np.ndarray
    dst_start: np.ndarray
    length: np.ndarray


def coalesce_runs(src_ids: np.ndarray, dst_ids: np.ndarray) -> RunSpans:
    """Merge (src, dst) run pairs into spans; the pair order does not matter (sorted by src first)."""
    src = np.asarray(src_ids, dtype=np.int64)
    dst = np.asarray(dst_ids, dtype=np.int64)
    if src.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return RunSpans(empty, empty, empty)
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    breaks = np.ones(src.size, dtype=bool)
    breaks[1:] = (src[1:] != src[:-1] + 1) | (dst[1:] != dst[:-1] + 1)
    starts = np.flatnonzero(breaks)
    length = np.diff(np.append(starts, src.size))
    return RunSpans(src[starts], dst[starts], length)


class _MemcpyAttributes(ctypes.Structure):
    # cudaMemcpyAttributes: srcAccessOrder, srcLocHint {type, id}, dstLocHint {type, id}, flags
    _fields_ = [
        ("src_access_order", ctypes.c_int),
        ("src_loc_type", ctypes.c_int),
        ("src_loc_id", ctypes.c_int),
        ("dst_loc_type", ctypes.c_int),
        ("dst_loc_id", ctypes.c_int),
        ("flags", ctypes.c_uint),
    ]


class _BatchMemcpy(NamedTuple):
    fn: object
    has_fail_idx: bool  # CUDA 12.8/12.9 take a failIdx out-pointer; 13.0 dropped it


@functools.cache
def _batch_memcpy() -> _BatchMemcpy | None:
    """Bind cudaMemcpyBatchAsync from the cudart torch already loaded; None when unavailable."""
    if not torch.cuda.is_available():
        return None
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    version = ctypes.c_int(0)
    if lib.cudaRuntimeGetVersion(ctypes.byref(version)) != 0 or version.value < 12080:
        return None
    fn = getattr(lib, "cudaMemcpyBatchAsync", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_int
    return _BatchMemcpy(fn, has_fail_idx=version.value < 13000)


def batch_memcpy_available() -> bool:
    return _batch_memcpy() is not None


def resolve_backend(backend: CopyBackend, stream_handle: int) -> CopyBackend:
    """"auto" -> "cupy" (or "torch" without CuPy); explicit choices pass through."""
    if backend != "auto":
        return backend
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "torch"
    return "cupy"


def copy_spans(
    srcs: tuple[torch.Tensor, ...],
    dsts: tuple[torch.Tensor, ...],
    spans: RunSpans,
    backend: CopyBackend,
    stream: torch.cuda.Stream | None,
) -> int:
    """Copy every span of each srcs[i] -> dsts[i] ([runs, run_elems] contiguous). Returns copies issued."""
    n_spans = len(spans.length)
    if n_spans == 0:
        return 0
    if backend == "torch":
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for s, d, n in zip(spans.src_start.tolist(), spans.dst_start.tolist(), spans.length.tolist()):
                for src, dst in zip(srcs, dsts):
                    dst[d : d + n].copy_(src[s : s + n], non_blocking=True)
        return n_spans * len(srcs)
    handle = stream.cuda_stream if stream is not None else torch.cuda.current_stream().cuda_stream
    run_bytes = srcs[0].shape[1] * srcs[0].element_size()
    src_ptrs = np.concatenate([t.data_ptr() + spans.src_start * run_bytes for t in srcs]).astype(np.uint64)
    dst_ptrs = np.concatenate([t.data_ptr() + spans.dst_start * run_bytes for t in dsts]).astype(np.uint64)
    sizes = np.tile(spans.length * run_bytes, len(srcs)).astype(np.uint64)
    if backend == "cupy":
        import cupy

        memcpy = cupy.cuda.runtime.memcpyAsync
        for d, s, n in zip(dst_ptrs.tolist(), src_ptrs.tolist(), sizes.tolist()):
            memcpy(d, s, n, _CUDA_MEMCPY_DEFAULT, handle)
        return len(sizes)
    if backend == "batch":
        _issue_batch(dst_ptrs, src_ptrs, sizes, handle)
        return len(sizes)
    raise ValueError(f"backend: expected 'auto', 'batch', 'cupy' or 'torch', got {backend!r}")


def _issue_batch(dst_ptrs: np.ndarray, src_ptrs: np.ndarray, sizes: np.ndarray, handle: int) -> None:
    batch = _batch_memcpy()
    if batch is None:
        raise RuntimeError("copy_backend 'batch' needs cudaMemcpyBatchAsync (CUDA >= 12.8)")
    if handle == 0:
        raise ValueError("stream: copy_backend 'batch' cannot use the legacy default stream; pass a side stream")
    attrs = _MemcpyAttributes(src_access_order=_SRC_ACCESS_ORDER_STREAM)
    attr_idx = ctypes.c_size_t(0)
    vp = ctypes.c_void_p
    args = [vp(dst_ptrs.ctypes.data), vp(src_ptrs.ctypes.data), vp(sizes.ctypes.data), ctypes.c_size_t(len(sizes))]
    args += [ctypes.byref(attrs), ctypes.byref(attr_idx), ctypes.c_size_t(1)]
    fail_idx = ctypes.c_size_t(0)
    if batch.has_fail_idx:
        args.append(ctypes.byref(fail_idx))
    args.append(vp(handle))
    err = batch.fn(*args)
    if err != 0:
        raise RuntimeError(f"cudaMemcpyBatchAsync failed with cudaError {err} (copy {fail_idx.value})")

