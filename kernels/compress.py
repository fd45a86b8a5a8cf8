"""Compressed keys K~ and eviction chunk means, whole-prompt and incremental (NOSA_SPEC.md step 1, 3).

Chunk i averages tokens [kernel_stride*i, kernel_stride*i + kernel_size). During decode a new chunk
completes exactly when the sequence reaches length L with L >= kernel_size and
(L - kernel_size) % kernel_stride == 0, so the runtime appends one compressed key every kernel_stride
tokens (1/16 of K) from the last kernel_size keys, instead of recompressing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.kernels._dispatch import check_float, check_index, check_shape, next_pow2, resolve_impl


class NewChunk(NamedTuple):
    """The chunk that ends at the newest token."""

    ck: torch.Tensor  #: [B, Hkv, d] mean of the last kernel_size keys (the keys' dtype)
    ce: torch.Tensor  #: [B, Hkv] float32 mean of the last kernel_size eviction biases


def num_chunks_of(seq_lens: torch.Tensor, config: NosaConfig) -> torch.Tensor:
    """Compressed keys that exist for each length (complete windows only), same dtype as seq_lens."""
    n = torch.div(seq_lens - config.kernel_size, config.kernel_stride, rounding_mode="floor") + 1
    return n.clamp(min=0)


def chunk_completes(seq_lens: torch.Tensor, config: NosaConfig) -> torch.Tensor:
    """[B] bool: the token that brought each sequence to `seq_lens` completed a new chunk."""
    rel = seq_lens - config.kernel_size
    return (rel >= 0) & (torch.remainder(rel, config.kernel_stride) == 0)


def compress_windows(x: torch.Tensor, config: NosaConfig) -> torch.Tensor:
    """Means of every complete window along dim 0: [L, ...] -> [n_chunks, ...] float32."""
    n = config.num_chunks(x.shape[0])
    if n == 0:
        return x.new_zeros((0, *x.shape[1:]), dtype=torch.float32)
    # unfold is a strided view (no copy); the mean accumulates in fp32 like the reference. NOTE: on a
    # contiguous input, so that the result does not depend on the caller's layout (the reduction order
    # follows the strides: a one-page read is a strided view, the same tokens read with others are not)
    return x.contiguous().unfold(0, config.kernel_size, config.kernel_stride).mean(dim=-1, dtype=torch.float32)


def compress_new_chunks(k_tail: torch.Tensor, c_tail: torch.Tensor, config: NosaConfig) -> NewChunk:
    """The chunk formed by the last kernel_size tokens of each sequence.

    Args:
        k_tail: [B, kernel_size, Hkv, d] the newest kernel_size post-RoPE keys (oldest first).
        c_tail: [B, kernel_size, Hkv] their eviction biases.
    Returns:
        NewChunk(ck [B, Hkv, d] in k_tail's dtype, ce [B, Hkv] float32). Only meaningful for rows where
        `chunk_completes(seq_lens)` is true; `append_new_chunks` applies it without a host sync.
    """
    check_float("k_tail", k_tail, 4)
    B, ks, hkv, d = k_tail.shape
    if ks != config.kernel_size:
        raise KernelArgumentError(f"k_tail: dim 1 must equal config.kernel_size={config.kernel_size}, got {ks}")
    check_shape("c_tail", c_tail, (B, ks, hkv), "[batch, kernel_size, Hkv] like k_tail")
    ck = k_tail.float().mean(dim=1).to(k_tail.dtype)
    ce = c_tail.float().mean(dim=1)
    return NewChunk(ck, ce)


def append_new_chunks(
    ck_buf: torch.Tensor,
    ce_buf: torch.Tensor,
    n_chunks: torch.Tensor,
    k_tail: torch.Tensor,
    c_tail: torch.Tensor,
    seq_lens: torch.Tensor,
    config: NosaConfig,
) -> None:
    """In place, without a host sync: rows whose newest token completed a chunk append it.

    Args:
        ck_buf: [B, Cmax, Hkv, d] compressed keys; ce_buf: [B, Cmax, Hkv] float32 chunk means.
        n_chunks: [B] int, chunks held before this token; incremented where a chunk completed.
        k_tail, c_tail: as in compress_new_chunks; seq_lens: [B] lengths *after* appending the token.
    """
    check_float("ck_buf", ck_buf, 4)
    B, cmax, hkv, d = ck_buf.shape
    check_shape("ce_buf", ce_buf, (B, cmax, hkv), "[batch, Cmax, Hkv] like ck_buf")
    check_index("n_chunks", n_chunks, 1)
    check_shape("n_chunks", n_chunks, (B,), "[batch]")
    check_index("seq_lens", seq_lens, 1)
    check_shape("seq_lens", seq_lens, (B,), "[batch]")
    new = compress_new_chunks(k_tail, c_tail, config)
    done = chunk_completes(seq_lens, config)
    rows = torch.arange(B, device=ck_buf.device)
    idx = n_chunks.long().clamp(max=max(cmax - 1, 0))
    # rows without a new chunk rewrite their current value at a valid index (no data-dependent branch)
    ck_buf[rows, idx] = torch.where(done[:, None, None], new.ck.to(ck_buf.dtype), ck_buf[rows, idx])
    ce_buf[rows, idx] = torch.where(done[:, None], new.ce.to(ce_buf.dtype), ce_buf[rows, idx])
    n_chunks.add_(done.to(n_chunks.dtype))


def complete_chunks(ck: torch.Tensor, ce: torch.Tensor, ring: torch.Tensor, c: torch.Tensor, rows: torch.Tensor,
                    pos: torch.Tensor, completes: torch.Tensor, chunk_ids: torch.Tensor, config: NosaConfig,
                    impl: str = "auto") -> None:
    """In place, one layer of a runtime's selection state: each request b whose token at pos[b] completed
    a chunk (completes[b] != 0) writes chunk chunk_ids[b] of its row rows[b]: K~ = the mean of its
    recent-key ring, the chunk mean = the mean of its last kernel_size biases; the others write nothing.
    One launch where torch needs ~15 (fixed shapes inside a decode graph: a masked write, no branch).

    Args:
        ck: [R, Cmax, Hkv, d] compressed keys; ce: [R, Cmax, Hkv] float32 chunk means.
        ring: [R, kernel_size, Hkv, d] the last kernel_size keys; c: [R, Hkv, max_tokens] float32 biases.
        rows, pos, completes, chunk_ids: [B] int.
    """
    check_float("ck", ck, 4)
    R, cmax, hkv, d = ck.shape
    check_shape("ce", ce, (R, cmax, hkv), "[rows, Cmax, Hkv] like ck")
    check_shape("ring", ring, (R, config.kernel_size, hkv, d), "[rows, kernel_size, Hkv, d]")
    check_float("ring", ring, 4)
    check_float("c", c, 3)
    for name, t in (("rows", rows), ("pos", pos), ("completes", completes), ("chunk_ids", chunk_ids)):
        check_index(name, t, 1)
        check_shape(name, t, rows.shape, "[batch] like rows")
    B = rows.shape[0]
    if resolve_impl(impl, ck.device) == "torch" or B == 0:
        complete_chunks_torch(ck, ce, ring, c, rows, pos, completes, chunk_ids, config)
        return
    _complete_chunks_kernel[(B * hkv,)](
        ck, ce, ring, c, rows, pos, completes, chunk_ids, hkv, d,
        *ck.stride()[:3], *ce.stride(), *ring.stride()[:3], *c.stride()[:2],
        KS=config.kernel_size, BLOCK_T=next_pow2(config.kernel_size), BLOCK_D=next_pow2(d), num_warps=1,
    )


def complete_chunks_torch(ck, ce, ring, c, rows, pos, completes, chunk_ids, config: NosaConfig) -> None:
    """The same writes as torch ops (rows without a new chunk rewrite theirs unchanged: no branch)."""
    ks = config.kernel_size
    done = completes != 0
    ck_new = ring[rows].float().mean(dim=1).to(ck.dtype)
    ck[rows, chunk_ids] = torch.where(done[:, None, None], ck_new, ck[rows, chunk_ids])
    start = (pos + 1 - ks).clamp(min=0)[:, None, None]
    heads = torch.arange(ce.shape[2], device=ce.device)
    window = c[rows[:, None, None], heads[None, :, None], start + torch.arange(ks, device=c.device)]
    ce[rows, chunk_ids] = torch.where(done[:, None], window.mean(dim=-1), ce[rows, chunk_ids])


@triton.jit
def _complete_chunks_kernel(
    CK, CE, RING, C, ROWS, POS, DONE, CHUNK, n_kv_heads, head_dim,
    s_kr, s_kc, s_kh, s_er, s_ec, s_eh, s_rr, s_rt, s_rh, s_cr, s_ch,
    KS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_kv_heads
    h = pid % n_kv_heads
    if tl.load(DONE + b) != 0:
        row = tl.load(ROWS + b).to(tl.int64)
        chunk = tl.load(CHUNK + b).to(tl.int64)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        in_window = offs_t < KS
        keys = tl.load(RING + row * s_rr + offs_t[:, None] * s_rt + h * s_rh + offs_d[None, :],
                       mask=in_window[:, None] & (offs_d[None, :] < head_dim), other=0.0).to(tl.float32)
        ck = tl.sum(keys, axis=0) / KS
        tl.store(CK + row * s_kr + chunk * s_kc + h * s_kh + offs_d, ck.to(CK.dtype.element_ty), mask=offs_d < head_dim)
        start = tl.maximum(tl.load(POS + b).to(tl.int64) + 1 - KS, 0)
        bias = tl.load(C + row * s_cr + h * s_ch + start + offs_t, mask=in_window, other=0.0)
        tl.store(CE + row * s_er + chunk * s_ec + h * s_eh, tl.sum(bias, axis=0) / KS)
