"""Request lifecycle, back-pressure and knobs: nothing leaks, a refusal changes nothing, rows move safely."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from test_runtime_equivalence import ATOL, RTOL, ReferenceMirror, ReplayClosures, random_prompt, small_runtime

from nosa_sglang.runtime import GpuSlotsExhausted, HostMemoryExhausted, KnobError, RequestTooLarge, RuntimeUsageError


pytestmark = pytest.mark.usefixtures("one_thread")


class Session:
    """A runtime plus the reference mirror of up to `n` requests, stepped together."""

    def __init__(self, rt, n: int = 4, capacity: int = 1024) -> None:
        seed = int.from_bytes(os.urandom(4), "little")
        print(f"seed={seed}")
        self.rt, self.g = rt, torch.Generator().manual_seed(seed)
        self.mirror = ReferenceMirror(n, rt.shape, capacity, rt.device)
        self.prompts = {}

    def begin(self, i: int, T: int, shared=None):
        ks, vs, cs = random_prompt(self.rt.shape, T, self.g, self.rt.device)
        if shared is not None:  # the shared prefix must hold the same tokens
            src = self.prompts[shared[0]]
            n = shared[1] * self.rt.config.block_size
            for layer in range(len(ks)):
                ks[layer][:n], vs[layer][:n], cs[layer][:n] = src[0][layer][:n], src[1][layer][:n], src[2][layer][:n]
            shared = list(self.rt.host_blocks(f"r{shared[0]}")[: shared[1]])
        out = self.rt.begin_request(f"r{i}", ks, vs, cs, shared_prefix_blocks=shared)
        self.mirror.set_prompt(i, ks, vs, cs)
        self.prompts[i] = (ks, vs, cs)
        return out

    def step(self, idx: list[int], check: bool = True) -> None:
        s, rt = self.rt.shape, self.rt
        batch = [f"r{i}" for i in idx]
        for layer in range(s.num_layers):
            dev = rt.device
            k = torch.randn(len(idx), s.num_kv_heads, s.head_dim, generator=self.g).to(dev)
            v = torch.randn(len(idx), s.num_kv_heads, s.head_dim, generator=self.g).to(dev)
            c = (0.1 + 2 * torch.rand(len(idx), s.num_kv_heads, generator=self.g)).to(dev)
            q = torch.randn(len(idx), s.num_q_heads, s.head_dim, generator=self.g).to(dev)
            rt.append(layer, batch, k, v, c)
            o = rt.attend(layer, batch, q)
            self.mirror.append(layer, idx, k, v, c)
            if check:
                sel, ref = self.mirror.attend(layer, idx, q, rt.config)
                assert torch.equal(rt.last_selection(layer).long(), sel)
                torch.testing.assert_close(o.double(), ref, atol=ATOL, rtol=RTOL)
        rt.step_boundary()
        self.mirror.step(idx)


def pool_state(rt) -> tuple:
    h = rt.host
    return (h.free_blocks, h.used_blocks, tuple(h.refcount(b) for b in range(h.num_blocks)), rt.running_requests,
            int((rt.slots.slot_block >= 0).sum()), int((rt.slots.block_slot >= 0).sum()))


def test_host_store_too_small_raises_and_changes_nothing():
    rt = small_runtime(host_capacity_bytes=40 * 2 * 2 * 2 * 16 * 16 * 4)  # 40 blocks
    s = Session(rt)
    s.begin(0, 300)  # 19 blocks
    s.step([0])
    before, snap = pool_state(rt), rt.snapshot()
    with pytest.raises(HostMemoryExhausted):
        s.begin(1, 400)  # 25 blocks > 21 free
    rt.step_boundary()
    after = rt.snapshot()
    assert pool_state(rt) == before
    assert (after.host_blocks_used, after.running_requests, after.totals) == (snap.host_blocks_used, 1, snap.totals)
    assert not rt.can_admit(400).ok and rt.can_admit(300).ok
    assert not rt.can_admit(400).never  # it fits once r0 ends: back-pressure, not a rejection


def test_a_request_larger_than_the_whole_host_store_is_rejected_not_queued():
    rt = small_runtime(host_capacity_bytes=40 * 2 * 2 * 2 * 16 * 16 * 4)  # 40 blocks in all
    s = Session(rt)
    before, snap = pool_state(rt), rt.snapshot()
    with pytest.raises(RequestTooLarge, match="needs 41 host block.*holds 40 in all.*never be admitted") as err:
        s.begin(0, 41 * 16)
    assert not isinstance(err.value, HostMemoryExhausted)  # a scheduler must not wait for it
    with pytest.raises(RequestTooLarge):
        rt.begin_request_synthetic("big", 41 * 16)
    assert pool_state(rt) == before and rt.snapshot().totals == snap.totals
    verdict = rt.can_admit(41 * 16)
    assert not verdict.ok and verdict.never and "never be admitted" in verdict.reason
    assert rt.can_admit(40 * 16).ok and not rt.can_admit(40 * 16).never
    s.begin(0, 40 * 16 - 1)  # the largest that fits still does


@pytest.mark.parametrize("call", ["append", "decode"])
def test_decode_step_opening_a_block_backpressures_without_change(call):
    rt = small_runtime(host_capacity_bytes=21 * 2 * 2 * 2 * 16 * 16 * 4)
    s = Session(rt)
    s.begin(0, 16 * 20)  # 20 full blocks: the next token opens block 20
    s.begin(1, 10)  # takes the 21st block
    before = pool_state(rt)
    k = torch.zeros(1, 2, 16)
    with pytest.raises(HostMemoryExhausted):
        if call == "append":
            rt.append(0, ["r0"], k, k, torch.ones(1, 2))
        else:
            rt.decode(0, ["r0"], torch.zeros(1, 4, 16), k, k, torch.ones(1, 2))
    assert pool_state(rt) == before and rt.seq_len("r0") == 320
    rt.end_request("r1")
    s.step([0])  # now it fits, and the output still equals the reference


def test_no_free_gpu_row_raises_and_changes_nothing():
    rt = small_runtime()
    s = Session(rt, n=5)
    for i in range(4):
        s.begin(i, 20 + i)
    before = pool_state(rt)
    with pytest.raises(GpuSlotsExhausted):
        s.begin(4, 20)
    assert pool_state(rt) == before
    assert rt.can_admit(20).reason.startswith("no GPU slots")


def test_1000_begin_abort_cycles_restore_every_pool():
    rt = small_runtime(layers=1)
    initial = pool_state(rt)
    s = Session(rt, n=3)
    for cycle in range(1000):
        T = 1 + (cycle * 37) % 90
        s.begin(0, T)
        if cycle % 3 == 0:
            s.begin(1, T + 40, shared=(0, T // 16))
            if cycle % 9 == 0:
                s.step([1, 0], check=False)
            rt.abort_request("r1")
        rt.abort_request("r0")
    assert pool_state(rt) == initial


def test_ending_a_middle_request_moves_the_last_row_and_keeps_outputs_exact():
    rt = small_runtime(slots=10)
    s = Session(rt)
    for i, T in enumerate([150, 90, 200]):
        s.begin(i, T)
    for _ in range(20):
        s.step([0, 1, 2])
    rt.end_request("r1")
    for _ in range(40):
        s.step([2, 0])  # r2 now sits in row 1


def test_shared_prefix_blocks_are_refcounted_and_exact():
    rt = small_runtime()
    s = Session(rt)
    s.begin(0, 200)
    admitted = s.begin(1, 230, shared=(0, 10))
    assert admitted.host_blocks[:10] == rt.host_blocks("r0")[:10]
    assert all(rt.host.refcount(b) == 2 for b in admitted.host_blocks[:10])
    for _ in range(30):
        s.step([0, 1])
    rt.end_request("r0")
    assert all(rt.host.refcount(b) == 1 for b in admitted.host_blocks[:10])
    for _ in range(10):
        s.step([1])


def test_abort_inside_an_open_step_discards_it_and_the_rest_continue_exactly():
    rt = small_runtime(slots=10)
    s = Session(rt)
    for i, T in enumerate([160, 175]):  # 160: the next token opens a block (a repeated step must be idempotent)
        s.begin(i, T)
    z = torch.zeros(2, 2, 16)
    rt.append(0, ["r0", "r1"], z, z, torch.ones(2, 2))
    rt.abort_request("r1")
    for _ in range(30):
        s.step([0])


def test_knob_change_applies_at_the_step_boundary_only():
    rt = small_runtime(slots=8, max_gpu_slots=16)
    s = Session(rt)
    s.begin(0, 300)
    s.step([0])
    old = rt.knobs()
    res = rt.request_knobs(old.with_changes({"gpu_slots": 16, "victim_policy": "lru"}, 8))
    assert res.pending is not None and rt.knobs() == old and rt.slots.active == 8
    s.step([0])  # the step itself still runs with the old knobs; its boundary applies the new ones
    assert rt.knobs().gpu_slots == 16 and rt.slots.active == 16
    for _ in range(20):
        s.step([0])
    rt.request_knobs(rt.knobs().with_changes({"gpu_slots": 9}, 8))
    for _ in range(20):
        s.step([0])  # shrinking evicts, outputs stay exact
    assert rt.slots.active == 9


def test_more_slots_than_allocated_is_rejected_and_nothing_changes():
    rt = small_runtime(slots=8, max_gpu_slots=12)
    with pytest.raises(KnobError) as err:
        rt.request_knobs(rt.knobs().with_changes({"gpu_slots": 13}, 8))
    assert err.value.field == "gpu_slots" and "[8, 12]" in str(err.value)
    rt.step_boundary()
    assert rt.knobs().gpu_slots == 8


def test_reset_stats_zeroes_counters_and_keeps_occupancy():
    rt = small_runtime()
    s = Session(rt)
    s.begin(0, 300)
    for _ in range(5):
        s.step([0])
    assert rt.snapshot().totals.hits > 0
    rt.reset_stats()
    snap = rt.snapshot()
    assert (snap.steps, snap.totals.hits, snap.totals.misses, snap.totals.bytes_d2h) == (0, 0, 0, 0)
    assert snap.running_requests == 1 and snap.host_blocks_used == 20 and snap.resident_blocks > 0
    s.step([0])
    assert rt.snapshot().steps == 1


def test_snapshot_from_another_thread_while_stepping():
    rt = small_runtime()
    s = Session(rt)
    s.begin(0, 200)
    stop, errors, seen = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                seen.append(rt.snapshot().steps)
            except Exception as e:  # noqa: BLE001 - any failure is the test's finding
                errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(30):
        s.step([0], check=False)
    stop.set()
    t.join()
    assert not errors and seen == sorted(seen) and seen[-1] <= 30


def test_protocol_errors_name_the_problem():
    rt = small_runtime()
    s = Session(rt)
    s.begin(0, 40)
    s.begin(1, 40)
    with pytest.raises(RuntimeUsageError, match="already running"):
        s.begin(0, 10)
    with pytest.raises(RuntimeUsageError, match="append"):
        rt.attend(0, ["r0"], torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match="prompt_k"):
        rt.begin_request("bad", [torch.zeros(3, 2, 8)] * 2, [torch.zeros(3, 2, 16)] * 2, [torch.zeros(3, 2)] * 2)
    z = torch.zeros(2, 2, 16)
    rt.append(0, ["r0", "r1"], z, z, torch.ones(2, 2))
    with pytest.raises(RuntimeUsageError, match="overlaps"):
        rt.append(1, ["r1", "r0"], z, z, torch.ones(2, 2))
    with pytest.raises(RuntimeUsageError, match="open"):
        rt.end_request("r0")
    q = torch.zeros(2, 4, 16)
    with pytest.raises(RuntimeUsageError, match="already appended"):
        rt.decode(0, ["r0", "r1"], q, z, z, torch.ones(2, 2))  # layer 0 has its token
    with pytest.raises(RuntimeUsageError, match="overlaps"):
        rt.decode(1, ["r1", "r0"], q, z, z, torch.ones(2, 2))


def test_micro_batches_must_be_disjoint_and_all_finish_the_step():
    """A step may decode disjoint micro-batches; an overlapping one, or a boundary before every
    micro-batch went through every layer, is refused and changes nothing; abort discards them all."""
    rt = small_runtime(slots=10)
    s = Session(rt)
    for i, T in enumerate([150, 175, 90]):
        s.begin(i, T)
    z1, z2 = torch.zeros(1, 2, 16), torch.zeros(2, 2, 16)
    q1 = torch.zeros(1, 4, 16)
    rt.decode(0, ["r0"], q1, z1, z1, torch.ones(1, 2))
    with pytest.raises(RuntimeUsageError, match="overlaps"):
        rt.decode(0, ["r1", "r0"], torch.zeros(2, 4, 16), z2, z2, torch.ones(2, 2))
    rt.decode(0, ["r1", "r2"], torch.zeros(2, 4, 16), z2, z2, torch.ones(2, 2))
    rt.decode(1, ["r0"], q1, z1, z1, torch.ones(1, 2))
    lens = [rt.seq_len(f"r{i}") for i in range(3)]
    with pytest.raises(RuntimeUsageError, match=r"only layers \[0\] .*'r1', 'r2'"):
        rt.step_boundary()
    assert [rt.seq_len(f"r{i}") for i in range(3)] == lens
    rt.abort_request("r2")  # the open step is discarded for both micro-batches
    for _ in range(20):
        s.step([0, 1])


def test_static_buffers_stay_bounded_when_batches_keep_changing():
    """Graph mode keeps input/plan buffers per (batch size, first row). A server whose batch changes
    every step must not keep one set per shape ever seen: old sets go (with the segments captured
    against them), and every step still equals the reference."""
    from nosa_sglang.runtime.decode_layer import MAX_STATIC

    rt = small_runtime(slots=10, victim="lru", layers=2, max_requests=6)
    rt._decoder.graphs = ReplayClosures()
    s = Session(rt, n=6)
    for i in range(6):
        s.begin(i, 100 + 9 * i)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for step in range(60):
        lo = int(torch.randint(0, 5, (1,), generator=g))
        hi = int(torch.randint(lo + 1, 7, (1,), generator=g))
        seen.add((hi - lo, lo))
        s.step(list(range(lo, hi)))
        assert len(rt._decoder._static) <= MAX_STATIC
    assert len(seen) > MAX_STATIC and rt._decoder.graphs.replays > 0


def test_synthetic_requests_may_share_another_requests_blocks():
    """Benchmarks alias prompt blocks to run more requests than the pinned store holds: the sharer takes
    references (no new blocks for its full prompt blocks), decodes, and ending both restores the pool;
    a bad share raises and changes nothing."""
    rt = small_runtime(slots=10, victim="lru", layers=1)
    bs, free0 = rt.config.block_size, rt.host.free_blocks
    rt.begin_request_synthetic("a", 10 * bs + 5, seed=1)
    prefix = list(rt.host_blocks("a")[:10])
    for bad, match in ((prefix + [prefix[0]], "allowed range is \\[0, 10\\]"), ([10**6], "not an allocated block")):
        before = (rt.host.free_blocks, [rt.host.refcount(b) for b in prefix])
        with pytest.raises(ValueError, match=match):
            rt.begin_request_synthetic("b", 10 * bs + 9, seed=2, shared_blocks=bad)
        assert (rt.host.free_blocks, [rt.host.refcount(b) for b in prefix]) == before
        assert rt.running_requests == ("a",)
    rt.begin_request_synthetic("b", 10 * bs + 9, seed=2, shared_blocks=prefix)
    assert list(rt.host_blocks("b")[:10]) == prefix and all(rt.host.refcount(b) == 2 for b in prefix)
    assert rt.host.free_blocks == free0 - 11 - 1  # a: 11 blocks; b: only its partial tail block
    g = torch.Generator().manual_seed(0)
    for _ in range(2 * bs):  # through a block opening: the sharer's new blocks are its own
        k, v = torch.randn(2, 2, 16, generator=g), torch.randn(2, 2, 16, generator=g)
        rt.decode(0, ["a", "b"], torch.randn(2, 4, 16, generator=g), k, v, torch.rand(2, 2, generator=g) + 0.1)
        rt.step_boundary()
    assert all(rt.host.refcount(b) == 2 for b in prefix)
    rt.end_request("a")
    assert all(rt.host.refcount(b) == 1 for b in prefix)
    rt.end_request("b")
    assert rt.host.free_blocks == free0
