"""Decode-time selection scores (NOSA_SPEC.md, selection steps 2-4), plus the selection entry points.

Stage 1 reads each request's compressed keys once: kernel 1 (split over chunk ranges so batch 1 fills
the GPU) writes the base-2 logits q.K~ of every query head of a KV group to a small fp32 workspace
(G x n_chunks floats, 1/32 of K~ for G = 4 at d = 128) with per-split running max/sum; kernel 2 merges
the splits into each head's log-sum-exp and writes each chunk's probability summed over the group
(once per chunk: pooled ties must stay ties); kernel 3 max-pools chunks into blocks (window
[r*b - 1, r*b + r)), marking forced blocks +inf and absent ones -inf. K~ is never read twice. The two top-k steps live in `topk.py`, incremental compression in
`compress.py`; both are re-exported here so callers import selection from one place.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels import pdl
from nosa_sglang.kernels._checks import KernelArgumentError, check_tensor
from nosa_sglang.kernels._dispatch import (
    check_devices, check_float, check_gqa, check_head_dim, check_index, check_shape, fp32_dot, interpret_mode,
    next_pow2, num_sms, resolve_impl,
)
from nosa_sglang.kernels.compress import NewChunk, append_new_chunks, chunk_completes, compress_new_chunks
from nosa_sglang.kernels.topk import forced_and_existing, select_topk

__all__ = [
    "NewChunk", "append_new_chunks", "chunk_completes", "compress_new_chunks", "decode_block_scores",
    "eviction_block_scores", "max_blocks_for_chunks", "pool_chunks_torch", "select_topk",
]

LOG2E = 1.4426950408889634
CHUNK_TILE = 64  # compressed keys per dot in kernel 1
BLOCK_TILE = 32  # blocks per program in kernel 3
PROB_TILE = 256  # chunks per program in kernel 2
#: kernel 1's product for fp32 K~ on a GPU: "tf32x3" (three tf32 tensor-core products) or "ieee" (an exact
#: fp32 dot, on FMAs: 3.5x slower; `scripts/sweep_chunk_logits.py --fp32`)
FP32_SCORES_DOT = "tf32x3"


def max_blocks_for_chunks(cmax: int, config: NosaConfig) -> int:
    """Blocks of the longest sequence whose chunks fit a Cmax-chunk buffer (the default NB)."""
    longest = config.kernel_stride * cmax + config.kernel_size - 1
    return config.num_blocks(longest)


def pool_chunks_torch(x: torch.Tensor, n_blocks: int, config: NosaConfig) -> torch.Tensor:
    """[..., C] chunk scores (-inf = absent) -> [..., n_blocks] max over chunks [r*b - 1, r*b + r)."""
    r = config.chunks_per_block
    need = r * n_blocks
    if x.shape[-1] >= need:
        x = x[..., :need]
    else:
        x = torch.cat([x, x.new_full((*x.shape[:-1], need - x.shape[-1]), float("-inf"))], dim=-1)
    main = x.reshape(*x.shape[:-1], n_blocks, r).amax(dim=-1)
    left = torch.cat([x.new_full((*x.shape[:-1], 1), float("-inf")), x[..., r - 1 :: r][..., : n_blocks - 1]], -1)
    return torch.maximum(main, left)


def _check_chunks(n_chunks: torch.Tensor, seq_lens: torch.Tensor, B: int) -> None:
    check_index("n_chunks", n_chunks, 1)
    check_shape("n_chunks", n_chunks, (B,), "[batch]")
    check_index("seq_lens", seq_lens, 1)
    check_shape("seq_lens", seq_lens, (B,), "[batch]")


def _num_blocks(num_blocks: int | None, cmax: int, config: NosaConfig) -> int:
    if num_blocks is None:
        return max_blocks_for_chunks(cmax, config)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise KernelArgumentError(f"num_blocks: must be None or a positive int, got {num_blocks!r}")
    return num_blocks


def decode_block_scores(
    q: torch.Tensor,
    ck: torch.Tensor,
    n_chunks: torch.Tensor,
    seq_lens: torch.Tensor,
    config: NosaConfig,
    impl: str = "auto",
    num_blocks: int | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Query-aware block scores S of each request's decode token.

    Args:
        q: [B, Hq, d] fp16/bf16/fp32. ck: [B, Cmax, Hkv, d] compressed keys (any float dtype; padded).
        n_chunks: [B] int, valid chunks of each request (the rest of ck is ignored).
        seq_lens: [B] int, tokens of each request including the decode token (sets qb and forced blocks).
        num_blocks: NB of the output; default max_blocks_for_chunks(Cmax) (enough for any consistent row).
        rows: [B] int: request b's keys are ck[rows[b]] of a larger ck [R, Cmax, Hkv, d] (a runtime's
            state, read in place: no gathered copy of the batch's K~).
    Returns:
        S [B, Hkv, NB] float32: pooled stage-1 probabilities, +inf on forced blocks, -inf on absent ones.
    """
    check_float("q", q, 3)
    check_float("ck", ck, 4)
    B, Hq, d = q.shape
    _, cmax, hkv, _ = ck.shape
    _check_rows(rows, B, "ck")
    if (rows is None and ck.shape[0] != B) or ck.shape[3] != d:
        raise KernelArgumentError(f"ck: expected [{B}, Cmax, Hkv, {d}] (batch and head_dim of q), got {list(ck.shape)}")
    G = check_gqa(Hq, hkv)
    _check_chunks(n_chunks, seq_lens, B)
    device = check_devices(q=q, ck=ck, n_chunks=n_chunks, seq_lens=seq_lens, **({} if rows is None else {"rows": rows}))
    nb = _num_blocks(num_blocks, cmax, config)
    use = resolve_impl(impl, device)
    check_head_dim("q", d, use == "triton")
    if use == "torch" or B == 0:
        return decode_block_scores_torch(q, ck if rows is None else ck[rows.long()], n_chunks, seq_lens, config, nb)
    return _decode_block_scores_triton(q, ck, n_chunks, seq_lens, config, nb, G, rows)


def decode_block_scores_torch(q, ck, n_chunks, seq_lens, config: NosaConfig, nb: int) -> torch.Tensor:
    B, Hq, d = q.shape
    _, cmax, hkv, _ = ck.shape
    logits = torch.einsum("bhgd,bchd->bhgc", q.float().view(B, hkv, Hq // hkv, d), ck.float()) / math.sqrt(d)
    visible = (torch.arange(cmax, device=q.device) < n_chunks.long()[:, None])[:, None, None, :]
    p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    s = p.sum(dim=2).masked_fill(~visible[:, :, 0], float("-inf"))
    exists, forced = forced_and_existing(seq_lens, nb, config)
    return torch.where(forced, float("inf"), pool_chunks_torch(s, nb, config)).masked_fill(~exists, float("-inf"))


def eviction_block_scores(
    ce: torch.Tensor,
    n_chunks: torch.Tensor,
    seq_lens: torch.Tensor,
    config: NosaConfig,
    impl: str = "auto",
    num_blocks: int | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eviction block scores E: chunk means ce [B, Cmax, Hkv] float32 max-pooled like S (with `rows` [B]:
    request b's are ce[rows[b]] of a larger ce [R, Cmax, Hkv], as in decode_block_scores).

    Returns [B, Hkv, NB] float32, -inf on absent blocks and on blocks without a valid chunk.
    """
    check_tensor("ce", ce, 3, (torch.float32,))
    _, cmax, hkv = ce.shape
    B = n_chunks.shape[0] if rows is not None else ce.shape[0]
    _check_rows(rows, B, "ce")
    _check_chunks(n_chunks, seq_lens, B)
    device = check_devices(ce=ce, n_chunks=n_chunks, seq_lens=seq_lens, **({} if rows is None else {"rows": rows}))
    nb = _num_blocks(num_blocks, cmax, config)
    if resolve_impl(impl, device) == "torch" or B == 0:
        ce = ce if rows is None else ce[rows.long()]
        visible = (torch.arange(cmax, device=ce.device) < n_chunks.long()[:, None])[:, None, :]
        e = ce.transpose(1, 2).masked_fill(~visible, float("-inf"))
        exists, _ = forced_and_existing(seq_lens, nb, config)
        return pool_chunks_torch(e, nb, config).masked_fill(~exists, float("-inf"))
    return _pool_chunks(ce, (ce.stride(0), ce.stride(1), ce.stride(2)), hkv, n_chunks, seq_lens, config, nb,
                        forced=False, rows=rows)


def _check_rows(rows: torch.Tensor | None, B: int, of: str) -> None:
    if rows is not None:
        check_index("rows", rows, 1)
        check_shape("rows", rows, (B,), f"[batch]: the row of {of} of each request")


def _pool_chunks(x: torch.Tensor, strides: tuple[int, int, int], hkv: int, n_chunks, seq_lens, config: NosaConfig,
                 nb: int, forced: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Hkv, NB] block max-pool of chunk scores x (strides: request, chunk, KV head; request b at x's
    rows[b] if given) by `_pool_kernel`; `forced`: the sink and local blocks +inf (S, not E)."""
    B = n_chunks.shape[0]
    out = torch.empty((B, hkv, nb), dtype=torch.float32, device=x.device)
    r = config.chunks_per_block
    _pool_kernel[(B * hkv, triton.cdiv(nb, BLOCK_TILE))](
        x, n_chunks, seq_lens, rows if rows is not None else n_chunks, out, hkv, nb, *strides,
        R=r, R_PAD=next_pow2(r), BLOCK_NB=BLOCK_TILE, FORCED=forced, HAS_ROWS=rows is not None,
        BLOCK_SIZE=config.block_size, INIT=config.init_blocks, LOCAL=config.local_blocks, **pdl.options(x),
    )
    return out


def chunk_splits(cmax: int, programs: int, device: torch.device, block_c: int = CHUNK_TILE,
                 waves: int = 2) -> tuple[int, int]:
    """(splits, chunks per split) of kernel 1 for `programs` = B x Hkv: chunk ranges of whole tiles, so
    that about `waves` x SMs programs run (batch 1 still fills the GPU)."""
    tiles = max(1, triton.cdiv(cmax, block_c))
    splits = max(1, min(tiles, triton.cdiv(waves * num_sms(device), programs)))
    per_split = triton.cdiv(tiles, splits) * block_c
    return max(1, triton.cdiv(cmax, per_split)), per_split


def scores_dot(q_dtype: torch.dtype, ck_dtype: torch.dtype) -> str:
    """How kernel 1 multiplies q by K~: "native" (a tensor-core dot in the keys' dtype), or for fp32 K~
    (the reference's scores) FP32_SCORES_DOT; "ieee" under the interpreter (its bf16 dot is garbage)."""
    if interpret_mode():
        return "ieee"
    return FP32_SCORES_DOT if fp32_dot(q_dtype) or ck_dtype == torch.float32 else "native"


def _decode_block_scores_triton(q, ck, n_chunks, seq_lens, config: NosaConfig, nb: int, G: int,
                                rows: torch.Tensor | None = None) -> torch.Tensor:
    B, Hq, d = q.shape
    _, cmax, hkv, _ = ck.shape
    splits, per_split = chunk_splits(cmax, B * hkv, q.device)
    logits = torch.empty((B, hkv, G, max(cmax, 1)), dtype=torch.float32, device=q.device)
    run_max = torch.empty((B, hkv, G, splits), dtype=torch.float32, device=q.device)
    run_sum = torch.empty_like(run_max)
    dot = scores_dot(q.dtype, ck.dtype)
    _chunk_logits_kernel[(B * hkv, splits)](
        q, ck, n_chunks, rows if rows is not None else n_chunks, logits, run_max, run_sum, LOG2E / math.sqrt(d),
        hkv, max(cmax, 1), per_split, q.stride(0), q.stride(1), ck.stride(0), ck.stride(1), ck.stride(2),
        G=G, BLOCK_G=max(16, next_pow2(G)), HEAD_DIM=d, BLOCK_C=CHUNK_TILE, DOT=dot, HAS_ROWS=rows is not None,
        num_warps=4, **pdl.options(q),
    )
    probs = torch.empty((B, hkv, max(cmax, 1)), dtype=torch.float32, device=q.device)
    _group_probs_kernel[(B * hkv, triton.cdiv(max(cmax, 1), PROB_TILE))](
        logits, run_max, run_sum, n_chunks, probs, hkv, max(cmax, 1), splits,
        BLOCK_C=PROB_TILE, BLOCK_G=next_pow2(G), G=G, BLOCK_SPLITS=next_pow2(splits), **pdl.options(q),
    )
    return _pool_chunks(probs, (probs.stride(0), probs.stride(2), probs.stride(1)), hkv, n_chunks, seq_lens, config,
                        nb, forced=True)


@triton.jit
def _chunk_logits_kernel(
    Q, CK, NCH, ROWS, W, M, L, scale_log2, n_kv_heads, cmax, per_split,
    s_qb, s_qh, s_cb, s_cc, s_ch,
    G: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, DOT: tl.constexpr,
    HAS_ROWS: tl.constexpr, WAIT: tl.constexpr,
):
    pdl.prologue(WAIT)
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid // n_kv_heads
    h = pid % n_kv_heads
    row = b  # where request b's K~ sits in CK
    if HAS_ROWS:
        row = tl.load(ROWS + b).to(tl.int64)
    n = tl.load(NCH + b)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_c = tl.arange(0, BLOCK_C)
    row_ok = offs_g < G
    q = tl.load(Q + b * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if DOT != "native":
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    c_lo = split * per_split
    c_hi = tl.minimum(c_lo + per_split, n)
    w_row = W + (pid * G + offs_g)[:, None] * cmax
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cc = c0 + offs_c
        ok = cc < c_hi
        k = tl.load(CK + row * s_cb + cc[:, None] * s_cc + h * s_ch + offs_d[None, :], mask=ok[:, None], other=0.0)
        if DOT == "native":
            x = tl.dot(q, tl.trans(k.to(q.dtype)))
        else:
            x = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=DOT)
        x = tl.where(ok[None, :], x * scale_log2, float("-inf"))
        tl.store(w_row + cc[None, :], x, mask=row_ok[:, None] & ok[None, :])
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(x - m_use[:, None]), 1)
        m_i = m_new
    part = (pid * G + offs_g) * n_splits + split
    tl.store(M + part, m_i, mask=row_ok)
    tl.store(L + part, l_i, mask=row_ok)


@triton.jit
def _group_probs_kernel(
    W, M, L, NCH, P, n_kv_heads, cmax, n_splits,
    BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, G: tl.constexpr, BLOCK_SPLITS: tl.constexpr, WAIT: tl.constexpr,
):
    """P[b, h, c] = sum over the group's heads of softmax_c(logits): each chunk's score computed once,
    so that two blocks whose windows share the chunk pool the very same fp32 value (a tie in the
    reference stays a tie; computing it in both blocks' lanes rounded differently on an H200)."""
    pdl.prologue(WAIT)
    pid = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_C
    b = pid // n_kv_heads
    n = tl.load(NCH + b)
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    g_ok = offs_g < G
    part = (pid * G + offs_g)[:, None] * n_splits + offs_s[None, :]
    part_ok = g_ok[:, None] & (offs_s[None, :] < n_splits)
    ms = tl.load(M + part, mask=part_ok, other=float("-inf"))
    ls = tl.load(L + part, mask=part_ok, other=0.0)
    m = tl.max(ms, 1)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(ls * tl.exp2(ms - m_use[:, None]), 1)
    lse = m_use + tl.log2(tl.where(total > 0.0, total, 1.0))
    cc = c0 + tl.arange(0, BLOCK_C)
    ok = cc < n
    x = tl.load(W + (pid * G + offs_g)[:, None] * cmax + cc[None, :], mask=g_ok[:, None] & ok[None, :],
                other=float("-inf"))
    p = tl.sum(tl.exp2(x - lse[:, None]), 0)
    tl.store(P + pid * cmax + cc, p, mask=cc < cmax)


@triton.jit
def _pool_kernel(
    X, NCH, SEQ, ROWS, OUT, n_kv_heads, nb, s_xb, s_xc, s_xh,
    R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_NB: tl.constexpr, FORCED: tl.constexpr, HAS_ROWS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr, WAIT: tl.constexpr,
):
    """Blocks [b0, b0 + BLOCK_NB) of one (request, KV head): max of the chunk scores X over chunks
    [R*b - 1, R*b + R); FORCED marks the sink and local blocks +inf (S, not E)."""
    pdl.prologue(WAIT)
    pid = tl.program_id(0).to(tl.int64)
    b0 = tl.program_id(1) * BLOCK_NB
    b = pid // n_kv_heads
    h = pid % n_kv_heads
    n = tl.load(NCH + b)
    qb = (tl.load(SEQ + b) - 1) // BLOCK_SIZE
    offs_j = tl.arange(0, BLOCK_NB * R_PAD)
    blk_main = b0 + offs_j // R_PAD
    ch_main = blk_main * R + offs_j % R_PAD
    ok_main = (offs_j % R_PAD < R) & (ch_main < n)
    blk = b0 + tl.arange(0, BLOCK_NB)
    ch_left = blk * R - 1
    ok_left = (ch_left >= 0) & (ch_left < n)
    row = b  # where request b's chunk scores sit in X
    if HAS_ROWS:
        row = tl.load(ROWS + b).to(tl.int64)
    x_row = X + row * s_xb + h * s_xh
    s_main = tl.load(x_row + ch_main * s_xc, mask=ok_main, other=float("-inf"))
    s_left = tl.load(x_row + ch_left * s_xc, mask=ok_left, other=float("-inf"))
    pooled = tl.max(tl.reshape(s_main, [BLOCK_NB, R_PAD]), 1)
    pooled = tl.maximum(pooled, s_left)
    exists = blk <= qb
    if FORCED:
        forced = exists & ((blk < INIT) | (blk >= qb - LOCAL))
        pooled = tl.where(forced, float("inf"), pooled)
    pooled = tl.where(exists, pooled, float("-inf"))
    tl.store(OUT + pid * nb + blk, pooled, mask=blk < nb)
