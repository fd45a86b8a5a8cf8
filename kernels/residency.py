"""The slot cache's residency diff in one launch (runtime.slot_cache.GpuSlotCache.resolve, torch path).

Per (request row, KV head) of a decode step: which selected blocks are resident (hits), which miss,
which slot each miss takes, and the map updates as if the misses landed. The torch statement of it is
~25 small ops (gathers, a sort of every slot's victim key, scatters); on an H200 at batch 64 they cost
~200 us per layer of GPU time and most of a CUDA graph's launch cost, more than the sparse attention
they feed. Here one program per (row, head) does all of it with the same result, bit for bit:

1. hits/misses: gather block_slot at the selected blocks;
2. victim order: every regular slot gets (tier, key, slot) — tier 0 empty, 1 occupied, 3 selected or
   inactive — and one sort of that packed int64 ranks them, exactly as the torch path's stable sort;
3. the r-th miss (in selection order) takes the r-th slot of that order; evicted blocks are unmapped,
   misses mapped, and every selected block's slot stamped with the step (and its E for score victims);
   a row whose selection all hits skips 2-3 (no victim to rank) and only stamps;
4. (optional) each miss's block of per-token biases copied into its victim slot — the torch path's
   bias gather, which read and wrote the biases of every selected block (hits into a trash slot);
5. (optional) the fetch list the transfer engine takes: each miss's host run (its row's host block
   times Hkv plus the head) and victim slot, -1 / trash elsewhere — five torch ops a layer otherwise;
6. (optional) the counts (selected, misses) added atomically to the runtime's row and layer counters
   instead of returned — four more ops a layer (two reductions, two index adds).

Scratch memory (one row of S_PAD int64 per program) turns the two register-to-register gathers (hit
slots -> slot mask, rank -> victim) into a store, a barrier and a load.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nosa_sglang.kernels import pdl
from nosa_sglang.kernels._checks import KernelArgumentError, check_tensor
from nosa_sglang.kernels._dispatch import next_pow2

NEVER = tl.constexpr(3)  # tier of slots that are never victims (as runtime.slot_cache.NEVER)
_PAST_END = tl.constexpr(4)  # tier of the padding lanes past the regular slots: sorted last, never taken


class Diff(NamedTuple):
    slot_ids: torch.Tensor  #: [B, Hkv, K] long global slot of each selected block, -1 on padding
    miss: torch.Tensor  #: [B, Hkv, K] bool
    dst_slots: torch.Tensor  #: [B, Hkv, K] long global victim slot of each miss, `trash` elsewhere
    counts: torch.Tensor | None  #: [B, 2] long selected and missed blocks of each row (None: tallied)
    fetch: torch.Tensor | None = None  #: [2, B*Hkv*K] long host run of each miss (-1 elsewhere), dst_slots


def resolve_slots(
    sel: torch.Tensor, block_slot: torch.Tensor, slot_block: torch.Tensor, last_step: torch.Tensor,
    stored_e: torch.Tensor, E: torch.Tensor | None, inactive: torch.Tensor, step: torch.Tensor,
    base: torch.Tensor, capacity: int, trash: int, lru: bool, store_e: bool,
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    host: tuple[torch.Tensor, torch.Tensor] | None = None,
    tally: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Diff:
    """The residency diff; updates block_slot / slot_block / last_step / stored_e in place.

    Args:
        sel: [B, Hkv, K] int32 / int64 selected blocks (-1 padding): the top-k's output as it is.
        block_slot: [B, Hkv, MB + 1] int32 (last column: spill); slot_block, last_step: [B, Hkv, S + 2]
            int32; stored_e: [B, Hkv, S + 2] float32 (S = capacity; column S is the tail slot).
        E: [B, Hkv, NB] float32 eviction block scores (score victims key on E of each slot's block), or None.
        inactive: [S] bool, slots beyond the gpu_slots knob. step: 0-dim int32 tensor.
        base: [B, Hkv, 1] long global slot of local slot 0. lru: key on last_step, else on E.
        store_e: stamp stored_e of the selected slots with their E (needs E).
        bias: (c [R, Hkv, max_tokens] float32 per-token biases of every request row, rows [B] long the
            batch's rows, c_slots [num_slots + 1, block_size] float32): also copy each miss's block of
            biases into its victim slot (hits have theirs already), as `SlotBuffers.copy_block_biases`.
        host: (table [R, MB] int32 host block of each (request row, block), rows [B] long the batch's
            rows): also return the fetch list (Diff.fetch), as `slot_cache.fetch_list`.
        tally: (row_counts [R, 2] int64, layer_counts [>= 2] int64, rows [B] long): add each row's
            (selected, misses) to row_counts[rows] and their sums to layer_counts[:2], atomically (two
            micro-batches on two streams may tally one layer at once), as `counters.tally_diff`;
            Diff.counts is then None.
    """
    check_tensor("sel", sel, 3, (torch.int32, torch.int64))
    B, H, K = sel.shape
    S = capacity
    tables = (("block_slot", block_slot, torch.int32, None), ("slot_block", slot_block, torch.int32, S + 2),
              ("last_step", last_step, torch.int32, S + 2), ("stored_e", stored_e, torch.float32, S + 2))
    for name, t, dt, last in tables:
        check_tensor(name, t, 3, (dt,))
        if t.shape[:2] != (B, H) or (last is not None and t.shape[2] != last) or t.stride(2) != 1:
            raise KernelArgumentError(f"{name}: expected [{B}, {H}, {last or 'MB + 1'}] with a contiguous last "
                                      f"dim, got {list(t.shape)} strides {t.stride()}")
    if not lru and E is None:
        raise KernelArgumentError("E: eviction-score victims need the eviction block scores, got None")
    if store_e and E is None:
        raise KernelArgumentError("E: store_e needs the eviction block scores, got None")
    if E is not None:
        check_tensor("E", E, 3, (torch.float32,))
        if E.shape[:2] != (B, H) or E.stride(2) != 1:
            raise KernelArgumentError(f"E: expected [{B}, {H}, NB] with a contiguous last dim, got {list(E.shape)}")
    dev = sel.device
    slot_ids = torch.empty((B, H, K), dtype=torch.long, device=dev)
    miss = torch.empty((B, H, K), dtype=torch.bool, device=dev)
    dst = torch.empty((B, H, K), dtype=torch.long, device=dev)
    counts = torch.empty((B, H, 2), dtype=torch.long, device=dev)
    fetch = torch.empty((2, B * H * K), dtype=torch.long, device=dev) if host is not None else None
    if B * H == 0:
        return Diff(slot_ids, miss, dst, None if tally is not None else counts.sum(1), fetch)
    s_pad = max(16, next_pow2(S))
    scratch = torch.empty((B * H, s_pad), dtype=torch.int64, device=dev)
    Et = E if E is not None else stored_e  # a valid pointer that the kernel never reads
    base = base.expand(B, H, 1).contiguous()
    if bias is not None:
        c_src, c_rows, c_slots = bias
        c_rows = c_rows.contiguous()  # NOTE: the kernel reads rows[b] with unit stride (as h_rows, t_rows)
        check_tensor("c", c_src, 3, (torch.float32,))
        check_tensor("c_slots", c_slots, 2, (torch.float32,))
        if c_src.stride(2) != 1 or not c_slots.is_contiguous() or c_rows.shape != (B,):
            raise KernelArgumentError("bias: c needs a contiguous last dim, c_slots to be contiguous and rows [B]")
        block_size = c_slots.shape[1]
    else:
        c_src, c_rows, c_slots, block_size = stored_e, base, stored_e, 1  # valid pointers, never read
    if host is not None:
        h_table, h_rows = host
        h_rows = h_rows.contiguous()
        check_tensor("host table", h_table, 2, (torch.int32,))
        if h_table.stride(1) != 1 or h_rows.shape != (B,):
            raise KernelArgumentError("host: the table needs a contiguous last dim and rows [B]")
    else:
        h_table, h_rows = block_slot[0], base  # valid pointers, never read
    if tally is not None:
        row_counts, layer_counts, t_rows = tally
        t_rows = t_rows.contiguous()
        check_tensor("row_counts", row_counts, 2, (torch.int64,))
        check_tensor("layer_counts", layer_counts, 1, (torch.int64,))
        if not row_counts.is_contiguous() or row_counts.shape[1] != 2 or layer_counts.stride(0) != 1 \
                or t_rows.shape != (B,):
            raise KernelArgumentError("tally: row_counts must be contiguous [R, 2], layer_counts contiguous, rows [B]")
    else:
        row_counts, layer_counts, t_rows = counts, counts, base  # valid pointers, never written
    _resolve_kernel[(B * H,)](
        sel, block_slot, slot_block, last_step, stored_e, Et, inactive, step, base,
        slot_ids, miss, dst, counts, scratch,
        H, K, S, block_slot.shape[2] - 1, Et.shape[2], trash,
        sel.stride(0), sel.stride(1), block_slot.stride(0), block_slot.stride(1), slot_block.stride(0),
        slot_block.stride(1), last_step.stride(0), last_step.stride(1), stored_e.stride(0), stored_e.stride(1),
        Et.stride(0), Et.stride(1), c_src, c_rows, c_slots, c_src.stride(0), c_src.stride(1),
        h_table, h_rows, h_table.stride(0), fetch if fetch is not None else counts, B * H * K,
        row_counts, layer_counts, t_rows,
        K_PAD=max(16, next_pow2(K)), S_PAD=s_pad, LRU=lru, STORE_E=store_e, COPY_C=bias is not None,
        HOST_RUNS=host is not None, TALLY=tally is not None,
        BLOCK=block_size, BLOCK_PAD=max(16, next_pow2(block_size)), num_warps=4 if s_pad <= 512 else 8,
        **pdl.options(sel),
    )
    return Diff(slot_ids, miss, dst, None if tally is not None else counts.sum(1), fetch)


@triton.jit
def _resolve_kernel(
    SEL, BS, SB, LS, SE, E, INACT, STEP, BASE, SLOT_IDS, MISS, DST, COUNTS, SCR,
    n_heads, K, S, MB, NB, trash,
    s_sel_b, s_sel_h, s_bs_b, s_bs_h, s_sb_b, s_sb_h, s_ls_b, s_ls_h, s_se_b, s_se_h, s_e_b, s_e_h,
    C, C_ROWS, C_SLOTS, s_c_r, s_c_h, H_TABLE, H_ROWS, s_ht, FETCH, n_out, ROW_COUNTS, LAYER_COUNTS, T_ROWS,
    K_PAD: tl.constexpr, S_PAD: tl.constexpr, LRU: tl.constexpr, STORE_E: tl.constexpr, COPY_C: tl.constexpr,
    HOST_RUNS: tl.constexpr, TALLY: tl.constexpr, BLOCK: tl.constexpr, BLOCK_PAD: tl.constexpr,
    WAIT: tl.constexpr,
):
    pdl.prologue(WAIT)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_heads
    h = pid % n_heads
    step = tl.load(STEP)
    base = tl.load(BASE + pid)
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < K
    sel = tl.load(SEL + b * s_sel_b + h * s_sel_h + offs_k, mask=k_ok, other=-1).to(tl.int64)
    valid = sel >= 0
    bs_row = BS + b * s_bs_b + h * s_bs_h
    sb_row = SB + b * s_sb_b + h * s_sb_h
    ls_row = LS + b * s_ls_b + h * s_ls_h
    se_row = SE + b * s_se_b + h * s_se_h
    e_row = E + b * s_e_b + h * s_e_h
    local = tl.load(bs_row + tl.where(valid, sel, MB), mask=k_ok, other=-1).to(tl.int64)
    miss = valid & (local < 0)
    hit = valid & (local >= 0)

    n_miss = tl.sum(miss.to(tl.int64), 0)
    victim = tl.zeros([K_PAD], tl.int64)
    if n_miss > 0:  # NOTE: a row whose selection all hits takes no victim: no slot order, no map change
        # 1. which regular slots the step selected (a hit in the tail slot S is not a regular slot)
        scr = SCR + pid * S_PAD
        offs_s = tl.arange(0, S_PAD)
        tl.store(scr + offs_s, tl.zeros([S_PAD], tl.int64))
        tl.debug_barrier()
        tl.store(scr + local, tl.full([K_PAD], 1, tl.int64), mask=hit & (local < S))
        tl.debug_barrier()
        selected = tl.load(scr + offs_s) != 0

        # 2. victim order: (tier, key, slot) ascending, packed into one int64
        s_ok = offs_s < S
        sb = tl.load(sb_row + offs_s, mask=s_ok, other=-1)
        inactive = tl.load(INACT + offs_s, mask=s_ok, other=0) != 0
        tier = (sb >= 0).to(tl.int64)
        tier = tl.where(inactive | selected, NEVER, tier)
        tier = tl.where(s_ok, tier, _PAST_END)
        if LRU:
            key = tl.load(ls_row + offs_s, mask=s_ok, other=0)
        else:
            ev = tl.load(e_row + tl.minimum(tl.maximum(sb, 0), NB - 1), mask=s_ok, other=0.0)
            bits = ev.to(tl.int32, bitcast=True)
            key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        packed = ((tier * 4294967296 + (key.to(tl.int64) + 2147483648)) * S_PAD) + offs_s
        order = tl.sort(packed) % S_PAD
        tl.debug_barrier()
        tl.store(scr + offs_s, order)
        tl.debug_barrier()

        # 3. the r-th miss takes the r-th slot of the order
        rank = tl.cumsum(miss.to(tl.int32), 0) - 1
        rank = tl.minimum(tl.maximum(rank, 0), S - 1)
        victim = tl.load(scr + rank, mask=miss, other=0)
        evicted = tl.load(sb_row + victim, mask=miss, other=-1)
        tl.debug_barrier()
        tl.store(bs_row + evicted, tl.full([K_PAD], -1, tl.int32), mask=miss & (evicted >= 0))
        tl.debug_barrier()
        tl.store(bs_row + sel, victim.to(tl.int32), mask=miss)
        tl.store(sb_row + victim, sel.to(tl.int32), mask=miss)
    final = tl.where(miss, victim, local)
    tl.store(ls_row + final, tl.full([K_PAD], 0, tl.int32) + step, mask=valid)
    if STORE_E:
        ev_sel = tl.load(e_row + tl.minimum(tl.maximum(sel, 0), NB - 1), mask=valid, other=0.0)
        tl.store(se_row + final, ev_sel, mask=valid)
    if COPY_C:  # the biases of each missed block into its victim slot
        if n_miss > 0:
            row = tl.load(C_ROWS + b)
            offs_t = tl.arange(0, BLOCK_PAD)
            t_ok = miss[:, None] & (offs_t[None, :] < BLOCK)
            src = C + row * s_c_r + h * s_c_h + tl.maximum(sel, 0)[:, None] * BLOCK + offs_t[None, :]
            dst = C_SLOTS + (base + victim)[:, None] * BLOCK + offs_t[None, :]
            tl.store(dst, tl.load(src, mask=t_ok, other=0.0), mask=t_ok)
    out = pid * K + offs_k
    tl.store(SLOT_IDS + out, tl.where(valid, base + final, -1), mask=k_ok)
    tl.store(MISS + out, miss, mask=k_ok)
    tl.store(DST + out, tl.where(miss, base + victim, trash), mask=k_ok)
    if HOST_RUNS:  # the fetch list: host run and victim slot of each miss
        h_row = tl.load(H_ROWS + b)
        hb = tl.load(H_TABLE + h_row * s_ht + tl.maximum(sel, 0), mask=miss, other=0).to(tl.int64)
        tl.store(FETCH + out, tl.where(miss, hb * n_heads + h, -1), mask=k_ok)
        tl.store(FETCH + n_out + out, tl.where(miss, base + victim, trash), mask=k_ok)
    n_valid = tl.sum(valid.to(tl.int64), 0)
    if TALLY:
        t_row = tl.load(T_ROWS + b)
        tl.atomic_add(ROW_COUNTS + t_row * 2, n_valid)
        tl.atomic_add(ROW_COUNTS + t_row * 2 + 1, n_miss)
        tl.atomic_add(LAYER_COUNTS, n_valid)
        tl.atomic_add(LAYER_COUNTS + 1, n_miss)
    else:
        tl.store(COUNTS + pid * 2, n_valid)
        tl.store(COUNTS + pid * 2 + 1, n_miss)
