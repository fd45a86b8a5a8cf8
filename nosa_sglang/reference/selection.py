"""Which blocks a query attends (NOSA_SPEC.md, "Selection"): the one place the NOSA rule is written.

Pipeline for a query at position t (L = t + 1 tokens visible):
compressed keys K~ and eviction chunk scores e (means over kernel_size windows, stride kernel_stride)
-> query chunk scores s (softmax over chunks, summed over the GQA group) -> block max-pool of s and e
-> forced blocks -> top `query_blocks` by s -> fill to `topk_blocks` by e.
"""

from __future__ import annotations

import math

import torch

from nosa_sglang.config import NosaConfig

NEG_INF = float("-inf")
POS_INF = float("inf")


def _windows(x: torch.Tensor, dim: int, config: NosaConfig) -> torch.Tensor:
    """Mean over every complete kernel_size window (stride kernel_stride) along `dim`."""
    n = config.num_chunks(x.shape[dim])
    if n == 0:
        shape = list(x.shape)
        shape[dim] = 0
        return x.new_zeros(shape)
    # unfold appends the window as the last dim
    return x.unfold(dim, config.kernel_size, config.kernel_stride).mean(dim=-1)


def compress_keys(k: torch.Tensor, config: NosaConfig) -> torch.Tensor:
    """K~: [..., L, Hkv, d] post-RoPE keys -> [..., n_chunks, Hkv, d]; chunk i = mean(k[s*i : s*i+ks])."""
    if k.dim() < 3:
        raise ValueError(f"k: expected [..., L, Hkv, d], got shape {tuple(k.shape)}")
    return _windows(k, k.dim() - 3, config)


def compress_eviction(c: torch.Tensor, config: NosaConfig) -> torch.Tensor:
    """e: [..., L, Hkv] eviction scores -> [..., n_chunks, Hkv], the same windows as compress_keys."""
    if c.dim() < 2:
        raise ValueError(f"c: expected [..., L, Hkv], got shape {tuple(c.shape)}")
    return _windows(c, c.dim() - 2, config)


def chunk_query_scores(q: torch.Tensor, ck: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Stage-1 score s_i per KV head: softmax over visible chunks of q.K~/sqrt(d), summed over the group.

    Args:
        q: [T, Hq, d]; ck: [n, Hkv, d]; visible: [T, n] bool (None = all visible).
    Returns:
        s: [T, Hkv, n]; -inf where a chunk is not visible.
    """
    t, hq, d = q.shape
    n, hkv, _ = ck.shape
    qg = q.reshape(t, hkv, hq // hkv, d)
    logits = torch.einsum("thgd,nhd->thgn", qg, ck) / math.sqrt(d)
    if visible is not None:
        logits = logits.masked_fill(~visible[:, None, None, :], NEG_INF)
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no visible chunk -> zeros
    s = p.sum(dim=2)
    if visible is not None:
        s = s.masked_fill(~visible[:, None, :], NEG_INF)
    return s


def block_max_pool(chunk_scores: torch.Tensor, n_blocks: int, config: NosaConfig) -> torch.Tensor:
    """S_b = max over chunks [r*b - 1, r*b + r) of the chunk scores (r = block_size / kernel_stride).

    chunk_scores: [..., n] (-inf for absent chunks) -> [..., n_blocks]; -inf where a window is empty.
    """
    r = config.chunks_per_block
    n = chunk_scores.shape[-1]
    width = r * n_blocks + 1  # padded index p = chunk index + 1, windows [r*b, r*b + r]
    pad_right = width - 1 - n
    assert pad_right >= 0, f"{n} chunks cannot belong to {n_blocks} blocks"
    lead = chunk_scores.shape[:-1]
    padded = torch.cat(
        [chunk_scores.new_full((*lead, 1), NEG_INF), chunk_scores, chunk_scores.new_full((*lead, pad_right), NEG_INF)],
        dim=-1,
    )
    return padded.unfold(-1, r + 1, r).amax(dim=-1)


def _stable_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim; ties go to the lower block id (deterministic)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def select_from_block_scores(
    S: torch.Tensor, E: torch.Tensor, query_block: torch.Tensor, config: NosaConfig
) -> torch.Tensor:
    """The NOSA rule on block scores: forced + top-`query_blocks` by S, filled to `topk_blocks` by E.

    Args:
        S: [..., nb] query-aware block scores; E: [..., nb] eviction block scores.
        query_block: [...] long, qb = t // block_size of each row's query (blocks b > qb do not exist).
    Returns:
        [..., topk_blocks] long block ids, ascending, padded with -1 when fewer blocks exist.
    """
    nb = S.shape[-1]
    b = torch.arange(nb, device=S.device)
    qb = query_block.to(S.device).unsqueeze(-1)
    exists = b <= qb
    forced = exists & ((b < config.init_blocks) | (b >= qb - config.local_blocks))
    S = torch.where(forced, POS_INF, S).masked_fill(~exists, NEG_INF)
    q_idx = _stable_top(S, min(config.query_blocks, nb))
    in_q = torch.zeros_like(exists).scatter(-1, q_idx, True) & exists
    E = torch.where(in_q, POS_INF, E).masked_fill(~exists, NEG_INF)
    sel = _stable_top(E, min(config.topk_blocks, nb))
    # existing blocks sort before absent ones (ties at -inf keep the lower id), so absent = id > qb
    sel = torch.where(sel <= qb, sel, nb)
    sel = torch.sort(sel, dim=-1).values
    sel = torch.where(sel < nb, sel, -1)
    if sel.shape[-1] < config.topk_blocks:
        pad = sel.new_full((*sel.shape[:-1], config.topk_blocks - sel.shape[-1]), -1)
        sel = torch.cat([sel, pad], dim=-1)
    return sel


def block_scores_for_positions(
    q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, positions: torch.Tensor, config: NosaConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two block scores NOSA selects by, for query tokens at `positions` of one sequence.

    Args: as `select_blocks_for_positions`.
    Returns:
        (S, E): [T, Hkv, n_blocks] query-aware and eviction block scores (-inf: no visible chunk).
    """
    dt = q.dtype
    n_blocks = config.num_blocks(k.shape[0])
    ck = compress_keys(k.to(dt), config)  # [n, Hkv, d]
    ce = compress_eviction(c.to(dt), config)  # [n, Hkv]
    n = ck.shape[0]
    chunk_end = torch.arange(n, device=q.device) * config.kernel_stride + config.kernel_size  # exclusive
    visible = chunk_end[None, :] <= positions[:, None] + 1  # [T, n]
    s = chunk_query_scores(q, ck, visible)  # [T, Hkv, n]
    e = ce.T[None].expand(len(positions), -1, -1).masked_fill(~visible[:, None, :], NEG_INF)
    return block_max_pool(s, n_blocks, config), block_max_pool(e, n_blocks, config)


def select_blocks_for_positions(
    q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, positions: torch.Tensor, config: NosaConfig
) -> torch.Tensor:
    """Selection of one sequence for query tokens at `positions` (each sees tokens <= its position).

    Args:
        q: [T, Hq, d] queries; k: [L, Hkv, d] post-RoPE keys; c: [L, Hkv] eviction scores;
        positions: [T] long, each < L.
    Returns:
        [T, Hkv, topk_blocks] long, ascending block ids, -1 padded.
    """
    S, E = block_scores_for_positions(q, k, c, positions, config)
    qb = (positions // config.block_size)[:, None].expand(-1, k.shape[1])
    return select_from_block_scores(S, E, qb, config)
