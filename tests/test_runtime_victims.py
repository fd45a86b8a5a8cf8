"""Victim policies and the residency diff on a hand-built slot cache: who gives up a slot, and the maps."""

from __future__ import annotations

import pytest
import torch

from nosa_sglang.runtime import EvictionScoreVictims, GpuSlotCache, LruVictims, make_victim_policy
from nosa_sglang.runtime.slot_cache import NEVER, victim_order
from nosa_sglang.runtime.victim import sortable

DEV = torch.device("cpu")


def cache_with(blocks: list[int], steps: list[int], capacity: int = 4) -> GpuSlotCache:
    """One layer, one row, one KV head; regular slot j holds blocks[j] (last selected at steps[j])."""
    c = GpuSlotCache(1, 1, 1, capacity, 4, 4, torch.float32, max_blocks=32, device=DEV)
    for j, (b, s) in enumerate(zip(blocks, steps)):
        c.slot_block[0, 0, 0, j] = b
        c.block_slot[0, 0, 0, b] = j
        c.last_step[0, 0, 0, j] = s
    return c


def resolve(c: GpuSlotCache, sel: list[int], E: list[float], policy, step: int = 10):
    sel_t = torch.tensor([[sel + [-1] * (4 - len(sel))]])
    E_t = torch.tensor([[E]], dtype=torch.float32)
    rows = torch.tensor([0])
    view = c.rows_view(0, rows, (0, 1))
    diff = c.resolve(0, view, sel_t, E_t, policy, torch.tensor(step, dtype=torch.int32), c.slot_base(rows))
    c.commit(0, view)
    return diff


def test_victim_order_puts_empty_first_then_lowest_key_and_never_last():
    tier = torch.tensor([1, NEVER, 0, 1, 1])
    key = torch.tensor([5, -9, 7, 2, 5], dtype=torch.int32)
    assert victim_order(tier, key).tolist() == [2, 3, 0, 4, 1]


def test_eviction_score_policy_evicts_the_lowest_scored_unselected_block():
    c = cache_with([1, 2, 3, 4], [9, 9, 9, 9])
    E = [0.0, 0.5, 0.1, 0.9, 0.3, 0.7] + [0.0] * 2
    diff = resolve(c, [2, 5], E, EvictionScoreVictims())
    assert diff.miss[0, 0].tolist() == [False, True, False, False]
    # unselected residents: 1 (E .5), 3 (E .9), 4 (E .3) -> block 4 in slot 3 goes
    assert int(diff.dst_slots[0, 0, 1]) == c.slot_id(0, 0, 3)
    assert c.block_slot[0, 0, 0, 5] == 3 and c.block_slot[0, 0, 0, 4] == -1 and c.slot_block[0, 0, 0, 3] == 5
    assert diff.counts[0].tolist() == [2, 1]  # selected, missed


def test_lru_policy_evicts_the_least_recently_selected_block():
    c = cache_with([1, 2, 3, 4], [7, 3, 9, 5])
    diff = resolve(c, [3, 6], [0.0] * 8, LruVictims())
    assert int(diff.dst_slots[0, 0, 1]) == c.slot_id(0, 0, 1)  # block 2, selected at step 3
    assert c.slot_block[0, 0, 0, 1] == 6 and c.last_step[0, 0, 0, 1] == 10


def test_empty_slots_are_used_before_any_eviction():
    c = cache_with([1, 2], [9, 9])
    diff = resolve(c, [5, 6], [0.0] * 8, EvictionScoreVictims())
    assert sorted(int(x) for x in diff.dst_slots[0, 0, :2]) == [c.slot_id(0, 0, 2), c.slot_id(0, 0, 3)]
    assert c.block_slot[0, 0, 0, 1] == 0 and c.block_slot[0, 0, 0, 2] == 1


def test_inactive_slots_are_never_used():
    c = cache_with([1, 2], [9, 9])
    c.set_active(3)
    diff = resolve(c, [5, 6], [0.0, 0.2, 0.1] + [0.0] * 5, EvictionScoreVictims())
    used = {int(x) for x in diff.dst_slots[0, 0, :2]}
    assert used == {c.slot_id(0, 0, 2), c.slot_id(0, 0, 1)}  # slot 3 inactive; block 2 (E .1) evicted


def test_the_tail_slot_is_never_a_victim():
    c = cache_with([1, 2, 3, 4], [9, 9, 9, 9])
    c.slot_block[0, 0, 0, c.tail] = 7
    c.block_slot[0, 0, 0, 7] = c.tail
    diff = resolve(c, [7, 8], [0.0] * 9, EvictionScoreVictims())
    assert int(diff.slot_ids[0, 0, 0]) == c.tail_slot_id(0, 0) and not bool(diff.miss[0, 0, 0])
    assert int(diff.dst_slots[0, 0, 1]) != c.tail_slot_id(0, 0)


def test_opening_a_block_moves_the_full_tail_into_a_regular_slot():
    c = cache_with([1, 2, 3, 4], [9, 8, 9, 9])
    c.slot_block[0, 0, 0, c.tail] = 5
    c.block_slot[0, 0, 0, 5] = c.tail
    c.k_runs(0)[c.tail_slot_id(0, 0)] = 42.0
    rows = torch.tensor([0])
    view = c.rows_view(0, rows, (0, 1))
    c.start_tail_block(0, view, torch.tensor([6]), torch.tensor([1]), LruVictims(), torch.tensor(10, dtype=torch.int32),
                       c.slot_base(rows))
    # step 9 selections are recent; block 2 (step 8) gives up slot 1 to the old tail (block 5)
    assert c.slot_block[0, 0, 0, 1] == 5 and c.block_slot[0, 0, 0, 5] == 1 and c.block_slot[0, 0, 0, 2] == -1
    assert c.slot_block[0, 0, 0, c.tail] == 6 and c.block_slot[0, 0, 0, 6] == c.tail
    assert c.k_runs(0)[c.slot_id(0, 0, 1)].eq(42.0).all()


def test_sortable_keeps_the_float_order():
    x = torch.tensor([float("-inf"), -3.5, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    assert sortable(x).tolist() == sorted(sortable(x).tolist())


def test_rows_that_do_not_open_a_block_keep_their_tail():
    c = cache_with([1, 2, 3, 4], [9, 8, 9, 9])
    c.slot_block[0, 0, 0, c.tail] = 5
    c.block_slot[0, 0, 0, 5] = c.tail
    rows = torch.tensor([0])
    before = (c.slot_block.clone(), c.block_slot.clone())
    view = c.rows_view(0, rows, (0, 1))
    c.start_tail_block(0, view, torch.tensor([5]), torch.tensor([0]), LruVictims(), torch.tensor(10, dtype=torch.int32),
                       c.slot_base(rows))
    assert torch.equal(c.slot_block, before[0]) and torch.equal(c.block_slot, before[1])


def test_unknown_policy_names_the_allowed_values():
    with pytest.raises(ValueError, match="eviction_score"):
        make_victim_policy("random")
