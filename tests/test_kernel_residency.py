"""kernels.residency (the fused residency diff) equals GpuSlotCache's torch path, bit for bit.

States come from driving the torch path with random selections (so maps are consistent: some slots
empty, some inactive, LRU keys with ties), then one more step runs through both paths on clones.
"""

from __future__ import annotations

import pytest
import torch

from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.runtime.slot_cache import GpuSlotCache
from nosa_sglang.runtime.victim import make_victim_policy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
L, R, H, S, MB = 1, 3, 2, 12, 40
K = 8


def fresh_cache(active: int) -> GpuSlotCache:
    cache = GpuSlotCache(L, R, H, S, 4, 8, torch.float32, MB, torch.device(DEVICE))
    cache.set_active(active)
    cache.fused_diff = False
    return cache


def random_sel(gen, B: int, n_blocks: int) -> torch.Tensor:
    """[B, H, K] distinct blocks per (row, head), ascending, a few -1 paddings at the end."""
    sel = torch.stack([torch.stack([torch.randperm(n_blocks, generator=gen)[:K].sort().values for _ in range(H)])
                       for _ in range(B)])
    pad = torch.rand(B, H, 1, generator=gen) < 0.3
    sel[..., -2:] = torch.where(pad, -1, sel[..., -2:])
    return sel.to(DEVICE)


def run(cache: GpuSlotCache, sel, E, policy, step: int, rows, c, host_table, tally=None):
    """One diff; with `tally` ([R, 2] row counts, [3] layer counts) the counts are added there."""
    view = cache.rows_view(0, rows, (0, R) if rows is None else None)
    all_rows = torch.arange(R, device=DEVICE) if rows is None else rows
    base = cache.slot_base(all_rows)
    d = cache.resolve(0, view, sel, E, policy, torch.tensor(step, dtype=torch.int32, device=DEVICE), base,
                      bias=(c, all_rows), host=(host_table, all_rows),
                      tally=None if tally is None else (*tally, all_rows))
    cache.commit(0, view)
    return d


def want_tally_misses(tally) -> torch.Tensor:
    """Misses the tally gained over its starting value (layer counts start at 7)."""
    return tally[1][1] - 7


def state(cache: GpuSlotCache):
    """Everything the diff maintains, minus the spill columns (scratch that nothing reads) and the
    trash slot (the torch path aims the biases of hits there)."""
    return (cache.block_slot[..., :MB].clone(), cache.slot_block[..., : S + 1].clone(),
            cache.last_step[..., : S + 1].clone(), cache.stored_e[..., : S + 1].clone(),
            cache.c[0, : cache.trash_slot].clone())


@pytest.mark.parametrize("victim", ["lru", "eviction_score"])
@pytest.mark.parametrize("active", [S, 9])
@pytest.mark.parametrize("gathered_rows", [False, True])
def test_fused_diff_equals_torch_path(gen, victim, active, gathered_rows):
    policy = make_victim_policy(victim)
    cache = fresh_cache(active)
    n_blocks = 30  # more than the slots: evictions every step
    rows = torch.tensor([2, 0, 1], device=DEVICE) if gathered_rows else None
    checked_misses = all_hit_rows_checked = 0
    host_table = torch.randperm(R * MB, generator=gen).view(R, MB).int().to(DEVICE)  # host block of (row, block)
    for step in range(12):
        c = torch.rand(R, H, MB * 4, generator=gen).to(DEVICE)  # per-token biases (block size 4), fresh each step
        sel = random_sel(gen, R, n_blocks if step > 2 else 10)  # first steps fill slots, then churn
        E = torch.rand(R, H, MB, generator=gen).to(DEVICE)
        E[..., :4] = 0.5  # ties in the eviction key
        if step in (8, 10):  # one row whose selection all hits: the kernel skips the victim order there
            r = 0 if rows is None else int(rows[0])
            for h in range(H):
                res = cache.slot_block[0, r, h, :S]
                res = res[res >= 0].sort().values[:K].long()
                sel[0, h] = -1
                sel[0, h, : len(res)] = res
        if step >= 6:  # compare one step on clones, then keep driving the torch path
            twin = fresh_cache(active)
            for t, u in ((twin.block_slot, cache.block_slot), (twin.slot_block, cache.slot_block),
                         (twin.last_step, cache.last_step), (twin.stored_e, cache.stored_e), (twin.c, cache.c)):
                t.copy_(u)
            twin.fused_diff = True
            tallies = [(torch.full((R, 2), 5, device=DEVICE), torch.full((3,), 7, device=DEVICE)) for _ in range(2)]
            use = step % 2 == 1  # counts tallied into counters on odd steps, returned on even ones (all-hit rows)
            # the kernel takes the top-k's int32 as it is (odd steps) or int64; the torch path int64
            got = run(twin, sel.int() if step % 2 else sel, E, policy, step, rows, c, host_table,
                      tallies[0] if use else None)
            want = run(cache, sel, E, policy, step, rows, c, host_table, tallies[1] if use else None)
            for name, g, w in zip(("slot_ids", "miss", "dst_slots", "counts", "fetch"), got, want, strict=True):
                if name == "counts" and use:
                    assert g is None and w is None  # added to the tallies instead
                else:
                    assert torch.equal(g, w), f"{name} differs at step {step}"
            if use:
                for g, w in zip(*tallies, strict=True):
                    assert torch.equal(g, w), f"tally differs at step {step}"
                assert int(want_tally_misses(tallies[1])) == int(want.miss.sum())
            for name, g, w in zip(("block_slot", "slot_block", "last_step", "stored_e", "c_slots"), state(twin),
                                  state(cache)):
                assert torch.equal(g, w), f"{name} differs at step {step}"
            checked_misses += int(want.miss.sum())
            if step in (8, 10):
                assert int(want.counts[0, 1]) == 0 and int(want.counts[0, 0]) > 0  # the all-hit row
                all_hit_rows_checked += 1
        else:
            run(cache, sel, E, policy, step, rows, c, host_table)
    assert checked_misses > 10 and all_hit_rows_checked == 2  # evictions and all-hit rows were compared


def test_eviction_score_victims_need_scores():
    cache = fresh_cache(S)
    view = cache.rows_view(0, None, (0, R))
    sel = torch.zeros(R, H, K, dtype=torch.long, device=DEVICE)
    step = torch.tensor(0, dtype=torch.int32, device=DEVICE)
    base = cache.slot_base(torch.arange(R, device=DEVICE))
    from nosa_sglang.kernels.residency import resolve_slots

    with pytest.raises(KernelArgumentError, match="E:"):
        resolve_slots(sel, view.block_slot, view.slot_block, view.last_step, view.stored_e, None, cache._inactive,
                      step, base, S, cache.trash_slot, lru=False, store_e=False)
    with pytest.raises(KernelArgumentError, match="block_slot"):
        resolve_slots(sel, view.block_slot.long(), view.slot_block, view.last_step, view.stored_e, None,
                      cache._inactive, step, base, S, cache.trash_slot, lru=True, store_e=False)
