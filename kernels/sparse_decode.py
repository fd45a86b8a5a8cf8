"""Sparse decode attention over the GPU slot cache, with the ED-DMA bias (NOSA_SPEC.md, "Attention").

One decode token per request attends the blocks its KV head selected. The runtime keeps, per layer,
K/V slot buffers `[S, block_size, d]` and bias slots `[S, block_size]`; one slot holds one
(block, KV head) run, so a request's selection is a list of slot ids per KV head plus the logical block
id of each entry (its token positions, hence validity: the tail block is partial).

Kernel design (flash-decoding):
- one program = one (request, KV head) and one split of its slot list; all query heads of the GQA group
  are rows of one tile (padded to 16 for the tensor-core dot), so each K/V block is read once;
- split-K: when requests x KV heads cannot fill the GPU (batch 1), the slot list is cut into
  `num_splits` pieces whose normalised partial outputs and log-sum-exps a second, tiny kernel merges;
- each loop step reads ENTRIES_PER_STEP list entries as one tile (each row addresses its entry's slot),
  so more K/V bytes are in flight per program;
- fp32 accumulation and softmax in base 2; padding entries (slot -1) issue no loads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nosa_sglang.kernels import pdl
from nosa_sglang.kernels._dispatch import (
    check_block_size,
    check_devices,
    check_float,
    check_gqa,
    check_head_dim,
    check_index,
    check_shape,
    default_scale,
    fp32_dot,
    next_pow2,
    num_sms,
    resolve_impl,
)
from nosa_sglang.kernels._checks import KernelArgumentError

LOG2E = 1.4426950408889634
#: decode programs resident per multiprocessor (~150-180 registers x 128 threads, sm_90 report)
PROGRAMS_PER_SM = 2
#: fixed cost of one program (q load, output write) and of splitting at all (the merge launch and the
#: partial outputs), in units of one block read per program
PROGRAM_COST_BLOCKS = 1
MERGE_COST_BLOCKS = 1
MAX_SPLITS = 64
#: launch options of the decode kernel (sm_90, Triton 3.6/3.8 reports: 4 warps x 2 stages = ~150-180
#: registers, cp.async 16-byte K/V loads, no spills); benchmarks/kernels.py sweeps alternatives
DECODE_LAUNCH = {"num_warps": 4, "num_stages": 2}
#: slot-list entries one loop step reads: two (128 K/V rows a stage) moved B >= 64 from 75-94 % of the
#: byte roofline to 88-101 % (H200, scripts/sweep_decode_variants.py); four would double the tile again
ENTRIES_PER_STEP = 2


class DecodeAttention(NamedTuple):
    """Output of `sparse_decode_attention(..., return_lse=True)`."""

    o: torch.Tensor  #: [B, Hq, d] in q.dtype
    lse: torch.Tensor  #: [B, Hq] float32, natural log; -inf for a row with no valid token


def sparse_decode_attention(
    q: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    c_slots: torch.Tensor,
    slot_ids: torch.Tensor,
    block_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    impl: str = "auto",
) -> torch.Tensor | DecodeAttention:
    """o = softmax(q.k * sm_scale + c) v over the valid tokens of each request's listed slots.

    Args:
        q: [B, Hq, d] fp16/bf16/fp32, the query of the token at position seq_len - 1.
        k_slots, v_slots: [S, block_size, d], q's dtype, last dim contiguous.
        c_slots: [S, block_size] float32, the eviction bias of each slot token.
        slot_ids: [B, Hkv, N] int32/int64, slots to attend; -1 = padding (skipped).
        block_ids: [B, Hkv, N] int32/int64, logical block of each entry: its token i sits at position
            block_id * block_size + i and is attended iff that position < seq_len.
        seq_lens: [B] int32/int64, tokens of each request (the query included).
        sm_scale: logit scale, default 1/sqrt(d).
        num_splits: split-K factor (None = enough programs to fill the GPU).
        return_lse: also return the log-sum-exp of the biased logits.
        impl: "auto" | "triton" | "torch".
    Returns:
        o [B, Hq, d] in q.dtype (zeros for a row with no valid token), or DecodeAttention(o, lse).
    """
    check_float("q", q, 3)
    check_float("k_slots", k_slots, 3)
    check_float("v_slots", v_slots, 3)
    B, Hq, d = q.shape
    S, block_size, _ = k_slots.shape
    check_shape("k_slots", k_slots, (S, block_size, d), "[slots, block_size, head_dim of q]")
    check_shape("v_slots", v_slots, (S, block_size, d), "k_slots' shape")
    for name, t in (("k_slots", k_slots), ("v_slots", v_slots)):
        if t.dtype != q.dtype:
            raise KernelArgumentError(f"{name}: dtype must equal q's {q.dtype}, got {t.dtype}")
    if not isinstance(c_slots, torch.Tensor) or c_slots.dtype != torch.float32:
        got = f"{c_slots.dtype}" if isinstance(c_slots, torch.Tensor) else type(c_slots).__name__
        raise KernelArgumentError(f"c_slots: expected a float32 tensor [{S}, {block_size}], got {got}")
    check_shape("c_slots", c_slots, (S, block_size), "[slots, block_size]")
    check_index("slot_ids", slot_ids, 3)
    if slot_ids.shape[0] != B:
        raise KernelArgumentError(f"slot_ids: dim 0 must equal the batch of q ({B}), got {list(slot_ids.shape)}")
    Hkv = slot_ids.shape[1]
    check_gqa(Hq, Hkv)
    check_index("block_ids", block_ids, 3)
    check_shape("block_ids", block_ids, tuple(slot_ids.shape), "slot_ids' shape")
    check_index("seq_lens", seq_lens, 1)
    check_shape("seq_lens", seq_lens, (B,), "[batch]")
    device = check_devices(q=q, k_slots=k_slots, v_slots=v_slots, c_slots=c_slots, slot_ids=slot_ids,
                           block_ids=block_ids, seq_lens=seq_lens)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise KernelArgumentError(f"num_splits: must be None or an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    scale = default_scale(sm_scale, d)
    use = resolve_impl(impl, device)
    check_head_dim("q", d, use == "triton")
    check_block_size("k_slots", block_size, use == "triton")
    if use == "torch":
        o, lse = sparse_decode_torch(q, k_slots, v_slots, c_slots, slot_ids, block_ids, seq_lens, scale)
    else:
        o, lse = _sparse_decode_triton(q, k_slots, v_slots, c_slots, slot_ids, block_ids, seq_lens, scale,
                                       num_splits)
    return DecodeAttention(o, lse) if return_lse else o


def sparse_decode_torch(
    q: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    c_slots: torch.Tensor,
    slot_ids: torch.Tensor,
    block_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch statement of the kernel (gathers every listed block: memory O(B*Hkv*N*block*d))."""
    B, Hq, d = q.shape
    _, Hkv, N = slot_ids.shape
    bs = k_slots.shape[1]
    sid = slot_ids.long()
    safe = sid.clamp(min=0)
    k = k_slots[safe].float().flatten(2, 3)  # [B, Hkv, N*bs, d]
    v = v_slots[safe].float().flatten(2, 3)
    c = c_slots[safe].flatten(2, 3)  # [B, Hkv, N*bs]
    pos = block_ids.long()[..., None] * bs + torch.arange(bs, device=q.device)
    valid = (sid[..., None] >= 0) & (block_ids[..., None] >= 0) & (pos < seq_lens.long()[:, None, None, None])
    valid = valid.flatten(2, 3)
    qg = q.float().view(B, Hkv, Hq // Hkv, d)
    logits = torch.einsum("bhgd,bhmd->bhgm", qg, k) * sm_scale + c[:, :, None, :]
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf for an empty row
    p = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    o = torch.einsum("bhgm,bhmd->bhgd", p, v)
    return o.reshape(B, Hq, d).to(q.dtype), lse.reshape(B, Hq)


def auto_num_splits(batch: int, kv_heads: int, n_entries: int, device: torch.device) -> int:
    """Split-K factor minimising a wave model of the launch.

    With P = batch x KV heads programs per split and `cap` programs resident at once, s splits take
    ceil(P*s / cap) waves of ceil(N / s) block reads (plus a fixed cost) each: at batch 1 that asks for
    many splits (fill the GPU), at large batch for none, and in between it avoids a nearly empty last wave.
    """
    programs = max(1, batch * kv_heads)
    cap = PROGRAMS_PER_SM * num_sms(device)
    n = max(1, n_entries)

    def cost(s: int) -> tuple[int, int]:
        waves = -(-programs * s // cap)
        return waves * (-(-n // s) + PROGRAM_COST_BLOCKS) + (MERGE_COST_BLOCKS if s > 1 else 0), s

    return min(range(1, min(MAX_SPLITS, n) + 1), key=cost)


def _sparse_decode_triton(q, k_slots, v_slots, c_slots, slot_ids, block_ids, seq_lens, scale, num_splits):
    B, Hq, d = q.shape
    _, Hkv, N = slot_ids.shape
    bs = k_slots.shape[1]
    G = Hq // Hkv
    splits = num_splits if num_splits is not None else auto_num_splits(B, Hkv, N, q.device)
    splits = max(1, min(splits, max(N, 1)))
    per_split = -(-N // splits) if N else 0
    splits = -(-N // per_split) if N else 1  # no empty trailing splits
    o = torch.empty((B, Hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    if B == 0:
        return o, lse
    split_mode = splits > 1
    if split_mode:
        o_part = torch.empty((B, Hq, splits, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    else:
        o_part, lse_part = o, lse  # unused placeholders
    _decode_kernel[(B * Hkv, splits)](
        q, k_slots, v_slots, c_slots, slot_ids, block_ids, seq_lens,
        o, lse, o_part, lse_part,
        scale * LOG2E, Hkv, N, per_split,
        q.stride(0), q.stride(1),
        k_slots.stride(0), k_slots.stride(1), v_slots.stride(0), v_slots.stride(1),
        c_slots.stride(0), c_slots.stride(1),
        slot_ids.stride(0), slot_ids.stride(1), slot_ids.stride(2),
        block_ids.stride(0), block_ids.stride(1), block_ids.stride(2),
        o.stride(0), o.stride(1),
        G=G, BLOCK_G=max(16, next_pow2(G)), HEAD_DIM=d, BLOCK_SIZE=bs, SPLIT=split_mode,
        IEEE=fp32_dot(q.dtype), ENTRIES=ENTRIES_PER_STEP, **DECODE_LAUNCH, **pdl.options(q),
    )
    if split_mode:
        _merge_kernel[(B * Hq,)](
            o_part, lse_part, o, lse, Hq, splits, o.stride(0), o.stride(1),
            HEAD_DIM=d, BLOCK_SPLITS=max(2, next_pow2(splits)), num_warps=4, **pdl.options(q),
        )
    return o, lse


@triton.jit
def _decode_kernel(
    Q, K, V, C, SLOT, BLK, SEQ, O, LSE, O_PART, LSE_PART,
    scale_log2, n_kv_heads, n_entries, per_split,
    s_qb, s_qh, s_ks, s_kt, s_vs, s_vt, s_cs, s_ct,
    s_ib, s_ih, s_in, s_bb, s_bh, s_bn, s_ob, s_oh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, ENTRIES: tl.constexpr, WAIT: tl.constexpr,
):
    pdl.prologue(WAIT)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid // n_kv_heads
    h = pid % n_kv_heads
    seq_len = tl.load(SEQ + b).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_g < G
    heads = h * G + offs_g
    q = tl.load(Q + b.to(tl.int64) * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    slot_row = SLOT + b.to(tl.int64) * s_ib + h * s_ih
    blk_row = BLK + b.to(tl.int64) * s_bb + h * s_bh
    n_lo = split * per_split
    n_hi = tl.minimum(n_lo + per_split, n_entries)
    offs_r = tl.arange(0, ENTRIES * BLOCK_SIZE)  # ENTRIES slot-list entries per step, BLOCK_SIZE rows each
    offs_t = offs_r % BLOCK_SIZE
    for n in range(n_lo, n_hi, ENTRIES):
        entry = n + offs_r // BLOCK_SIZE
        listed = entry < n_hi
        slot = tl.load(slot_row + entry * s_in, mask=listed, other=-1).to(tl.int64)
        blk = tl.load(blk_row + entry * s_bn, mask=listed, other=-1).to(tl.int64)
        pos = blk * BLOCK_SIZE + offs_t
        valid = (pos < seq_len) & (slot >= 0) & (blk >= 0)
        k = tl.load(K + slot[:, None] * s_ks + offs_t[:, None] * s_kt + offs_d[None, :], mask=valid[:, None], other=0.0)
        c = tl.load(C + slot * s_cs + offs_t * s_ct, mask=valid, other=0.0)
        if IEEE:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        s = qk * scale_log2 + c[None, :] * 1.4426950408889634
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * s_vs + offs_t[:, None] * s_vt + offs_d[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    if SPLIT:
        rows = (b * (n_kv_heads * G) + heads).to(tl.int64)
        tl.store(O_PART + (rows * n_splits + split)[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(LSE_PART + rows * n_splits + split, lse2, mask=row_ok)
    else:
        tl.store(O + b.to(tl.int64) * s_ob + heads[:, None] * s_oh + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(LSE + b * (n_kv_heads * G) + heads, lse2 / 1.4426950408889634, mask=row_ok)


@triton.jit
def _merge_kernel(
    O_PART, LSE_PART, O, LSE, n_q_heads, n_splits, s_ob, s_oh,
    HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr, WAIT: tl.constexpr,
):
    """Merge the splits of one (request, query head): weights 2^(lse_s - max) over normalised partials."""
    pdl.prologue(WAIT)
    row = tl.program_id(0).to(tl.int64)
    b = row // n_q_heads
    hq = row % n_q_heads
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_s < n_splits
    lse = tl.load(LSE_PART + row * n_splits + offs_s, mask=ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_use)
    total = tl.sum(w, 0)
    part = tl.load(O_PART + (row * n_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + b * s_ob + hq * s_oh + offs_d, out.to(O.dtype.element_ty))
    lse_out = tl.where(total == 0.0, float("-inf"), m_use + tl.log2(tl.where(total == 0.0, 1.0, total)))
    tl.store(LSE + row, lse_out / 1.4426950408889634)
