"""Fused eviction head (NOSA_SPEC.md, "ED-DMA"): c[n, h] = A[h] * softplus(delta(v_n flattened))[h].

The head is bound by reading v once (N * Hkv * d elements); delta_weight is small and L2-resident. One
program handles BLOCK_N tokens and streams their flattened values as [BLOCK_N, BLOCK_K] tiles.

* 16-bit v (the serving case): a tensor-core tl.dot of the v tile with the transposed weight tile
  [BLOCK_K, BLOCK_H], BLOCK_H = Hkv padded to >= 16 (zero rows, never read from memory). Products of
  two 16-bit floats are exact in fp32 and the accumulator is fp32, so only the operands' own rounding
  matters. An operand that is not in the dot's 16-bit type is split exactly-enough into hi + lo parts
  (fp32 -> 16 of 24 mantissa bits, fp16 -> bf16 exactly) and the partial dots are summed, so an fp32
  delta_weight keeps ~1e-5 accuracy instead of bf16's 4e-3. The dot type is fp16 only when v and the
  weight both are fp16 (exact, no split); otherwise bf16, whose exponent range is fp32's (no overflow).
  The loop over K is software-pipelined (num_stages): the tiles go to shared memory by cp.async.
* fp32 v: tf32 tensor cores would round v to 10 mantissa bits (~1e-3 relative, over the 1e-4 fp32
  tolerance), so the same pipelined loop runs tl.dot(input_precision="ieee"): exact fp32 FMAs, with
  the tile layout and shared-memory staging of a dot (no cross-thread reduction).
* use_dot=False (kept for the benchmark's comparison, any dtype): a [BLOCK_N, BLOCK_H, BLOCK_K] fp32
  multiply-add, unrolled over K and reduced over K once, after the loop.
Tiles come from eviction_launch_config (a heuristic, no run-time autotuning); registers and shared
memory of every default were checked offline for sm_90 with Triton 3.6 and 3.8 (33-108 registers, no
spills; bf16 -> mma.sync at 16-32 tokens a program, wgmma m64n16k16 at 64; 16-byte cp.async loads).
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
DOT_MIN = 16  # tl.dot needs every tile dimension >= 16
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
def _split(x, DT: tl.constexpr):
    # x = hi + lo with hi, lo of dtype DT (lo carries the bits hi rounded away; both exact in fp32)
    x32 = x.to(tl.float32)
    hi = x32.to(DT)
    return hi, (x32 - hi.to(tl.float32)).to(DT)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # UPCAST (interpreter only, whose bf16 tl.dot returns garbage): the same exact products in fp32
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _tile_dot(v, wt, acc, UPCAST: tl.constexpr):
    # acc += v @ wt: tensor cores in one 16-bit type DT for 16-bit v (hi/lo split of the other operand),
    # an exact fp32 FMA dot (never tf32) for fp32 v
    VT: tl.constexpr = v.dtype
    WT: tl.constexpr = wt.dtype
    if VT == tl.float32:
        return tl.dot(v, wt.to(tl.float32), acc, input_precision="ieee")
    DT: tl.constexpr = tl.float16 if (VT == tl.float16 and WT == tl.float16) else tl.bfloat16
    if VT == DT:
        v_hi = v
    else:
        v_hi, v_lo = _split(v, DT)
    if WT == DT:
        acc = _dot(v_hi, wt, acc, UPCAST)
        if VT != DT:
            acc = _dot(v_lo, wt, acc, UPCAST)
    else:
        w_hi, w_lo = _split(wt, DT)
        acc = _dot(v_hi, w_hi, acc, UPCAST)
        acc = _dot(v_hi, w_lo, acc, UPCAST)
        if VT != DT:  # v_lo * w_lo is below 2^-16 relative: dropped
            acc = _dot(v_lo, w_hi, acc, UPCAST)
    return acc


@triton.jit(do_not_specialize=["n_tokens"])  # only masks use it: one compiled variant for every N
def _eviction_bias_kernel(v_ptr, w_ptr, a_ptr, b_ptr, c_ptr, n_tokens, stride_vn, stride_cn,
                          H: tl.constexpr, KDIM: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
                          UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    n_mask = offs_n < n_tokens
    h_mask = offs_h < H
    v_rows = v_ptr + offs_n.to(tl.int64)[:, None] * stride_vn
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        for k0 in range(0, KDIM, BLOCK_K):  # pipelined by num_stages (cp.async into shared memory)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < KDIM
            # v is streamed once: evict_first keeps the weight tiles, re-read by every program, in L2
            v = tl.load(v_rows + offs_k[None, :], mask=n_mask[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
            wt = tl.load(w_ptr + offs_h[None, :] * KDIM + offs_k[:, None], mask=h_mask[None, :] & k_ok[:, None],
                         other=0.0)  # [BLOCK_K, BLOCK_H]: column h is row h of delta_weight
            acc = _tile_dot(v, wt, acc, UPCAST)
    else:
        acc3 = tl.zeros([BLOCK_N, BLOCK_H, BLOCK_K], dtype=tl.float32)
        for k0 in tl.static_range(0, KDIM, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < KDIM
            v = tl.load(v_rows + offs_k[None, :], mask=n_mask[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + offs_h[:, None] * KDIM + offs_k[None, :], mask=h_mask[:, None] & k_ok[None, :],
                        other=0.0)
            acc3 += v.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        acc = tl.sum(acc3, axis=2)  # one cross-thread reduction, after the loop
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
    config = eviction_launch_config(n, hkv, d, v.dtype, delta_weight.dtype)
    launch_eviction_bias(v, A, delta_weight, delta_bias, out, config)
    return out


class EvictionLaunchConfig(NamedTuple):
    use_dot: bool  # tl.dot K loop (tensor cores for 16-bit v, exact FMA dot for fp32) or 3-D fp32 multiply-add
    block_n: int  # tokens per program
    block_k: int  # flattened value elements per loop step
    num_warps: int
    num_stages: int  # software-pipeline depth of the dot path's K loop (the multiply-add path is unrolled)


def eviction_launch_config(n: int, hkv: int, d: int, v_dtype: torch.dtype,
                           w_dtype: torch.dtype) -> EvictionLaunchConfig:
    """Tiles from (N, Hkv, d, dtypes) alone: no run-time autotuning, 3 compiled variants per shape.

    ~One program per multiprocessor already at N = 4096 (32 tokens each), up to 64 tokens (wgmma's M)
    so the weight, re-read by every program, stays <= Hkv / BLOCK_N of the v bytes; decode batches
    (N <= 2048, one compiled variant) take 16. Bf16/fp16 tiles of 8-16 KiB, up to 3 loaded ahead of the
    one in use (fewer when K has fewer steps), hide the memory latency; fp32 v (FMA dot) and mixed dtypes (hi/lo split, 2-3 dots) take 64-wide steps, which
    compile without spills on sm_90 (Triton 3.6 and 3.8).
    """
    block_n = 16 if n <= 2048 else 32 if n <= 8192 else 64
    if v_dtype == torch.float32:
        block_k, stages = (64 if block_n <= 32 else 32), 3
    elif w_dtype != v_dtype:  # hi/lo split: 2-3 dots on converted tiles
        block_k, stages = 64, 3
    else:
        block_k, stages = (256 if block_n <= 32 else 128), 4
    block_k = max(DOT_MIN, min(triton.next_power_of_2(hkv * d), block_k))
    steps = triton.cdiv(hkv * d, block_k)  # stages beyond steps + 1 would only hold idle shared memory
    return EvictionLaunchConfig(True, block_n, block_k, 4, min(stages, steps + 1))


def launch_eviction_bias(v: torch.Tensor, A: torch.Tensor, delta_weight: torch.Tensor,
                         delta_bias: torch.Tensor | None, out: torch.Tensor, config: EvictionLaunchConfig) -> object:
    """Launch on the current stream without checks (eviction_bias checks; the benchmark sweeps tiles).
    Returns Triton's launch handle (on CUDA its .asm holds the PTX)."""
    n, hkv, d = v.shape
    if config.use_dot and min(config.block_n, config.block_k) < DOT_MIN:
        raise KernelArgumentError(f"config: the dot path takes block_n and block_k >= {DOT_MIN}, got {config}")
    block_h = triton.next_power_of_2(hkv)
    block_h = max(DOT_MIN, block_h) if config.use_dot else block_h
    bias = delta_bias if delta_bias is not None else A  # never read when HAS_BIAS is False
    guard = torch.cuda.device(v.device) if v.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        return _eviction_bias_kernel[(triton.cdiv(n, config.block_n),)](
            v, delta_weight, A, bias, out, n, v.stride(0), out.stride(0),
            H=hkv, KDIM=hkv * d, HAS_BIAS=delta_bias is not None, USE_DOT=config.use_dot,
            UPCAST=triton_interpreting(_eviction_bias_kernel),
            BLOCK_N=config.block_n, BLOCK_H=block_h, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
