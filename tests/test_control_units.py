"""The control package's pieces without a server: step-boundary knob swap, snapshot cache, deltas,
the synthetic provider, and that the proto mirrors the shared Python types."""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import pytest

from nosa_sglang.config import NosaConfig
from nosa_sglang.runtime.knob_queue import KnobQueue
from nosa_sglang.control.convert import MAX_HOST_CAPACITY_BYTES, delta_to_proto
from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.snapshot_cache import CachedSnapshot, SnapshotCache
from nosa_sglang.control.synthetic import SyntheticProvider
from nosa_sglang.runtime.knobs import KnobError, OffloadKnobs
from nosa_sglang.runtime.stats import LayerStats, StatsSnapshot


def test_knob_swap_queues_until_take():
    swap = KnobQueue(OffloadKnobs())
    update = swap.request(OffloadKnobs(gpu_slots=128), timeout_s=0)
    assert update.in_force.gpu_slots == 64 and update.pending.gpu_slots == 128
    assert swap.latest().gpu_slots == 128 and swap.in_force().gpu_slots == 64
    assert swap.take().gpu_slots == 128
    assert swap.in_force().gpu_slots == 128 and swap.pending() is None
    assert swap.take() is None


def test_knob_swap_waiter_wakes_at_the_boundary():
    swap = KnobQueue(OffloadKnobs())
    result = []
    waiter = threading.Thread(target=lambda: result.append(swap.request(OffloadKnobs(gpu_slots=96), 5.0)))
    waiter.start()
    assert _wait(lambda: swap.pending() is not None)
    start = time.monotonic()
    swap.take()
    waiter.join()
    assert time.monotonic() - start < 1.0
    assert result[0].pending is None and result[0].in_force.gpu_slots == 96


def test_snapshot_cache_builds_once_per_interval_under_contention():
    provider = SyntheticProvider()
    cache = SnapshotCache(provider.snapshot, min_interval_s=0.05)
    end = time.monotonic() + 0.3

    def reader() -> None:
        while time.monotonic() < end:
            cache.get()

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= cache.builds <= 0.3 / 0.05 + 2


def test_snapshot_cache_reset_starts_a_new_epoch_and_rebuilds():
    provider = SyntheticProvider()
    provider.step()
    cache = SnapshotCache(provider.snapshot, min_interval_s=10.0)
    first = cache.get()
    assert cache.reset(provider.reset_stats) == 1
    second = cache.get()
    assert second.epoch == 1 and second.snapshot.steps == 0 and first.snapshot.steps == 1


def _snap(t: float, steps: int, hits: int, misses: int, epoch: int = 0) -> CachedSnapshot:
    layer = LayerStats(layer=0, hits=hits, misses=misses, bytes_h2d=misses * 100)
    s = StatsSnapshot(taken_at_s=t, steps=steps, running_requests=1, resident_blocks=0,
                      gpu_slot_capacity=0, host_blocks_used=0, host_blocks_total=0, host_bytes_used=0,
                      host_capacity_bytes=0, layers=(layer,),
                      totals=dataclasses.replace(layer, layer=-1))
    return CachedSnapshot(s, epoch, t)


def test_delta_gives_differences_and_rates():
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    h0, m0, dh, dm = (rng.randrange(1, 10_000) for _ in range(4))
    d = delta_to_proto(_snap(1.0, 10, h0, m0), _snap(1.5, 20, h0 + dh, m0 + dm))
    assert not d.counters_reset, seed
    assert (d.steps, d.totals.hits, d.totals.misses) == (10, dh, dm)
    assert d.totals.hit_rate == pytest.approx(dh / (dh + dm))
    assert d.rates.steps_per_second == pytest.approx(20.0)
    assert d.rates.h2d_bytes_per_second == pytest.approx(dm * 100 / 0.5)
    assert d.layers[0].counters.misses == dm


@pytest.mark.parametrize("epoch, steps", [(1, 30), (0, 3)], ids=["new_epoch", "counters_went_back"])
def test_delta_after_a_reset_counts_from_the_reset(epoch, steps):
    d = delta_to_proto(_snap(1.0, 10, 500, 100), _snap(2.0, steps, 40, 8, epoch=epoch))
    assert d.counters_reset
    assert (d.steps, d.totals.hits, d.totals.misses) == (steps, 40, 8)


def test_synthetic_hit_rate_rises_with_gpu_slots():
    rates = []
    for slots in (64, 96, 192):
        provider = SyntheticProvider(knobs=OffloadKnobs(gpu_slots=slots))
        for _ in range(3):
            provider.step()
        rates.append(provider.snapshot().totals.hit_rate)
    assert 0 < rates[0] < rates[1] < rates[2] < 1


def test_proto_knobs_mirror_offload_knobs_and_nosa_config():
    assert [f.name for f in pb.OffloadKnobs.DESCRIPTOR.fields] == [
        f.name for f in dataclasses.fields(OffloadKnobs)]
    assert [f.name for f in pb.NosaConstants.DESCRIPTOR.fields] == [
        f.name for f in dataclasses.fields(NosaConfig)]


def test_host_capacity_limit_matches_offload_knobs():
    OffloadKnobs(host_capacity_bytes=MAX_HOST_CAPACITY_BYTES)
    with pytest.raises(KnobError):
        OffloadKnobs(host_capacity_bytes=MAX_HOST_CAPACITY_BYTES + 1)


def _wait(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.005)
    return predicate()


def test_every_layer_counter_reaches_the_proto():
    """A counter added to runtime.stats.LayerStats must be mapped in convert.py (and the proto)."""
    from nosa_sglang.control import convert

    counters = {f.name for f in dataclasses.fields(LayerStats)} - {"layer"}
    assert counters == set(convert._COUNTS) | set(convert._TIMES)
    proto_fields = {f.name for f in pb.TransferCounters.DESCRIPTOR.fields}
    assert set(convert._COUNTS) | set(convert._TIMES.values()) | {"hit_rate"} == proto_fields


def test_nothing_published_yet_is_served_as_zeros():
    cache = SnapshotCache(lambda: None)
    snap = cache.get().snapshot
    assert snap.steps == 0 and snap.totals.hits == 0 and snap.layers == ()
