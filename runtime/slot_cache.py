"""GpuSlotCache: which blocks of each running request sit in GPU slots, and the residency diff.

Per (layer, request row, KV head) there are `capacity` regular slots, of which the first `active`
(the `gpu_slots` knob) are used, plus one *tail slot* (local index `capacity`) that always holds the
request's partial tail block: the new token is written there, the write-back reads it, and its slot id
is host arithmetic, so neither needs a device round trip. When the next token opens a new block, the
full tail is copied GPU-locally into a regular slot (`start_tail_block`) and stays resident.

Block maps, both directions, live on the device: `slot_block [L, R, Hkv, capacity + 2]` (block in
each local slot, -1 empty; the last column is a spill target for padding writes) and
`block_slot [L, R, Hkv, max_blocks + 1]` (local slot of each block, -1 not resident; last column spill).
The residency diff (`resolve`) is a fixed sequence of tensor ops: no host sync, no data-dependent
shapes. Victims are the non-selected slots ordered by tier (empty, then by the victim policy's key);
selected slots, the tail slot and inactive slots are never victims.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nosa_sglang.kernels.residency import resolve_slots
from nosa_sglang.kernels.table_runs import host_run_ids
from nosa_sglang.runtime.counters import tally_diff
from nosa_sglang.runtime.slot_buffers import SlotBuffers
from nosa_sglang.runtime.victim import VictimPolicy, sortable

NEVER = 3  # victim tier of slots that must not be evicted
RECENT = 2  # tier of slots selected by the previous step (used when E is unknown, at append)
_KEY_OFFSET = 1 << 31


class ResidencyDiff(NamedTuple):
    """Result of `resolve` for one layer and batch (all [B, Hkv, K] unless noted)."""

    slot_ids: torch.Tensor  #: global slot of each selected block, -1 on padding (attention input)
    miss: torch.Tensor  #: bool, the block must be fetched from the host store
    dst_slots: torch.Tensor  #: global victim slot of each miss, the trash slot elsewhere
    counts: torch.Tensor | None  #: [B, 2] long: selected and missed blocks of each request (None: tallied)
    fetch: torch.Tensor | None = None  #: [2, B*Hkv*K] long fetch_list of the misses (when asked for)


def fetch_list(runs: torch.Tensor, take: torch.Tensor, dst_slots: torch.Tensor) -> torch.Tensor:
    """The transfer engine's packed copy list [2, n]: host run where `take` (else -1, skipped), GPU slot."""
    return torch.stack((torch.where(take, runs, -1).flatten(), dst_slots.flatten()))


class PrefetchPlan(NamedTuple):
    """Blocks to fetch ahead of the step that is predicted to select them ([B, Hkv, P])."""

    blocks: torch.Tensor  #: long candidate block ids
    ok: torch.Tensor  #: bool, fetch this candidate
    dst_slots: torch.Tensor  #: global slot for each ok candidate, the trash slot elsewhere


class RowView(NamedTuple):
    """The per-row state of one layer for a batch: views when the rows are a contiguous range, else
    gathered copies that `commit` writes back (one index_copy_ each)."""

    block_slot: torch.Tensor  #: [B, Hkv, max_blocks + 1] int32
    slot_block: torch.Tensor  #: [B, Hkv, capacity + 2] int32
    last_step: torch.Tensor  #: [B, Hkv, capacity + 2] int32
    stored_e: torch.Tensor  #: [B, Hkv, capacity + 2] float32
    rows: torch.Tensor | None  #: the rows to write back to (None for views)


def victim_order(tier: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Slot order by (tier, key), ascending, ties to the lower slot: one stable sort of a packed key.

    tier: [..., S] small ints; key: [..., S] int32 (see victim.sortable)."""
    packed = tier.long() * (1 << 32) + (key.long() + _KEY_OFFSET)
    return torch.sort(packed, dim=-1, stable=True).indices


class GpuSlotCache(SlotBuffers):
    """Offload residency: `capacity` regular slots + 1 tail slot per (layer, row, KV head)."""

    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        num_kv_heads: int,
        capacity: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        max_blocks: int,
        device: torch.device,
    ) -> None:
        super().__init__(num_layers, max_rows, num_kv_heads, capacity + 1, block_size, head_dim, dtype, device)
        self.capacity = capacity
        self.tail = capacity  # local index of the tail slot
        self.spill = capacity + 1  # local spill column of slot_block / last_step / stored_e
        self.max_blocks = max_blocks  # block_slot's spill column
        shape = (num_layers, max_rows, num_kv_heads)
        self.slot_block = torch.full((*shape, capacity + 2), -1, dtype=torch.int32, device=device)
        self.block_slot = torch.full((*shape, max_blocks + 1), -1, dtype=torch.int32, device=device)
        self.last_step = torch.full((*shape, capacity + 2), -1, dtype=torch.int32, device=device)
        self.stored_e = torch.zeros((*shape, capacity + 2), dtype=torch.float32, device=device)
        self.active = capacity
        self._inactive = torch.zeros(capacity, dtype=torch.bool, device=device)
        #: resolve in one Triton launch (kernels.residency) instead of ~25 torch ops: on CUDA, and in tests
        #: under TRITON_INTERPRET=1; the torch path below is the statement both must equal
        self.fused_diff = device.type == "cuda"

    # -- rows --------------------------------------------------------------------------------------------
    def tail_slot_id(self, row: int, head: int) -> int:
        return self.slot_id(row, head, self.tail)

    def clear_row(self, row: int) -> None:
        self.slot_block[:, row] = -1
        self.block_slot[:, row] = -1
        self.last_step[:, row] = -1
        self.stored_e[:, row] = 0.0

    def move_row(self, src_row: int, dst_row: int) -> None:
        for t in (self.slot_block, self.block_slot, self.last_step, self.stored_e):
            t[:, dst_row] = t[:, src_row]
        self.move_row_data(src_row, dst_row)

    def resident_per_row(self) -> torch.Tensor:
        """[R] long: (layer, KV head, block) triples resident per row (device tensor, no sync)."""
        return (self.slot_block[..., : self.capacity + 1] >= 0).sum(dim=(0, 2, 3))

    def set_active(self, active: int) -> None:
        """Use the first `active` regular slots (the gpu_slots knob); shrinking evicts the rest."""
        assert 1 <= active <= self.capacity, f"active={active} outside [1, {self.capacity}]"
        if active < self.active:
            gone = self.slot_block[..., active : self.active].long()
            self.block_slot.scatter_(-1, torch.where(gone >= 0, gone, self.max_blocks), -1)
            self.block_slot[..., self.max_blocks] = -1
            self.slot_block[..., active : self.active] = -1
        self.active = active
        self._inactive.copy_(torch.arange(self.capacity, device=self.device) >= active)  # in place: graphs read it

    def install_prompt(
        self, layer: int, row: int, blocks: torch.Tensor, e_vals: torch.Tensor, tail_block: int | None,
        read_runs, step: int,
    ) -> None:
        """Warm start: blocks [Hkv, m] long go to regular slots 0..m-1 of each head, the partial tail
        block (if any) to the tail slot. read_runs(src) -> the (k, v, c) runs of the prompt's run ids src
        (run id = block * Hkv + head), or None to map the blocks without writing data (synthetic
        benchmark requests)."""
        H = self.num_kv_heads
        base = self.slot_base(torch.tensor([row], device=self.device))[0]  # [Hkv, 1]
        m = blocks.shape[1]
        if m:
            local = torch.arange(m, device=self.device).expand(H, m)
            if read_runs is not None:
                self.write_runs(layer, (base + local).flatten(), *read_runs((blocks * H + self.heads[:, None]).flatten()))
            self.slot_block[layer, row, :, :m] = blocks.int()
            self.block_slot[layer, row].scatter_(-1, blocks, local.int())
            self.last_step[layer, row, :, :m] = step - 1
            self.stored_e[layer, row, :, :m] = e_vals
        if tail_block is not None:
            if read_runs is not None:
                self.write_runs(layer, (base[:, 0] + self.tail), *read_runs(tail_block * H + self.heads))
            self.slot_block[layer, row, :, self.tail] = tail_block
            self.block_slot[layer, row, :, tail_block] = self.tail
            self.last_step[layer, row, :, self.tail] = step

    # -- row views ------------------------------------------------------------------------------------
    def rows_view(self, layer: int, rows: torch.Tensor, row_range: tuple[int, int] | None) -> RowView:
        ts = (self.block_slot[layer], self.slot_block[layer], self.last_step[layer], self.stored_e[layer])
        if row_range is not None:
            lo, hi = row_range
            return RowView(*(t[lo:hi] for t in ts), None)
        return RowView(*(t[rows] for t in ts), rows)

    def commit(self, layer: int, view: RowView) -> None:
        if view.rows is None:
            return
        for t, v in zip((self.block_slot, self.slot_block, self.last_step, self.stored_e), view[:4]):
            t[layer].index_copy_(0, view.rows, v)

    def _tiers(self, sb: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, S] int: 0 empty, 1 occupied, NEVER inactive (regular slots only)."""
        return (sb >= 0).to(torch.int8).masked_fill(self._inactive, NEVER)

    def _map_in(self, v: RowView, blocks: torch.Tensor, take: torch.Tensor, victim: torch.Tensor) -> None:
        """Map blocks[take] into local slots victim[take] (spill elsewhere), unmapping their old blocks."""
        evicted = v.slot_block.gather(-1, victim)  # spill column holds -1
        v.block_slot.scatter_(-1, torch.where(evicted >= 0, evicted, self.max_blocks).long(), -1)
        v.block_slot.scatter_(-1, torch.where(take, blocks, self.max_blocks), victim.int())
        v.block_slot[..., self.max_blocks] = -1
        v.slot_block.scatter_(-1, victim, torch.where(take, blocks, -1).int())

    # -- the tail ----------------------------------------------------------------------------------------
    def start_tail_block(
        self, layer: int, view: RowView, tail_blocks: torch.Tensor, opens: torch.Tensor, policy: VictimPolicy,
        step: torch.Tensor, base: torch.Tensor,
    ) -> None:
        """For the rows with opens[b] (their token opens block tail_blocks[b]): the full old tail moves
        into the regular slot the policy gives up (GPU-local copy), the tail slot maps the new block.
        Other rows are left as they are. view: rows_view of the batch; tail_blocks, opens: [B] long;
        step: 0-dim int32 device tensor; base: [B, Hkv, 1] global slot of local slot 0.

        NOTE: the caller makes the compute stream wait for pending H2D copies of this layer first (the
        victim slot may be the target of a prefetch in flight) and for its write-backs (the tail slot
        is about to be overwritten).
        """
        S = self.capacity
        old = view.slot_block[..., S : S + 1].long()  # [B, Hkv, 1]
        sb, ls = view.slot_block[..., :S], view.last_step[..., :S]
        tier = self._tiers(sb)
        tier = torch.where((tier == 1) & (ls == step - 1), RECENT, tier)
        victim = victim_order(tier, policy.keys(sb, None, view.stored_e[..., :S], ls))[..., :1]
        nb = tail_blocks.view(-1, 1, 1).expand(-1, self.num_kv_heads, 1)
        opening = opens.view(-1, 1, 1) != 0
        # a repeated (discarded) step finds the new block already in the tail slot: nothing to move
        has_old = opening & (old >= 0) & (old != nb)
        victim = torch.where(has_old, victim, self.spill)
        self.copy_slots(layer, (base + S).flatten(), torch.where(has_old, base + victim, self.trash_slot).flatten())
        self._map_in(view, old, has_old, victim)
        view.last_step.scatter_(-1, victim, view.last_step[..., S : S + 1].clone())
        view.stored_e.scatter_(-1, victim, view.stored_e[..., S : S + 1].clone())
        view.block_slot.scatter_(-1, torch.where(opening, nb, self.max_blocks), S)
        view.block_slot[..., self.max_blocks] = -1
        view.slot_block[..., S : S + 1] = torch.where(opening, nb, old).int()
        view.last_step[..., S : S + 1] = torch.where(opening, step, view.last_step[..., S : S + 1])

    # -- the residency diff --------------------------------------------------------------------------
    def resolve(
        self, layer: int, view: RowView, sel: torch.Tensor, E: torch.Tensor | None, policy: VictimPolicy,
        step: torch.Tensor, base: torch.Tensor, bias: tuple[torch.Tensor, torch.Tensor] | None = None,
        host: tuple[torch.Tensor, torch.Tensor] | None = None,
        tally: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> ResidencyDiff:
        """Hits, misses and a victim slot for every miss; updates the maps as if the misses landed.

        Args:
            view: rows_view of the batch (committed by the caller after the step's map updates).
            sel: [B, Hkv, K] int32 / int64 selected blocks (-1 padding); E: [B, Hkv, NB] eviction block scores.
            step: 0-dim int32 device tensor; base: [B, Hkv, 1] global slot of local slot 0 of each (row, head).
            bias: (c [R, Hkv, max_tokens] float32 per-token biases of every row, rows [B] long): also copy
                each miss's block of biases into its victim slot of c_slots (hits have theirs already).
            host: (the [R, max_blocks] int32 host table, rows [B] long): also return the misses' fetch_list.
            tally: Counters.diff_tally(layer, rows): add the counts there (counters.tally_diff) instead of
                returning them (counts is then None).
        """
        if self.fused_diff:
            d = resolve_slots(sel, view.block_slot, view.slot_block, view.last_step, view.stored_e,
                              E if policy.uses_scores else None, self._inactive, step, base, self.capacity,
                              self.trash_slot, lru=not policy.uses_scores, store_e=policy.uses_scores and E is not None,
                              bias=None if bias is None else (*bias, self.c[layer]), host=host, tally=tally)
            return ResidencyDiff(*d)
        S = self.capacity
        sel = sel.long()
        valid = sel >= 0
        local = view.block_slot.gather(-1, torch.where(valid, sel, self.max_blocks)).long()
        miss = valid & (local < 0)
        sb = view.slot_block[..., :S]
        selected = torch.zeros(sb.shape[:-1] + (S + 2,), dtype=torch.bool, device=self.device)
        selected.scatter_(-1, torch.where(valid & ~miss, local, self.spill), True)  # tail / spill ignored
        tier = self._tiers(sb).masked_fill(selected[..., :S], NEVER)
        order = victim_order(tier, policy.keys(sb, E, view.stored_e[..., :S], view.last_step[..., :S]))
        rank = miss.cumsum(-1) - 1
        victim = torch.where(miss, order.gather(-1, rank.clamp(0, S - 1)), self.spill)
        self._map_in(view, sel, miss, victim)
        final = torch.where(miss, victim, local)
        stamp = torch.where(valid, final, self.spill)
        view.last_step.scatter_(-1, stamp, step.expand(stamp.shape))
        if policy.uses_scores and E is not None:
            view.stored_e.scatter_(-1, stamp, E.gather(-1, sel.clamp(0, E.shape[-1] - 1)))
        slot_ids = torch.where(valid, base + final, -1)
        dst = torch.where(miss, base + victim, self.trash_slot)
        counts = torch.stack((valid.sum(dim=(1, 2)), miss.sum(dim=(1, 2))), dim=-1)
        if bias is not None:  # hits aim at the trash slot: harmless writes, no data-dependent shapes
            self.copy_block_biases(layer, *bias, sel, dst)
        fetch = None if host is None else fetch_list(host_run_ids(host[0][host[1]], sel), miss, dst)
        if tally is not None:
            tally_diff(*tally, counts)
        return ResidencyDiff(slot_ids, miss, dst, None if tally is not None else counts, fetch)

    def plan_prefetch(
        self, layer: int, view: RowView, cand_score: torch.Tensor, n_cand: int, E: torch.Tensor | None,
        policy: VictimPolicy, step: torch.Tensor, base: torch.Tensor,
    ) -> PrefetchPlan:
        """Fetch the best `n_cand` candidates by `cand_score` ([B, Hkv, NB], -inf = never) that are not
        resident, into slots not selected at `step`, when the policy ranks them above the victim."""
        S = self.capacity
        score, cand = cand_score.topk(min(n_cand, cand_score.shape[-1]), dim=-1)
        valid = score > float("-inf")
        local = view.block_slot.gather(-1, torch.where(valid, cand, self.max_blocks))
        miss = valid & (local < 0)
        sb, ls = view.slot_block[..., :S], view.last_step[..., :S]
        tier = torch.where(ls == step, NEVER, self._tiers(sb))  # selected by this step
        key = policy.keys(sb, E, view.stored_e[..., :S], ls)
        order = victim_order(tier, key)
        rank = miss.cumsum(-1) - 1
        victim = order.gather(-1, rank.clamp(0, S - 1))
        v_tier = tier.gather(-1, victim)
        ok = miss & (rank < S) & (v_tier < NEVER)
        # NOTE: only into empty slots, or over a block the eviction score ranks lower: under LRU a
        # prefetch would evict recently dropped query picks, which come back more often (measured)
        better = key.gather(-1, victim) < sortable(score) if policy.uses_scores else False
        ok &= (v_tier == 0) | better
        victim = torch.where(ok, victim, self.spill)
        self._map_in(view, cand, ok, victim)
        view.last_step.scatter_(-1, victim, step.expand(victim.shape))
        if policy.uses_scores:
            view.stored_e.scatter_(-1, victim, score)
        return PrefetchPlan(cand, ok, torch.where(ok, base + victim, self.trash_slot))
