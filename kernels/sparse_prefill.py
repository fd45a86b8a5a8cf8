"""Sparse prefill attention: every prompt token attends its own selected blocks (causal) with the bias.

Kernel design: one program = a tile of BLOCK_T consecutive tokens x the query heads of one KV group
(rows = token x head, 64 rows: tensor-core sized even at G = 4). Neighbouring tokens share most of
their selection (the forced local window and the eviction picks), so the program iterates the *union*
of its tokens' blocks (built in torch: sort, dedupe) and masks, per row, the blocks that row's token did
not select and the keys after it. Each union block is read once per tile instead of once per token.
The stage-1 prefill selection lives in `prefill_selection.py` (re-exported here).
A tile table gives each program its first query row, rows, position and its sequence's keys, so one
launch serves several sequences read as one (`sparse_prefill_batched`: a server's short extends).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.kernels._dispatch import (
    check_block_size, check_devices, check_extend, check_float, check_gqa, check_head_dim, check_index, check_shape,
    default_scale, fp32_dot, next_pow2, resolve_impl,
)
from nosa_sglang.kernels.prefill_selection import check_seqs, select_blocks_prefill, tokens_per_tile, upload_ints

__all__ = ["select_blocks_prefill", "sparse_prefill_attention", "sparse_prefill_batched", "sparse_prefill_torch",
           "union_blocks"]

LOG2E = 1.4426950408889634
UNION_PAD = torch.iinfo(torch.int32).max
#: launch options of the prefill kernel (wgmma on sm_90, no spills at 4 or 8 warps x 2 stages)
PREFILL_LAUNCH = {"num_warps": 4, "num_stages": 2}


def sparse_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c: torch.Tensor,
    block_ids: torch.Tensor,
    block_size: int,
    sm_scale: float | None = None,
    impl: str = "auto",
    q_start: int = 0,
) -> torch.Tensor:
    """Causal NOSA attention of one sequence, each token over its own selected blocks.

    Args:
        q: [E, Hq, d] queries of the positions q_start .. T - 1 (q_start > 0: an extend after a cached
            prefix or an earlier chunk); k, v: [T, Hkv, d] (q's dtype, last dim contiguous); c: [T, Hkv]
            float32.
        block_ids: [E, Hkv, topk] int32/int64 selected blocks of each query token (-1 = padding).
        block_size: tokens per block (a power of two >= 16 for the Triton path).
    Returns:
        [E, Hq, d] in q.dtype; the token at position t attends the keys j <= t of its selected blocks.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, 3)
    E, Hq, d = q.shape
    T, hkv = k.shape[0], k.shape[1]
    check_extend("q_start", q_start, E, T)
    check_shape("k", k, (T, hkv, d), "[T, Hkv, head_dim of q]")
    check_shape("v", v, tuple(k.shape), "k's shape")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise KernelArgumentError(f"{name}: dtype must equal q's {q.dtype}, got {t.dtype}")
    check_gqa(Hq, hkv)
    if not isinstance(c, torch.Tensor) or c.dtype != torch.float32:
        raise KernelArgumentError(f"c: expected a float32 tensor [{T}, {hkv}]")
    check_shape("c", c, (T, hkv), "[T, Hkv]")
    check_index("block_ids", block_ids, 3)
    if tuple(block_ids.shape[:2]) != (E, hkv):
        raise KernelArgumentError(f"block_ids: expected [{E}, {hkv}, topk], got {list(block_ids.shape)}")
    device = check_devices(q=q, k=k, v=v, c=c, block_ids=block_ids)
    scale = default_scale(sm_scale, d)
    use = resolve_impl(impl, device)
    check_block_size("block_size", block_size, use == "triton")
    check_head_dim("q", d, use == "triton")
    if use == "torch" or E == 0:
        return sparse_prefill_torch(q, k, v, c, block_ids, block_size, scale, q_start)
    return _sparse_prefill_triton(q, k, v, c, block_ids, block_size, scale, q_start)


def sparse_prefill_torch(q, k, v, c, block_ids, block_size: int, sm_scale: float, q_start: int = 0) -> torch.Tensor:
    """Pure torch, query tiles against the causal prefix (memory O(tile x Hq x T))."""
    E, Hq, d = q.shape
    T, hkv = k.shape[0], k.shape[1]
    G = Hq // hkv
    nb = -(-T // block_size)
    out = torch.empty_like(q)
    tile = max(16, min(256, (1 << 26) // max(1, Hq * T)))
    key_block = torch.arange(T, device=q.device) // block_size
    for lo in range(0, E, tile):
        hi = min(lo + tile, E)
        n_keys = q_start + hi  # the tile's last position + 1
        ids = block_ids[lo:hi].long()
        chosen = torch.zeros(hi - lo, hkv, nb + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, torch.where((ids < 0) | (ids >= nb), nb, ids), True)
        pos = torch.arange(q_start + lo, n_keys, device=q.device)
        causal = torch.arange(n_keys, device=q.device)[None, :] <= pos[:, None]
        mask = chosen[:, :, key_block[:n_keys]] & causal[:, None]
        qg = q[lo:hi].float().view(hi - lo, hkv, G, d)
        logits = torch.einsum("thgd,lhd->thgl", qg, k[:n_keys].float()) * sm_scale + c[:n_keys].T[None, :, None, :]
        p = torch.softmax(logits.masked_fill(~mask[:, :, None], float("-inf")), dim=-1).nan_to_num(0.0)
        out[lo:hi] = torch.einsum("thgl,lhd->thgd", p, v[:n_keys].float()).reshape(hi - lo, Hq, d).to(q.dtype)
    return out


def union_blocks(block_ids: torch.Tensor, tokens_per_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted union of the blocks of each tile of tokens, per KV head.

    Returns (ids [tiles, Hkv, tokens_per_tile * topk] int32 ascending, padded with INT32_MAX;
    counts [tiles, Hkv] int32).
    """
    T, hkv, topk = block_ids.shape
    tiles = -(-T // tokens_per_tile)
    ids = block_ids.to(torch.int32)
    if tiles * tokens_per_tile != T:
        ids = torch.cat([ids, ids.new_full((tiles * tokens_per_tile - T, hkv, topk), -1)])
    return _union_of_tiles(ids.view(tiles, tokens_per_tile, hkv, topk))


def _union_of_tiles(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """union_blocks of ids [tiles, tokens_per_tile, Hkv, topk] int32 (-1 = none)."""
    tiles, _, hkv, _ = ids.shape
    ids = ids.permute(0, 2, 1, 3).reshape(tiles, hkv, -1)
    ids = torch.where(ids < 0, UNION_PAD, ids).sort(dim=-1).values
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[..., 1:] = ids[..., 1:] == ids[..., :-1]
    ids = torch.where(dup, UNION_PAD, ids).sort(dim=-1).values
    return ids, (ids != UNION_PAD).sum(dim=-1, dtype=torch.int32)


def _sparse_prefill_triton(q, k, v, c, block_ids, block_size, scale, q_start):
    E = q.shape[0]
    block_t = tokens_per_tile(q.shape[1] // k.shape[1])
    union, counts = union_blocks(block_ids, block_t)
    tiles = [(t, min(block_t, E - t), q_start + t, 0, q_start + E) for t in range(0, E, block_t)]
    return _attend_tiles(q, k, v, c, block_ids, union, counts, tiles, block_size, scale)


def sparse_prefill_batched(q, k, v, c, block_ids, seqs: list[tuple[int, int, int]], block_size: int,
                           sm_scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """sparse_prefill_attention of several sequences in one launch (seqs and the layout as
    `select_blocks_prefill_batched`; block_ids: each row's blocks in its own sequence)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, 3)
    E, Hq, d = q.shape
    N, hkv = k.shape[0], k.shape[1]
    if k.dtype != q.dtype or v.dtype != q.dtype or tuple(v.shape) != tuple(k.shape) or c.dtype != torch.float32:
        raise KernelArgumentError(f"k, v: [N, Hkv, d] in q's dtype {q.dtype}, c: float32 [N, Hkv]; got "
                                  f"{k.dtype} {list(k.shape)}, {v.dtype} {list(v.shape)}, {c.dtype}")
    if tuple(block_ids.shape[:2]) != (E, hkv):
        raise KernelArgumentError(f"block_ids: expected {E} query rows of [Hkv={hkv}] selections, "
                                  f"got {list(block_ids.shape)}")
    rows = check_seqs(seqs, E, N, block_size)
    scale = default_scale(sm_scale, d)
    device = check_devices(q=q, k=k, v=v, c=c, block_ids=block_ids)
    if resolve_impl(impl, device) == "torch":  # the reference path: one sequence at a time
        return torch.cat([sparse_prefill_torch(q[r:r + n], k[b:b + T], v[b:b + T], c[b:b + T], block_ids[r:r + n],
                                               block_size, scale, T - n) for r, (n, b, T) in zip(rows, seqs)])
    check_block_size("block_size", block_size, True)
    check_head_dim("q", d, True)
    block_t = tokens_per_tile(Hq // hkv)
    tiles, tile_rows = [], []
    for r, (n, base, T) in zip(rows, seqs):
        for t in range(0, n, block_t):
            tiles.append((r + t, min(block_t, n - t), T - n + t, base, T))
            tile_rows.append([r + t + i if t + i < n else -1 for i in range(block_t)])
    idx = upload_ints(tile_rows, device)
    ids = torch.where(idx[..., None, None] >= 0, block_ids.to(torch.int32)[idx.clamp(min=0)], -1)
    union, counts = _union_of_tiles(ids)
    return _attend_tiles(q, k, v, c, block_ids, union, counts, tiles, block_size, scale)


def _attend_tiles(q, k, v, c, block_ids, union, counts, tiles, block_size, scale):
    """The kernel over tiles (q_row0, n_rows, pos0, key_base, n_keys): a tile's rows are positions pos0..
    of the sequence at keys key_base .. key_base + n_keys - 1, attending its blocks in `union`."""
    E, Hq, d = q.shape
    hkv, topk = k.shape[1], block_ids.shape[2]
    G = Hq // hkv
    g_pad = next_pow2(G)
    block_t = tokens_per_tile(G)
    out = torch.empty_like(q)
    _prefill_kernel[(union.shape[0], hkv)](
        q, k, v, c, block_ids, union, counts, out, upload_ints(tiles, q.device), scale * LOG2E, hkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), c.stride(0), c.stride(1),
        block_ids.stride(0), block_ids.stride(1), block_ids.stride(2), out.stride(0), out.stride(1),
        union.shape[2], topk,
        G=G, G_PAD=g_pad, BLOCK_T=block_t, HEAD_DIM=d, BLOCK_SIZE=block_size, TOPK_PAD=next_pow2(topk),
        IEEE=fp32_dot(q.dtype), **PREFILL_LAUNCH,
    )
    return out


@triton.jit
def _prefill_kernel(
    Q, K, V, C, IDS, UNION, COUNTS, O, TILES, scale_log2, n_kv_heads,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ct, s_ch, s_it, s_ih, s_in, s_ot, s_oh,
    union_width, topk,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TOPK_PAD: tl.constexpr, IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    # this tile: first query row, rows, position of the first, its sequence's keys (base, count)
    info = TILES + tile.to(tl.int64) * 5
    row0, n_rows, pos0 = tl.load(info), tl.load(info + 1), tl.load(info + 2)
    key_base, n_keys = tl.load(info + 3), tl.load(info + 4)
    K = K + key_base * s_kt
    V = V + key_base * s_vt
    C = C + key_base * s_ct
    M: tl.constexpr = BLOCK_T * G_PAD
    rows = tl.arange(0, M)
    t_in = rows // G_PAD
    tok = row0 + t_in  # query row; its position is pos0 + t_in
    g = rows % G_PAD
    row_ok = (t_in < n_rows) & (g < G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_k = tl.arange(0, BLOCK_SIZE)
    tok64 = tok.to(tl.int64)
    q = tl.load(Q + tok64[:, None] * s_qt + (h * G + g)[:, None] * s_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    # each tile token's own selection, to test membership of the union's blocks
    t_loc = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, TOPK_PAD)
    own = tl.load(IDS + (row0 + t_loc)[:, None] * s_it + h * s_ih + offs_n[None, :] * s_in,
                  mask=(t_loc[:, None] < n_rows) & (offs_n[None, :] < topk), other=-1)
    pos64 = pos0 + t_in

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, HEAD_DIM], tl.float32)
    u_row = UNION + (tile.to(tl.int64) * n_kv_heads + h) * union_width
    n_union = tl.load(COUNTS + tile * n_kv_heads + h)
    for u in range(0, n_union):
        blk = tl.load(u_row + u)
        member_t = tl.sum((own == blk).to(tl.int32), 1) > 0  # [BLOCK_T]
        member = tl.reshape(tl.broadcast_to(member_t[:, None], [BLOCK_T, G_PAD]), [M])
        key = blk.to(tl.int64) * BLOCK_SIZE + offs_k
        key_ok = key < n_keys
        kk = tl.load(K + key[:, None] * s_kt + h * s_kh + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        cc = tl.load(C + key * s_ct + h * s_ch, mask=key_ok, other=0.0)
        if IEEE:
            x = tl.dot(q, tl.trans(kk.to(tl.float32)), input_precision="ieee")
        else:
            x = tl.dot(q, tl.trans(kk))
        x = x * scale_log2 + cc[None, :] * 1.4426950408889634
        ok = member[:, None] & (key[None, :] <= pos64[:, None]) & key_ok[None, :]
        x = tl.where(ok, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(x - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(V + key[:, None] * s_vt + h * s_vh + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p, vv.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vv.dtype), vv)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + tok64[:, None] * s_ot + (h * G + g)[:, None] * s_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
