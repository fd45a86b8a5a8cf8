"""Run ids of selected blocks through a block table: the slot list of a decode from a server's pages.

A pool-backed runtime attends straight from the KV pool: block b of (row, KV head h) is run
table[row, b] * Hkv + h of the pool's run layout. In torch that is a clamp, a gather, a cast, a
multiply and an add for every layer of every step (SGLang replays them inside its decode graph, one
small launch each); here one program per (request, KV head) reads its table row directly, and counts
the blocks it lists for the runtime's counters in the same launch (two more torch ops a layer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.kernels._dispatch import check_devices, check_index, next_pow2, resolve_impl


def table_run_ids(table: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor, impl: str = "auto",
                  counts: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Hkv, K] int64 run table[rows[b], blocks[b, h, k]] * Hkv + h, and -1 where blocks < 0.

    Args:
        table: [R, max_blocks] int32/int64 page of each (row, logical block).
        rows: [B] int the table row of each request; blocks: [B, Hkv, K] int block ids (-1 = none),
            each < max_blocks.
        counts: [R, Hkv] int64, optional: counts[rows[b], h] = the listed blocks of (b, h) (the runtime's
            selected-block count, in the same launch).
    """
    check_index("table", table, 2)
    check_index("rows", rows, 1)
    check_index("blocks", blocks, 3)
    B, H, K = blocks.shape
    if rows.shape[0] != B:
        raise KernelArgumentError(f"rows: expected [{B}] (one per request of blocks), got {list(rows.shape)}")
    device = check_devices(table=table, rows=rows, blocks=blocks)
    if counts is not None and (counts.dtype != torch.long or counts.dim() != 2 or counts.shape[1] != H
                               or counts.stride(1) != 1 or counts.device != device):
        raise KernelArgumentError(f"counts: expected an int64 [rows, {H}] tensor on {device} (last dim contiguous), "
                                  f"got {counts.dtype} {list(counts.shape)} on {counts.device}")
    if resolve_impl(impl, device) == "torch" or B * H * K == 0:
        if counts is not None:
            counts[rows.long()] = (blocks >= 0).sum(dim=2)
        return table_run_ids_torch(table, rows, blocks)
    out = torch.empty((B, H, K), dtype=torch.long, device=device)
    _table_runs_kernel[(B * H,)](table, rows, blocks, out, counts if counts is not None else out, H, K,
                                 table.stride(0), table.stride(1), blocks.stride(0), blocks.stride(1), blocks.stride(2),
                                 counts.stride(0) if counts is not None else 0, BLOCK_K=next_pow2(K),
                                 COUNT=counts is not None, num_warps=1)
    return out


def table_run_ids_torch(table: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The same as torch ops (the statement the kernel is tested against)."""
    return torch.where(blocks >= 0, host_run_ids(table[rows.long()], blocks), -1)


def host_run_ids(table: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, K] host run of each (row, head, block): the host block (`table`, the batch's rows of
    the runtime's [rows, max_blocks] int32 host table) times Hkv plus the head; garbage where block < 0."""
    B, H = blocks.shape[:2]
    hb = table.gather(1, blocks.long().clamp(min=0).reshape(B, -1)).view(blocks.shape).long()
    return hb * H + torch.arange(H, device=blocks.device).view(1, -1, 1)


@triton.jit
def _table_runs_kernel(TABLE, ROWS, BLK, OUT, COUNTS, n_kv_heads, n_entries, s_tr, s_tb, s_bb, s_bh, s_bk, s_nr,
                       BLOCK_K: tl.constexpr, COUNT: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_kv_heads
    h = pid % n_kv_heads
    row = tl.load(ROWS + b).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    listed = offs < n_entries
    blk = tl.load(BLK + b * s_bb + h * s_bh + offs * s_bk, mask=listed, other=-1).to(tl.int64)
    page = tl.load(TABLE + row * s_tr + blk * s_tb, mask=listed & (blk >= 0), other=0).to(tl.int64)
    tl.store(OUT + pid * n_entries + offs, tl.where(blk >= 0, page * n_kv_heads + h, -1), mask=listed)
    if COUNT:
        tl.store(COUNTS + row * s_nr + h, tl.sum((blk >= 0).to(tl.int64), axis=0))
