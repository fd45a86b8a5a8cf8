"""Fused eviction head (NOSA_SPEC.md, "ED-DMA"): c[n, h] = A[h] * softplus(delta(v_n flattened))[h].

One program handles BLOCK_N tokens: it streams their value vectors once (Hkv * d elements per token,
as a [BLOCK_N, BLOCK_K] tile at a time), multiplies every tile by the matching columns of all Hkv rows of
delta_weight (small, L2-resident) and keeps Hkv fp32 dot products per token. The Hkv outputs per token
are far fewer than 16, so a tensor-core tl.dot would waste most of its tile and use tf32 for fp32 inputs;
a fp32 multiply-reduce is exact enough and the kernel stays bound by reading v.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nosa_sglang.kernels._checks import KernelArgumentError, check_same_device, check_tensor, triton_interpreting

V_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PARAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PRODUCT_ELEMS = 8192  # per program, 4 warps
# softplus threshold 20 as torch.nn.functional.softplus: x above it is returned as is (literal in _softplus)


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)), log1p by Kahan's trick (w - 1 is exact for w in [1, 2]), so tiny
    # exp(-|x|) keeps full relative precision without libdevice.
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    exact = w == 1.0
    log1p_u = tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))
    sp = tl.maximum(x, 0.0) + log1p_u
    return tl.where(x > 20.0, x, sp)


@triton.jit
def _eviction_bias_kernel(v_ptr, w_ptr, a_ptr, b_ptr, c_ptr, n_tokens, stride_vn, stride_cn,
                          H: tl.constexpr, KDIM: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    n_mask = offs_n < n_tokens
    h_mask = offs_h < H
    row = offs_n.to(tl.int64) * stride_vn
    acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for k0 in tl.static_range(0, KDIM, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < KDIM
        v = tl.load(v_ptr + row[:, None] + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_h[:, None] * KDIM + offs_k[None, :], mask=h_mask[:, None] & k_mask[None, :],
                    other=0.0)
        prod = v.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        acc += tl.sum(prod, axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)[None, :]
    a = tl.load(a_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    c = a[None, :] * _softplus(acc)
    out = c_ptr + offs_n.to(tl.int64)[:, None] * stride_cn + offs_h[None, :]
    tl.store(out, c, mask=n_mask[:, None] & h_mask[None, :])


def eviction_bias(
    v: torch.Tensor,
    A: torch.Tensor,
    delta_weight: torch.Tensor,
    delta_bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """c = A * softplus(v.flatten(1) @ delta_weight.T + delta_bias), fp32, one read of v.

    Args:
        v: [N, Hkv, d] bf16/fp16/fp32 value vectors (no RoPE). Each token's [Hkv, d] must be contiguous
            (stride(2) == 1, stride(1) == d); the token stride is free, so a slice of a fused qkv
            projection needs no copy.
        A: [Hkv] float.
        delta_weight: [Hkv, Hkv * d] float, contiguous (nn.Linear layout: out x in).
        delta_bias: [Hkv] float or None.
        out: optional [N, Hkv] float32 destination with stride(1) == 1 (e.g. a slice of a per-request
            array); written in place and returned.
    Returns:
        c: [N, Hkv] float32 on v's device.
    """
    check_tensor("v", v, 3, V_DTYPES)
    n, hkv, d = v.shape
    if v.stride(2) != 1 or v.stride(1) != d:
        raise KernelArgumentError(f"v: each token's [Hkv, d] must be contiguous (strides [*, {d}, 1]), "
                                  f"got strides {v.stride()}")
    check_tensor("A", A, 1, PARAM_DTYPES)
    check_tensor("delta_weight", delta_weight, 2, PARAM_DTYPES)
    if A.shape[0] != hkv:
        raise KernelArgumentError(f"A: expected shape [{hkv}] (Hkv of v), got {tuple(A.shape)}")
    if tuple(delta_weight.shape) != (hkv, hkv * d):
        raise KernelArgumentError(f"delta_weight: expected shape [{hkv}, {hkv * d}], got {tuple(delta_weight.shape)}")
    if not delta_weight.is_contiguous():
        raise KernelArgumentError(f"delta_weight: must be contiguous, got strides {delta_weight.stride()}")
    names, tensors = ["v", "A", "delta_weight"], [v, A, delta_weight]
    if delta_bias is not None:
        check_tensor("delta_bias", delta_bias, 1, PARAM_DTYPES)
        if delta_bias.shape[0] != hkv:
            raise KernelArgumentError(f"delta_bias: expected shape [{hkv}], got {tuple(delta_bias.shape)}")
        names.append("delta_bias")
        tensors.append(delta_bias)
    if out is None:
        out = torch.empty((n, hkv), dtype=torch.float32, device=v.device)
    else:
        check_tensor("out", out, 2, (torch.float32,))
        if tuple(out.shape) != (n, hkv) or out.stride(1) != 1:
            raise KernelArgumentError(f"out: expected shape [{n}, {hkv}] with stride(1) == 1, "
                                      f"got {tuple(out.shape)} strides {out.stride()}")
        names.append("out")
        tensors.append(out)
    device = check_same_device(tuple(names), tuple(tensors))
    if device.type != "cuda" and not triton_interpreting(_eviction_bias_kernel):
        raise KernelArgumentError(f"v: must be a CUDA tensor (or run with TRITON_INTERPRET=1), got {device}; "
                                  "on CPU use nosa_sglang.reference.eviction_bias")
    if n == 0:
        return out
    launch_eviction_bias(v, A, delta_weight, delta_bias, out, *eviction_launch_config(n, hkv, d))
    return out


class EvictionLaunchConfig(NamedTuple):
    block_n: int  # tokens per program
    block_k: int  # flattened value elements per inner step
    num_warps: int


def eviction_launch_config(n: int, hkv: int, d: int) -> EvictionLaunchConfig:
    """Tile sizes: more tokens per program for long batches (delta_weight is re-read per program), the
    [BLOCK_N, BLOCK_H, BLOCK_K] fp32 product kept at PRODUCT_ELEMS (64 registers a thread at 4 warps)."""
    block_h = triton.next_power_of_2(hkv)
    block_n = 32 if n >= 8192 else 16 if n >= 1024 else 8 if n >= 64 else 4
    block_k = max(16, min(triton.next_power_of_2(hkv * d), PRODUCT_ELEMS // (block_n * block_h)))
    return EvictionLaunchConfig(block_n, block_k, 4)


def launch_eviction_bias(v: torch.Tensor, A: torch.Tensor, delta_weight: torch.Tensor,
                         delta_bias: torch.Tensor | None, out: torch.Tensor,
                         block_n: int, block_k: int, num_warps: int) -> None:
    """Launch on the current stream without checks (eviction_bias checks; the benchmark sweeps tiles)."""
    n, hkv, d = v.shape
    bias = delta_bias if delta_bias is not None else A  # never read when HAS_BIAS is False
    guard = torch.cuda.device(v.device) if v.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _eviction_bias_kernel[(triton.cdiv(n, block_n),)](
            v, delta_weight, A, bias, out, n, v.stride(0), out.stride(0),
            H=hkv, KDIM=hkv * d, HAS_BIAS=delta_bias is not None,
            BLOCK_N=block_n, BLOCK_H=triton.next_power_of_2(hkv), BLOCK_K=block_k, num_warps=num_warps,
        )
