"""Compressed keys K~ and eviction chunk means, whole-prompt and incremental (NOSA_SPEC.md step 1, 3).

Chunk i averages tokens [kernel_stride*i, kernel_stride*i + kernel_size). During decode a new chunk
completes exactly when the sequence reaches length L with L >= kernel_size and
(L - kernel_size) % kernel_stride == 0, so the runtime appends one compressed key every kernel_stride
tokens (1/16 of K) from the last kernel_size keys, instead of recompressing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.kernels._dispatch import check_float, check_index, check_shape


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
