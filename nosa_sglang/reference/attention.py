"""NOSA attention over the selected blocks with the ED-DMA bias (NOSA_SPEC.md, "Attention").

o = sum_j softmax_j(q.k_j / sqrt(d) + c_j) v_j over the tokens j <= t of the selected blocks.
Decode loops over the batch (lengths differ); prefill tiles queries so T = 8192 fits in memory.
"""

from __future__ import annotations

import math

import torch

from nosa_sglang.config import NosaConfig
from nosa_sglang.reference._checks import check_dim, check_tensor, compute_dtype
from nosa_sglang.reference.selection import select_blocks_for_positions

PREFILL_QUERY_TILE = 256


def _check_gqa(q: torch.Tensor, k: torch.Tensor) -> None:
    hq, hkv = q.shape[-2], k.shape[-2]
    if hq % hkv:
        raise ValueError(f"q: Hq={hq} must be a multiple of Hkv={hkv} (k)")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q: head_dim {q.shape[-1]} must equal k's head_dim {k.shape[-1]}")


def token_mask(blocks: torch.Tensor, positions: torch.Tensor, n_keys: int, config: NosaConfig) -> torch.Tensor:
    """[T, Hkv, n_keys] bool: key j is attended by row t iff its block is selected and j <= position."""
    t, hkv, _ = blocks.shape
    nb = config.num_blocks(n_keys)
    selected = torch.zeros(t, hkv, nb + 1, dtype=torch.bool, device=blocks.device)
    selected.scatter_(-1, torch.where(blocks < 0, nb, blocks), True)  # -1 padding -> spill column
    key_block = torch.arange(n_keys, device=blocks.device) // config.block_size
    causal = torch.arange(n_keys, device=blocks.device)[None, :] <= positions[:, None]
    return selected[:, :, key_block] & causal[:, None, :]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Masked softmax attention with per-key bias. q [T, Hq, d]; k, v [L, Hkv, d]; c [L, Hkv];
    mask [T, Hkv, L] -> [T, Hq, d] (all in the compute dtype)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(t, hkv, hq // hkv, d)
    logits = torch.einsum("thgd,lhd->thgl", qg, k) / math.sqrt(d) + c.T[None, :, None, :]
    logits = logits.masked_fill(~mask[:, :, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("thgl,lhd->thgd", p, v).reshape(t, hq, d)


def select_blocks_decode(
    q: torch.Tensor, k_cache: torch.Tensor, c_cache: torch.Tensor, seq_lens: torch.Tensor, config: NosaConfig
) -> torch.Tensor:
    """Selected blocks of each sequence's last token.

    Args:
        q: [B, Hq, d] query of the token at position seq_len - 1; k_cache: [B, L, Hkv, d] post-RoPE keys;
        c_cache: [B, L, Hkv]; seq_lens: [B] (1 <= seq_len <= L).
    Returns:
        [B, Hkv, topk_blocks] long, ascending block ids, -1 padded.
    """
    _check_decode_args(q, k_cache, None, c_cache, seq_lens)
    dt = compute_dtype(q, k_cache, c_cache)
    out = []
    for b, L in enumerate(seq_lens.tolist()):
        pos = torch.tensor([L - 1], device=q.device)
        out.append(select_blocks_for_positions(q[b : b + 1].to(dt), k_cache[b, :L], c_cache[b, :L], pos, config)[0])
    return torch.stack(out)


def nosa_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    c_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    config: NosaConfig,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """NOSA decode attention of each sequence's last token -> [B, Hq, d] in the compute dtype.

    `blocks` ([B, Hkv, topk_blocks], from select_blocks_decode) may be given to reuse a selection.
    """
    _check_decode_args(q, k_cache, v_cache, c_cache, seq_lens)
    dt = compute_dtype(q, k_cache, v_cache, c_cache)
    if blocks is None:
        blocks = select_blocks_decode(q, k_cache, c_cache, seq_lens, config)
    out = []
    for b, L in enumerate(seq_lens.tolist()):
        pos = torch.tensor([L - 1], device=q.device)
        mask = token_mask(blocks[b : b + 1], pos, L, config)
        out.append(attend(q[b : b + 1].to(dt), k_cache[b, :L].to(dt), v_cache[b, :L].to(dt), c_cache[b, :L].to(dt), mask)[0])
    return torch.stack(out)


def select_blocks_prefill(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, config: NosaConfig) -> torch.Tensor:
    """Per-token selection of one prompt: q [T, Hq, d], k [T, Hkv, d], c [T, Hkv] -> [T, Hkv, topk]."""
    _check_prefill_args(q, k, k, c)
    dt = compute_dtype(q, k, c)
    pos = torch.arange(q.shape[0], device=q.device)
    return select_blocks_for_positions(q.to(dt), k.to(dt), c.to(dt), pos, config)


def nosa_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c: torch.Tensor,
    config: NosaConfig,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal NOSA attention of one prompt, every token with its own selection -> [T, Hq, d]."""
    _check_prefill_args(q, k, v, c)
    dt = compute_dtype(q, k, v, c)
    q, k, v, c = (x.to(dt) for x in (q, k, v, c))
    if blocks is None:
        blocks = select_blocks_prefill(q, k, c, config)
    out = torch.empty(q.shape, dtype=dt, device=q.device)
    for lo in range(0, q.shape[0], PREFILL_QUERY_TILE):
        hi = min(lo + PREFILL_QUERY_TILE, q.shape[0])
        pos = torch.arange(lo, hi, device=q.device)
        mask = token_mask(blocks[lo:hi], pos, hi, config)  # keys beyond the tile's last query are masked
        out[lo:hi] = attend(q[lo:hi], k[:hi], v[:hi], c[:hi], mask)
    return out


def _check_decode_args(q, k_cache, v_cache, c_cache, seq_lens) -> None:
    check_tensor("q", q, 3)
    check_tensor("k_cache", k_cache, 4)
    check_tensor("c_cache", c_cache, 3)
    if v_cache is not None:
        check_tensor("v_cache", v_cache, 4)
        if v_cache.shape != k_cache.shape:
            raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} must equal k_cache's {tuple(k_cache.shape)}")
    _check_gqa(q, k_cache)
    B, L, hkv, _ = k_cache.shape
    check_dim("q", q, 0, B, "batch of k_cache")
    if tuple(c_cache.shape) != (B, L, hkv):
        raise ValueError(f"c_cache: expected shape [{B}, {L}, {hkv}], got {tuple(c_cache.shape)}")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dim() != 1 or seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens: expected a [{B}] integer tensor")
    if seq_lens.dtype.is_floating_point or seq_lens.numel() and (seq_lens.min() < 1 or seq_lens.max() > L):
        raise ValueError(f"seq_lens: integers in [1, {L}] (the cache length) required, got {seq_lens.tolist()}")


def _check_prefill_args(q, k, v, c) -> None:
    check_tensor("q", q, 3)
    check_tensor("k", k, 3)
    check_tensor("v", v, 3)
    check_tensor("c", c, 2)
    _check_gqa(q, k)
    T, hkv, _ = k.shape
    check_dim("q", q, 0, T, "tokens of k")
    if v.shape != k.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} must equal k's {tuple(k.shape)}")
    if tuple(c.shape) != (T, hkv):
        raise ValueError(f"c: expected shape [{T}, {hkv}], got {tuple(c.shape)}")
