"""The two top-k steps of the NOSA rule on block scores (NOSA_SPEC.md, selection steps 4-6).

Ties go to the lower block id, exactly as in the reference (a stable descending sort): max-pooling
makes ties common (two neighbouring blocks share their boundary chunk), so a tie-agnostic top-k would
change the selected *set*. The torch path is that stable sort; the Triton path finds each cut over the
order-preserving integer image of the fp32 scores (a row per program, i.e. decode: radix select,
`RADIX_SELECT`; packed rows: a binary search), takes the lowest-id blocks among those tied at the cut,
and writes the ids already ascending — one launch for the whole rule.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels import pdl
from nosa_sglang.kernels._checks import KernelArgumentError, check_tensor
from nosa_sglang.kernels._dispatch import check_devices, check_index, check_shape, next_pow2, num_sms, resolve_impl

POLICIES = ("nosa", "infllmv2")
NEG_INF = float("-inf")
POS_INF = float("inf")
ROW_ELEMS = 2048  # scores per Triton program when rows are packed (prefill: many short rows)
MAX_ROWS = 16  # beyond this the per-row vectors of the search spill registers (sm_90 report)
#: rows are packed only beyond this many programs' worth per SM: a decode batch (<= 512 rows measured)
#: ran faster with one row per program (16K B 16: 9.7 us with radix select, against 23.5 with 8 rows
#: packed under the same binary search as now; the sweep that set this, scripts/sweep_topk_rows.py, had
#: the slower k-way search: 16-20 against 61 us)
PACK_ROWS_PER_SM = 4
#: one row per program (decode): find the k-th value by four 8-bit radix passes, each a histogram of
#: the remaining candidates' next byte, instead of 32 dependent reductions. Equal results either way.
#: H200, one row per program at 128K: 18-19 us against 21.5-22 for this binary search (evening run) and
#: 28-30 for the slower k-way form it was first timed against (benchmarks/results/kernels.md, session 7)
RADIX_SELECT = True
#: radix select only while the grid has at most this many programs per SM: it wins where a row's chain of
#: dependent passes sets the time (B x Hkv <= 128 at 128K: 18-19 against 21.5-22 us), and lost where
#: several programs share an SM (256-1024 rows: 29-100 against 27.5-89 us), its histograms being more
#: work than the binary search's compares (that loss from two runs, evening and session 7; the gain up to
#: 128 rows confirmed in one run, session 8: 18.4-19.8 against 21.3-22.4 us at 128K)
RADIX_ROWS_PER_SM = 1


def select_topk(
    S: torch.Tensor,
    E: torch.Tensor | None,
    seq_lens: torch.Tensor,
    config: NosaConfig,
    policy: str = "nosa",
    impl: str = "auto",
) -> torch.Tensor:
    """Selected blocks of each row from its block scores.

    Args:
        S: [B, Hkv, NB] float32 query-aware block scores (forced/absent blocks are re-marked here).
        E: [B, Hkv, NB] float32 eviction block scores (unused, may be None, for policy "infllmv2").
        seq_lens: [B] int, tokens visible to each row's query (its position + 1).
        policy: "nosa" (top query_blocks by S, filled to topk_blocks by E) or "infllmv2" (top
            topk_blocks by S alone: the InfLLM-V2 baseline with the same budget).
    Returns:
        [B, Hkv, topk_blocks] int32 block ids, ascending, -1 padded.
    """
    if policy not in POLICIES:
        raise KernelArgumentError(f"policy: must be one of {POLICIES}, got {policy!r}")
    check_tensor("S", S, 3, (torch.float32,))
    B, hkv, nb = S.shape
    if policy == "nosa":
        check_tensor("E", E, 3, (torch.float32,))
        check_shape("E", E, (B, hkv, nb), "S's shape")
    else:
        E = S
    check_index("seq_lens", seq_lens, 1)
    check_shape("seq_lens", seq_lens, (B,), "[rows of S]")
    device = check_devices(S=S, E=E, seq_lens=seq_lens)
    if resolve_impl(impl, device) == "torch" or nb == 0:
        return select_topk_torch(S, E, seq_lens, config, policy)
    return _select_topk_triton(S, E, seq_lens, config, policy)


def forced_and_existing(seq_lens: torch.Tensor, nb: int, config: NosaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 1, NB] masks: block exists (b <= qb) and block is forced (sink, current, local)."""
    qb = torch.div(seq_lens.long() - 1, config.block_size, rounding_mode="floor").view(-1, 1, 1)
    b = torch.arange(nb, device=seq_lens.device)
    exists = b <= qb
    forced = exists & ((b < config.init_blocks) | (b >= qb - config.local_blocks))
    return exists, forced


def _stable_top(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def select_topk_torch(
    S: torch.Tensor, E: torch.Tensor, seq_lens: torch.Tensor, config: NosaConfig, policy: str
) -> torch.Tensor:
    B, hkv, nb = S.shape
    exists, forced = forced_and_existing(seq_lens, nb, config)
    S = torch.where(forced, POS_INF, S).masked_fill(~exists, NEG_INF)
    if policy == "infllmv2":
        sel = _stable_top(S, min(config.topk_blocks, nb))
    else:
        q_idx = _stable_top(S, min(config.query_blocks, nb))
        in_q = torch.zeros(S.shape, dtype=torch.bool, device=S.device).scatter_(-1, q_idx, True) & exists
        E = torch.where(in_q, POS_INF, E).masked_fill(~exists, NEG_INF)
        sel = _stable_top(E, min(config.topk_blocks, nb))
    qb = torch.div(seq_lens.long() - 1, config.block_size, rounding_mode="floor").view(-1, 1, 1)
    sel = torch.where(sel <= qb, sel, nb).sort(dim=-1).values
    sel = torch.where(sel < nb, sel, -1).to(torch.int32)
    if sel.shape[-1] < config.topk_blocks:
        sel = torch.cat([sel, sel.new_full((B, hkv, config.topk_blocks - sel.shape[-1]), -1)], dim=-1)
    return sel


def _select_topk_triton(S, E, seq_lens, config, policy):
    B, hkv, nb = S.shape
    out = torch.empty((B, hkv, config.topk_blocks), dtype=torch.int32, device=S.device)
    if B * hkv == 0:
        return out
    S = S.contiguous()
    E = E.contiguous()
    block_nb = max(16, next_pow2(nb))
    rows, sms = 1, num_sms(S.device)
    if B * hkv > PACK_ROWS_PER_SM * sms:
        rows = max(1, min(ROW_ELEMS // block_nb, MAX_ROWS, next_pow2(B * hkv)))
    radix = RADIX_SELECT and rows == 1 and B * hkv <= RADIX_ROWS_PER_SM * sms
    _topk_kernel[(triton.cdiv(B * hkv, rows),)](
        S, E, seq_lens, out, B * hkv, hkv, nb,
        ROWS=rows, RADIX=radix, BLOCK_NB=block_nb, BLOCK_SIZE=config.block_size,
        INIT=config.init_blocks, LOCAL=config.local_blocks,
        QUERY_K=config.query_blocks, TOP_K=config.topk_blocks,
        PAD_K=next_pow2(config.topk_blocks), NOSA=policy == "nosa",
        num_warps=max(4, min(16, rows * block_nb // 256)), **pdl.options(S),
    )
    return out


@triton.jit
def _sortable(x):
    """fp32 -> int32 with the same order (flip the magnitude bits of negatives)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _top_mask(key, ok, k, RADIX: tl.constexpr, N: tl.constexpr):
    """Per row of key [ROWS, N] (int32 sortable): mask of its k largest `ok` entries, ties to the lowest
    column: the k-th largest value (a binary search, or with RADIX, one row per program, a radix select),
    then a prefix count among the ties."""
    key = key.to(tl.int64)  # int64 so that hi - lo cannot overflow
    if RADIX:
        lo = _kth_radix(key, ok, k, N)
    else:
        lo = _kth_search(key, ok, k)
    n_ok = tl.sum(ok.to(tl.int32), 1)
    above = ok & (key > lo[:, None])
    need = k - tl.sum(above.to(tl.int32), 1)
    tie = ok & (key == lo[:, None])
    tie_rank = tl.cumsum(tie.to(tl.int32), 1)  # 1-based among ties, lowest columns first
    sel = above | (tie & (tie_rank <= need[:, None]))
    return tl.where((n_ok <= k)[:, None], ok, sel)


@triton.jit
def _kth_search(key, ok, k):
    """[ROWS] the k-th largest `ok` entry of each row of key [ROWS, N] (int64 of int32 sortable): a
    binary search over the values, 32 dependent reductions of [ROWS, N]. (A 16-way search, 8 passes
    over [ROWS, 16, N], measured 1.2-1.8x slower; its 2-way form, counting [ROWS, 2, N] a pass, made
    packed rows 2-2.5x slower than this one: benchmarks/results/kernels.md, session 7.)"""
    lo = tl.min(tl.where(ok, key, 2147483647), 1)  # invariant: count(key >= lo) >= k (or all of ok)
    hi = tl.max(tl.where(ok, key, -2147483648), 1)
    for _ in range(32):
        mid = lo + ((hi - lo + 1) >> 1)
        cnt = tl.sum((ok & (key >= mid[:, None])).to(tl.int32), 1)
        take = cnt >= k
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    return lo


@triton.jit
def _kth_radix(key, ok, k, N: tl.constexpr):
    """[1] the k-th largest `ok` entry of one row of key [1, N] (int64 of int32 sortable), by four passes over
    its bytes, most significant first: a histogram of the next byte of the entries that still match the
    bytes found so far, and the byte where the count from the top reaches k. (Fewer than k entries:
    any value; the caller keeps every `ok` entry then.)"""
    u = tl.reshape(key + 2147483648, [N])  # unsigned order in [0, 2**32)
    live = tl.reshape(ok, [N])
    byte = tl.arange(0, 256)
    prefix = tl.zeros([1], tl.int64)
    need = tl.zeros([1], tl.int32) + k
    for p in tl.static_range(4):
        digit = ((u >> (24 - 8 * p)) & 255).to(tl.int32)
        h = tl.histogram(digit, 256, mask=live)
        at_or_above = tl.sum(h) - tl.cumsum(h, 0) + h  # entries whose byte is >= each byte value
        d = tl.max(tl.where(at_or_above >= need, byte, 0), 0)
        need -= tl.sum(tl.where(byte > d, h, 0))
        prefix += d.to(tl.int64) << (24 - 8 * p)
        live = live & (digit == d)
    return prefix - 2147483648


@triton.jit
def _topk_kernel(
    S, E, SEQ, OUT, n_rows, n_kv_heads, nb,
    ROWS: tl.constexpr, RADIX: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_SIZE: tl.constexpr, INIT: tl.constexpr,
    LOCAL: tl.constexpr, QUERY_K: tl.constexpr, TOP_K: tl.constexpr, PAD_K: tl.constexpr, NOSA: tl.constexpr,
    WAIT: tl.constexpr,
):
    pdl.prologue(WAIT)
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = row < n_rows
    qb = (tl.load(SEQ + row // n_kv_heads, mask=row_ok, other=1) - 1) // BLOCK_SIZE
    offs = tl.arange(0, BLOCK_NB)
    inb = row_ok[:, None] & (offs[None, :] < nb)
    exists = inb & (offs[None, :] <= qb[:, None])
    forced = exists & ((offs[None, :] < INIT) | (offs[None, :] >= qb[:, None] - LOCAL))
    ptr = row[:, None] * nb + offs[None, :]
    s = tl.load(S + ptr, mask=inb, other=float("-inf"))
    s = tl.where(forced, float("inf"), tl.where(exists, s, float("-inf")))
    # absent blocks (id > qb) never win: only existing blocks are candidates
    if NOSA:
        in_q = _top_mask(_sortable(s), exists, QUERY_K, RADIX, BLOCK_NB)
        e = tl.load(E + ptr, mask=inb, other=float("-inf"))
        sel = _top_mask(_sortable(tl.where(in_q, float("inf"), e)), exists, TOP_K, RADIX, BLOCK_NB)
    else:
        sel = _top_mask(_sortable(s), exists, TOP_K, RADIX, BLOCK_NB)
    # ascending compaction: each selected block's rank among the selected
    rank = tl.cumsum(sel.to(tl.int32), 1) - 1
    tl.store(OUT + row[:, None] * TOP_K + rank, tl.broadcast_to(offs[None, :], [ROWS, BLOCK_NB]), mask=sel)
    n_sel = tl.sum(sel.to(tl.int32), 1)
    pad = tl.arange(0, PAD_K)
    tl.store(OUT + row[:, None] * TOP_K + pad[None, :], tl.full([ROWS, PAD_K], -1, tl.int32),
             mask=row_ok[:, None] & (pad[None, :] >= n_sel[:, None]) & (pad[None, :] < TOP_K))
