"""Store tokens' K and V into run-layout buffers at (run, offset): a paged KV pool's write, also into
pinned host memory.

Why a kernel: when the pool lives in pinned host memory (the host tier of the SGLang integration), a
prefill's or decode step's new tokens go from the GPU straight to their host pages. One program per
(token, KV head) stores its d elements of K and of V over PCIe (zero copy, posted writes); torch would
need a staging copy. On device memory it is an ordinary scatter, and the torch statement
(`store_tokens_torch`) is what it is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nosa_sglang.kernels._checks import KernelArgumentError, check_tensor, triton_interpreting
from nosa_sglang.kernels._dispatch import FLOAT_DTYPES, check_index, next_pow2
from nosa_sglang.kernels.pinned import is_device_accessible


def store_tokens(k_runs: torch.Tensor, v_runs: torch.Tensor, runs: torch.Tensor, offsets: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, impl: str = "auto") -> None:
    """k_runs[runs[i, h], offsets[i] * d : +d] = k[i, h] and the same for V.

    Args:
        k_runs, v_runs: [R, block_size * d] contiguous, on the GPU, in pinned host memory (CPU tensors
            that CUDA can address), or plain CPU tensors when k and v are CPU tensors too.
        runs: [n, Hkv] int64 run of each (token, head); offsets [n] int64 token offset in its run.
        k, v: [n, Hkv, d] (cast to the runs' dtype).
        impl: "auto" (the kernel for CUDA tokens, torch for CPU ones) | "triton" (CPU: the interpreter) |
            "torch" (CPU tensors only).
    """
    check_tensor("k", k, 3, FLOAT_DTYPES)
    check_tensor("v", v, 3, FLOAT_DTYPES)
    n, H, d = k.shape
    if tuple(v.shape) != (n, H, d):
        raise KernelArgumentError(f"v: expected shape {[n, H, d]} like k, got {list(v.shape)}")
    check_index("runs", runs, 2)
    check_index("offsets", offsets, 1)
    if tuple(runs.shape) != (n, H) or tuple(offsets.shape) != (n,):
        raise KernelArgumentError(f"runs, offsets: expected [{n}, {H}] and [{n}], got {list(runs.shape)} and "
                                  f"{list(offsets.shape)}")
    for name, t in (("k_runs", k_runs), ("v_runs", v_runs)):
        check_tensor(name, t, 2, FLOAT_DTYPES)
        if not t.is_contiguous() or t.shape[1] % d:
            raise KernelArgumentError(f"{name}: expected a contiguous [R, block_size * {d}] tensor, got "
                                      f"{list(t.shape)} with strides {t.stride()}")
    if v_runs.shape != k_runs.shape or v_runs.dtype != k_runs.dtype:
        raise KernelArgumentError(f"v_runs: expected {list(k_runs.shape)} {k_runs.dtype} like k_runs, got "
                                  f"{list(v_runs.shape)} {v_runs.dtype}")
    if impl not in ("auto", "triton", "torch"):
        raise KernelArgumentError(f"impl: must be one of ('auto', 'triton', 'torch'), got {impl!r}")
    if n == 0:
        return
    if k.device.type == "cpu":
        if k_runs.device.type != "cpu":
            raise KernelArgumentError(f"k_runs: CPU k needs CPU runs, got {k_runs.device}")
        if impl != "triton":
            store_tokens_torch(k_runs, v_runs, runs, offsets, k, v)
            return
        if not triton_interpreting(_store_tokens_kernel):
            raise KernelArgumentError("impl: 'triton' needs CUDA tensors or TRITON_INTERPRET=1, got CPU tensors")
    elif impl == "torch":
        raise KernelArgumentError("impl: 'torch' needs CPU tensors (CUDA tokens are stored by the kernel)")
    if k.device.type == "cuda" and k_runs.device.type == "cpu" and not is_device_accessible(k_runs):
        raise KernelArgumentError("k_runs: host runs must be pinned, device-accessible memory (alloc_pinned)")
    k, v = k.to(k_runs.dtype).contiguous(), v.to(k_runs.dtype).contiguous()
    runs, offsets = runs.to(k.device).contiguous(), offsets.to(k.device).contiguous()
    _store_tokens_kernel[(n * H,)](k_runs, v_runs, runs, offsets, k, v, H, d, k_runs.stride(0),
                                   BLOCK_D=max(16, next_pow2(d)), num_warps=1)


def store_tokens_torch(k_runs, v_runs, runs, offsets, k, v) -> None:
    """The same stores as torch index ops (the statement the kernel is tested against)."""
    d = k.shape[2]
    off = offsets.to(k_runs.device).view(-1, 1)
    runs = runs.to(k_runs.device)
    for dst, x in ((k_runs, k), (v_runs, v)):
        dst.view(dst.shape[0], -1, d)[runs, off] = x.to(dst.device, dst.dtype)


@triton.jit
def _store_tokens_kernel(KR, VR, RUNS, OFF, K, V, n_heads, d, s_run, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    i = pid // n_heads
    h = pid % n_heads
    run = tl.load(RUNS + pid).to(tl.int64)  # NOTE: int64: a host pool exceeds 2^31 elements
    off = tl.load(OFF + i).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < d
    src = pid.to(tl.int64) * d + offs
    dst = run * s_run + off * d + offs
    tl.store(KR + dst, tl.load(K + src, mask=ok), mask=ok)
    tl.store(VR + dst, tl.load(V + src, mask=ok), mask=ok)
