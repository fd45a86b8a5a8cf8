"""Prefill selection: stage-1 scores of every prompt token against the chunks complete at its position.

Exact NOSA prefill needs, per token t and KV head, S_b and E_b over the chunks visible at t. The
[T, n_chunks] score matrix per query head is never stored: one program takes a tile of tokens x GQA
heads (64 rows), pass 1 streams the visible compressed keys for each row's log-sum-exp, pass 2
recomputes the logits window by window, normalises, sums the group and max-pools straight into
[tokens, blocks] scores (forced +inf, absent -inf), and pools the eviction means with the same per-token
visibility. Tokens go through in slices so S and E stay ~256 MiB; the top-k glue (`topk.py`) then picks
each token's blocks. A tile table gives each program its query and output rows, positions and chunk
base, so one launch serves several sequences read as one (`select_blocks_prefill_batched`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.kernels._dispatch import (
    check_devices, check_extend, check_float, check_gqa, check_head_dim, check_shape, fp32_dot, next_pow2, resolve_impl,
)
from nosa_sglang.kernels.compress import compress_windows
from nosa_sglang.kernels.selection import pool_chunks_torch
from nosa_sglang.kernels.topk import forced_and_existing, select_topk

LOG2E = 1.4426950408889634
ROWS_PER_TILE = 64
CHUNK_TILE = 64
BLOCK_TILE = 16
SCORE_BUDGET_FLOATS = 1 << 25  # per S / E slice (128 MiB each)


def select_blocks_prefill(
    q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, config: NosaConfig, impl: str = "auto", q_start: int = 0
) -> torch.Tensor:
    """Per-token NOSA selection of one prompt (each token sees the chunks complete at its position).

    Args:
        q: [E, Hq, d] queries of the positions q_start .. T - 1 (an extend after a cached prefix or an
            earlier chunk: q_start = the prefix's length); k: [T, Hkv, d] post-RoPE keys of the whole
            sequence (q's dtype); c: [T, Hkv] float32 eviction bias.
    Returns:
        [E, Hkv, topk_blocks] int32 ascending block ids, -1 padded.
    """
    check_float("q", q, 3)
    check_float("k", k, 3)
    E, Hq, d = q.shape
    T, hkv = k.shape[0], k.shape[1]
    check_extend("q_start", q_start, E, T)
    check_shape("k", k, (T, hkv, d), "[T, Hkv, head_dim of q]")
    G = check_gqa(Hq, hkv)
    if not isinstance(c, torch.Tensor) or c.dtype != torch.float32:
        raise KernelArgumentError(f"c: expected a float32 tensor [{T}, {hkv}]")
    check_shape("c", c, (T, hkv), "[T, Hkv]")
    device = check_devices(q=q, k=k, c=c)
    use = resolve_impl(impl, device)
    check_head_dim("q", d, use == "triton")
    nb = config.num_blocks(T)
    out = torch.empty((E, hkv, config.topk_blocks), dtype=torch.int32, device=device)
    if E == 0:
        return out
    ck = compress_windows(k, config)  # [n, Hkv, d] float32
    ce = compress_windows(c, config)  # [n, Hkv] float32
    if use == "triton":
        ck = ck.to(q.dtype)
    rows = max(ROWS_PER_TILE, (SCORE_BUDGET_FLOATS // max(1, hkv * nb)) // ROWS_PER_TILE * ROWS_PER_TILE)
    if use == "torch":  # the torch path also holds [rows, Hq, n_chunks] logits
        rows = max(1, min(rows, SCORE_BUDGET_FLOATS // max(1, Hq * ck.shape[0])))
    for lo in range(q_start, T, rows):
        hi = min(T, lo + rows)
        if use == "torch":
            S, Ev = prefill_block_scores_torch(q[lo - q_start:hi - q_start], ck, ce, lo, config, nb)
        else:
            S, Ev = _prefill_block_scores_triton(q, q_start, ck, ce, lo, hi, config, nb, G)
        seq_lens = torch.arange(lo + 1, hi + 1, device=device, dtype=torch.int32)
        out[lo - q_start:hi - q_start] = select_topk(S, Ev, seq_lens, config, impl=use)
    return out


def select_blocks_prefill_batched(
    q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, seqs: list[tuple[int, int, int]], config: NosaConfig,
    impl: str = "auto",
) -> torch.Tensor:
    """select_blocks_prefill of several sequences in one launch of each kernel: what a server's extends
    of a few tokens over long cached prefixes need (one call per sequence is ~15 launches each).

    Args:
        seqs: [(n_i, base_i, T_i)] in q's row order: sequence i is k[base_i : base_i + T_i] (base_i a
            multiple of block_size: the sequences' pages read as one), its queries the next n_i rows of
            q, at positions T_i - n_i .. T_i - 1.
        q, k, c: as select_blocks_prefill, k and c holding all the sequences.
    Returns:
        [sum n_i, Hkv, topk_blocks] int32: each row's blocks in its own sequence, as select_blocks_prefill.
    """
    check_float("q", q, 3)
    check_float("k", k, 3)
    E, Hq, d = q.shape
    N, hkv = k.shape[0], k.shape[1]
    G = check_gqa(Hq, hkv)
    if not isinstance(c, torch.Tensor) or c.dtype != torch.float32 or tuple(c.shape) != (N, hkv):
        raise KernelArgumentError(f"c: expected a float32 tensor [{N}, {hkv}]")
    rows = check_seqs(seqs, E, N, config.block_size)
    device = check_devices(q=q, k=k, c=c)
    use = resolve_impl(impl, device)
    if use == "torch":  # the reference path: one sequence at a time
        return torch.cat([select_blocks_prefill(q[r:r + n], k[b:b + T], c[b:b + T], config, impl=use, q_start=T - n)
                          for r, (n, b, T) in zip(rows, seqs)])
    check_head_dim("q", d, True)
    ck = compress_windows(k, config).to(q.dtype)
    ce = compress_windows(c, config)
    nb = max(config.num_blocks(T) for _, _, T in seqs)
    S = torch.empty((E, hkv, nb), dtype=torch.float32, device=device)
    Ev = torch.empty_like(S)
    tiles, row, seq_lens = [], 0, []
    for n, base, T in seqs:
        tiles.append((row, row, T - n, T, base // config.kernel_stride))
        seq_lens += range(T - n + 1, T + 1)
        row += n
    _scores_by_tiles(q, ck, ce, S, Ev, scores_tiles(tiles, G), config, G)
    return select_topk(S, Ev, upload_ints(seq_lens, device, torch.int32), config, impl=use)


def prefill_block_scores_torch(q, ck, ce, lo: int, config: NosaConfig, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S, E [Tt, Hkv, NB] of the tokens lo .. lo + Tt - 1 (q holds just those rows)."""
    Tt, Hq, d = q.shape
    n, hkv = ce.shape
    pos = torch.arange(lo, lo + Tt, device=q.device)
    chunk_end = torch.arange(n, device=q.device) * config.kernel_stride + config.kernel_size
    visible = chunk_end[None, :] <= pos[:, None] + 1  # [Tt, n]
    logits = torch.einsum("thgd,nhd->thgn", q.float().view(Tt, hkv, Hq // hkv, d), ck.float()) / math.sqrt(d)
    p = torch.softmax(logits.masked_fill(~visible[:, None, None], float("-inf")), -1).nan_to_num(0.0)
    s = p.sum(dim=2).masked_fill(~visible[:, None], float("-inf"))
    e = ce.T[None].masked_fill(~visible[:, None], float("-inf"))
    exists, forced = forced_and_existing(pos + 1, nb, config)
    S = torch.where(forced, float("inf"), pool_chunks_torch(s, nb, config)).masked_fill(~exists, float("-inf"))
    E = pool_chunks_torch(e, nb, config).masked_fill(~exists, float("-inf"))
    return S, E


def check_seqs(seqs: list[tuple[int, int, int]], n_rows: int, n_keys: int, block_size: int) -> list[int]:
    """Validate the batched prefills' `seqs` [(n, base, T)] against q's n_rows and k's n_keys; returns each
    sequence's first query row."""
    rows = [0]
    for i, (n, base, T) in enumerate(seqs):
        if base % block_size or not 0 < n <= T or base + T > n_keys:
            raise KernelArgumentError(f"seqs[{i}] = {(n, base, T)}: need base % {block_size} == 0, "
                                      f"0 < n <= T and base + T <= {n_keys}")
        rows.append(rows[-1] + n)
    if rows[-1] != n_rows:
        raise KernelArgumentError(f"seqs: {rows[-1]} query rows in all, q has {n_rows}")
    return rows[:-1]


def tokens_per_tile(G: int) -> int:
    """Query tokens per program of the prefill kernels (a tile is BLOCK_T tokens x the padded group)."""
    return max(1, ROWS_PER_TILE // next_pow2(G))


def upload_ints(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host integers (a tile table: rows of fields) on `device` without a sync (pinned, non-blocking)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def scores_tiles(seqs: list[tuple[int, int, int, int]], G: int) -> list[tuple[int, int, int, int, int]]:
    """Tiles of the scores kernel: per sequence (q_row0, out_row0, pos0, pos_end, chunk_base) in steps
    of tokens_per_tile: query rows q_row0.., output rows out_row0.. hold positions pos0 .. pos_end - 1."""
    bt, tiles = tokens_per_tile(G), []
    for q_row0, out_row0, pos0, pos_end, cbase in seqs:
        tiles += [(q_row0 + t, out_row0 + t, pos0 + t, pos_end, cbase) for t in range(0, pos_end - pos0, bt)]
    return tiles


def _prefill_block_scores_triton(q, q_start, ck, ce, lo, hi, config: NosaConfig, nb: int, G: int):
    S = torch.empty((hi - lo, ck.shape[1], nb), dtype=torch.float32, device=q.device)
    E = torch.empty_like(S)
    return _scores_by_tiles(q, ck, ce, S, E, scores_tiles([(lo - q_start, 0, lo, hi, 0)], G), config, G)


def _scores_by_tiles(q, ck, ce, S, E, tiles, config: NosaConfig, G: int):
    """S, E rows of every tile (a tile's rows belong to one sequence, its compressed keys from chunk_base)."""
    _, Hq, d = q.shape
    hkv, nb = ck.shape[1], S.shape[2]
    g_pad = next_pow2(G)
    block_t = tokens_per_tile(G)
    r = config.chunks_per_block
    _prefill_scores_kernel[(len(tiles), hkv)](
        q, ck, ce, S, E, upload_ints(tiles, q.device), LOG2E / math.sqrt(d), nb,
        q.stride(0), q.stride(1), ck.stride(0), ck.stride(1), ce.stride(0), ce.stride(1),
        G=G, G_PAD=g_pad, BLOCK_T=block_t, HEAD_DIM=d, BLOCK_C=CHUNK_TILE, BLOCK_NB=BLOCK_TILE,
        R=r, R_PAD=next_pow2(r), STRIDE=config.kernel_stride, KSIZE=config.kernel_size,
        BLOCK_SIZE=config.block_size, INIT=config.init_blocks, LOCAL=config.local_blocks,
        IEEE=fp32_dot(q.dtype), num_warps=4,
    )
    return S, E


@triton.jit
def _scores(q, CK, ch, ok, h, s_cn, s_ch, scale_log2, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr):
    """Base-2 logits [rows, len(ch)] of q against compressed keys `ch` (zeros where not ok)."""
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(CK + ch.to(tl.int64)[:, None] * s_cn + h * s_ch + offs_d[None, :], mask=ok[:, None], other=0.0)
    if IEEE:
        x = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        x = tl.dot(q, tl.trans(k))
    return x * scale_log2


@triton.jit
def _group_pool(x, lse, vis_rows, vis_tok, BLOCK_T: tl.constexpr, G_PAD: tl.constexpr, W: tl.constexpr):
    """Probabilities of logits x [rows, W], summed over the GQA group -> [BLOCK_T, W] (-inf if hidden)."""
    p = tl.where(vis_rows, tl.exp2(x - lse[:, None]), 0.0)
    s = tl.sum(tl.reshape(p, [BLOCK_T, G_PAD, W]), 1)
    return tl.where(vis_tok, s, float("-inf"))


@triton.jit
def _prefill_scores_kernel(
    Q, CK, CE, S, E, TILES, scale_log2, nb, s_qt, s_qh, s_cn, s_ch, s_en, s_eh,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_NB: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
    STRIDE: tl.constexpr, KSIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, INIT: tl.constexpr,
    LOCAL: tl.constexpr, IEEE: tl.constexpr,
):
    h = tl.program_id(1)
    # this tile: query row, output row, position of its first token, its sequence's end, chunk base
    tile = TILES + tl.program_id(0).to(tl.int64) * 5
    q_row0, out_row0, cbase = tl.load(tile), tl.load(tile + 1), tl.load(tile + 4)
    t0, hi = tl.load(tile + 2).to(tl.int32), tl.load(tile + 3).to(tl.int32)  # positions: int32 as before
    CK = CK + cbase * s_cn
    CE = CE + cbase * s_en
    M: tl.constexpr = BLOCK_T * G_PAD
    X: tl.constexpr = BLOCK_NB * R_PAD
    rows = tl.arange(0, M)
    tok = t0 + rows // G_PAD
    g = rows % G_PAD
    row_ok = (tok < hi) & (g < G)
    q = tl.load(Q + (q_row0 + tok - t0)[:, None] * s_qt + (h * G + g)[:, None] * s_qh + tl.arange(0, HEAD_DIM)[None, :],
                mask=row_ok[:, None], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    # chunks visible to a token t: complete windows of t + 1 tokens
    n_vis = tl.where(tok + 1 >= KSIZE, (tok + 1 - KSIZE) // STRIDE + 1, 0)
    n_vis = tl.where(row_ok, n_vis, 0)
    tok_t = t0 + tl.arange(0, BLOCK_T)
    n_vis_t = tl.where((tok_t < hi) & (tok_t + 1 >= KSIZE), (tok_t + 1 - KSIZE) // STRIDE + 1, 0)
    n_tile = tl.max(n_vis_t, 0)

    # pass 1: log-sum-exp of each row over its visible chunks
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, n_tile, BLOCK_C):
        ch = c0 + offs_c
        x = _scores(q, CK, ch, ch < n_tile, h, s_cn, s_ch, scale_log2, HEAD_DIM, IEEE)
        x = tl.where(ch[None, :] < n_vis[:, None], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(x - m_use[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), 0.0)

    # pass 2: blocks whose window [R*b - 1, R*b + R) can hold a visible chunk
    qb_t = tok_t // BLOCK_SIZE
    out_row = (out_row0 + tok_t - t0)[:, None] * (tl.num_programs(1) * nb) + h * nb
    offs_j = tl.arange(0, X)
    nb_compute = tl.minimum(n_tile // R + 1, nb)
    offs_b = tl.arange(0, BLOCK_NB)
    offs_r = tl.arange(0, R_PAD)
    # the left chunk of block b (R*b - 1) is the last chunk of block b - 1: reuse that very value
    # (recomputing it in another dot could round differently and break the pooled ties)
    carry = tl.full([BLOCK_T], float("-inf"), tl.float32)
    for b0 in range(0, nb_compute, BLOCK_NB):
        ch_m = (b0 + offs_j // R_PAD) * R + offs_j % R_PAD
        ok_m = (offs_j % R_PAD < R) & (ch_m < n_tile)
        blk = b0 + offs_b
        ch_l = blk * R - 1
        ok_l = (ch_l >= 0) & (ch_l < n_tile)
        vis_m_t = ok_m[None, :] & (ch_m[None, :] < n_vis_t[:, None])
        vis_l_t = ok_l[None, :] & (ch_l[None, :] < n_vis_t[:, None])
        x = _scores(q, CK, ch_m, ok_m, h, s_cn, s_ch, scale_log2, HEAD_DIM, IEEE)
        s_m = tl.reshape(
            _group_pool(x, lse, ok_m[None, :] & (ch_m[None, :] < n_vis[:, None]), vis_m_t, BLOCK_T, G_PAD, X),
            [BLOCK_T, BLOCK_NB, R_PAD],
        )
        last = tl.max(tl.where(offs_r[None, None, :] == R - 1, s_m, float("-inf")), 2)  # [BLOCK_T, BLOCK_NB]
        prev = tl.broadcast_to(tl.maximum(offs_b - 1, 0)[None, :], [BLOCK_T, BLOCK_NB])
        s_l = tl.where(offs_b[None, :] == 0, carry[:, None], tl.gather(last, prev, 1))
        carry = tl.max(tl.where(offs_b[None, :] == BLOCK_NB - 1, last, float("-inf")), 1)
        s_b = tl.maximum(tl.max(s_m, 2), s_l)
        e_m = tl.load(CE + ch_m.to(tl.int64) * s_en + h * s_eh, mask=ok_m, other=0.0)
        e_l = tl.load(CE + ch_l.to(tl.int64) * s_en + h * s_eh, mask=ok_l, other=0.0)
        e_m = tl.where(vis_m_t, e_m[None, :], float("-inf"))
        e_l = tl.where(vis_l_t, e_l[None, :], float("-inf"))
        e_b = tl.maximum(tl.max(tl.reshape(e_m, [BLOCK_T, BLOCK_NB, R_PAD]), 2), e_l)
        exists = blk[None, :] <= qb_t[:, None]
        forced = exists & ((blk[None, :] < INIT) | (blk[None, :] >= qb_t[:, None] - LOCAL))
        s_b = tl.where(forced, float("inf"), tl.where(exists, s_b, float("-inf")))
        e_b = tl.where(exists, e_b, float("-inf"))
        st = (tok_t[:, None] < hi) & (blk[None, :] < nb)
        tl.store(S + out_row + blk[None, :], s_b, mask=st)
        tl.store(E + out_row + blk[None, :], e_b, mask=st)
    # the remaining blocks have no visible chunk: forced ones +inf, the rest -inf
    for b0 in range(tl.cdiv(nb_compute, BLOCK_NB) * BLOCK_NB, nb, BLOCK_NB):
        blk = b0 + tl.arange(0, BLOCK_NB)
        exists = blk[None, :] <= qb_t[:, None]
        forced = exists & ((blk[None, :] < INIT) | (blk[None, :] >= qb_t[:, None] - LOCAL))
        s_b = tl.where(forced, float("inf"), float("-inf"))
        st = (tok_t[:, None] < hi) & (blk[None, :] < nb)
        tl.store(S + out_row + blk[None, :], s_b, mask=st)
        tl.store(E + out_row + blk[None, :], tl.full([BLOCK_T, BLOCK_NB], float("-inf"), tl.float32), mask=st)
