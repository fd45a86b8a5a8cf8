"""A sequence's tokens read token-major from a paged pool in run layout, in one pass.

Why: the extend after a cached prefix and the batched admission read whole sequences from the pool's
pages ([T, Hkv, d] K, V and [T, Hkv] c: what the prefill kernels and the compression take). Gathering
the runs (run-major) and then transposing them to token-major moved every byte twice, in two kernels
per tensor; this reads each (page, KV head) run once and writes its tokens where they go. A pure copy:
the same bits as the gather and the transpose.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.kernels._dispatch import check_index, next_pow2, resolve_impl


def read_page_tokens(k_runs: torch.Tensor, v_runs: torch.Tensor | None, c_runs: torch.Tensor, pages: torch.Tensor,
                     n_tokens: int, num_kv_heads: int, impl: str = "auto"
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(k, v [n_tokens, Hkv, d], c [n_tokens, Hkv]) of a sequence whose token i is on page
    pages[i // block_size] at offset i % block_size; v is None when v_runs is.

    Args:
        k_runs, v_runs: [runs, block_size * d] one layer's K and V (run = page * Hkv + head), on one device.
        c_runs: [runs, block_size] the layer's biases.
        pages: [>= ceil(n_tokens / block_size)] int page ids.
    """
    check_index("pages", pages, 1)
    H, bs = num_kv_heads, c_runs.shape[1]
    if k_runs.dim() != 2 or k_runs.shape[1] % bs or not k_runs.is_contiguous():
        raise KernelArgumentError(f"k_runs: expected a contiguous [runs, {bs} * d] tensor, got {list(k_runs.shape)}")
    d = k_runs.shape[1] // bs
    nb = -(-n_tokens // bs)
    if n_tokens < 0 or pages.shape[0] < nb:
        raise KernelArgumentError(f"pages: {pages.shape[0]} pages hold fewer than n_tokens={n_tokens} tokens "
                                  f"of {bs} per page")
    for name, t in (("v_runs", v_runs), ("c_runs", c_runs)):
        if t is not None and (t.shape[0] != k_runs.shape[0] or not t.is_contiguous() or t.device != k_runs.device):
            raise KernelArgumentError(f"{name}: expected contiguous {k_runs.shape[0]} runs on {k_runs.device} "
                                      f"like k_runs, got {list(t.shape)} on {t.device}")
    if resolve_impl(impl, k_runs.device) == "torch" or n_tokens == 0:
        return read_page_tokens_torch(k_runs, v_runs, c_runs, pages, n_tokens, H)
    pages = pages.to(k_runs.device)
    k = torch.empty((n_tokens, H, d), dtype=k_runs.dtype, device=k_runs.device)
    v = torch.empty_like(k) if v_runs is not None else None
    c = torch.empty((n_tokens, H), dtype=c_runs.dtype, device=c_runs.device)
    _page_tokens_kernel[(nb * H,)](
        k_runs, v_runs if v_runs is not None else k_runs, c_runs, pages, k, v if v is not None else k, c,
        n_tokens, H, HEAD_DIM=d, BLOCK_SIZE=bs, BLOCK_T=next_pow2(bs), BLOCK_D=next_pow2(d), WITH_V=v is not None,
        num_warps=4,
    )
    return k, v, c


def read_page_tokens_torch(k_runs, v_runs, c_runs, pages, n_tokens: int, num_kv_heads: int):
    """The gather of whole runs and the transpose to token-major (the statement the kernel is tested against)."""
    H, bs = num_kv_heads, c_runs.shape[1]
    nb = -(-n_tokens // bs)
    runs = (pages[:nb].to(k_runs.device).long()[:, None] * H + torch.arange(H, device=k_runs.device)).flatten()
    k, v = (None if x is None else runs_to_tokens(x[runs], n_tokens, H, bs) for x in (k_runs, v_runs))
    return k, v, runs_to_tokens(c_runs[runs], n_tokens, H, bs)


def runs_to_tokens(runs: torch.Tensor, n_tokens: int, num_kv_heads: int, block_size: int) -> torch.Tensor:
    """A sequence's runs in order (row j * Hkv + h: block j of head h), [nb * Hkv, block_size * d] or, one
    value a token (c), [nb * Hkv, block_size] -> token-major [n_tokens, Hkv, d] or [n_tokens, Hkv]."""
    nb, per_token = runs.shape[0] // num_kv_heads, runs.shape[1] // block_size
    x = runs.reshape(nb, num_kv_heads, block_size, per_token).transpose(1, 2)
    x = x.reshape(nb * block_size, num_kv_heads, per_token)[:n_tokens]
    return x.squeeze(-1) if runs.shape[1] == block_size else x


@triton.jit
def _page_tokens_kernel(K_RUNS, V_RUNS, C_RUNS, PAGES, K, V, C, n_tokens, n_kv_heads,
                        HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                        WITH_V: tl.constexpr):
    """One (block, KV head): its run's tokens to their rows of the token-major outputs (the model's
    block size and head dim are compile-time: the copies vectorize)."""
    pid = tl.program_id(0).to(tl.int64)
    blk = pid // n_kv_heads
    h = pid % n_kv_heads
    run = tl.load(PAGES + blk).to(tl.int64) * n_kv_heads + h
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    tok = blk * BLOCK_SIZE + offs_t
    ok = (offs_t < BLOCK_SIZE) & (tok < n_tokens)
    ok2 = ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    src = run * (BLOCK_SIZE * HEAD_DIM) + offs_t[:, None] * HEAD_DIM + offs_d[None, :]
    dst = (tok[:, None] * n_kv_heads + h) * HEAD_DIM + offs_d[None, :]
    tl.store(K + dst, tl.load(K_RUNS + src, mask=ok2), mask=ok2)
    if WITH_V:
        tl.store(V + dst, tl.load(V_RUNS + src, mask=ok2), mask=ok2)
    tl.store(C + tok * n_kv_heads + h, tl.load(C_RUNS + run * BLOCK_SIZE + offs_t, mask=ok), mask=ok)
