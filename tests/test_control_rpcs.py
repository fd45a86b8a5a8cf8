"""Every NosaControl RPC against a real server on loopback, backed by a SyntheticProvider."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from nosa_sglang.config import NosaConfig
from nosa_sglang.control import convert
from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.pb import control_pb2_grpc as pb_grpc
from nosa_sglang.control.server import start_control_server
from nosa_sglang.control.synthetic import SyntheticProvider
from nosa_sglang.runtime.knobs import OffloadKnobs
from test_control_helpers import served, served_idle, update_request  # noqa: F401 (fixtures)


def _interval(seconds: float) -> pb.WatchStatsRequest:
    request = pb.WatchStatsRequest()
    request.interval.FromNanoseconds(int(seconds * 1e9))
    return request


def test_get_stats_reports_totals_layers_and_occupancy(served):
    stats = served.call("GetStats", pb.GetStatsRequest()).stats
    setup = served.provider.setup
    assert stats.steps > 0 and stats.running_requests == setup.num_requests
    assert [lyr.layer for lyr in stats.layers] == list(range(setup.num_layers))
    for key in ("hits", "misses", "prefetched", "bytes_h2d", "bytes_d2h"):
        assert getattr(stats.totals, key) == sum(getattr(lyr.counters, key) for lyr in stats.layers)
    t = stats.totals
    assert t.hits > 0 and t.misses > 0 and t.hit_rate == pytest.approx(t.hits / (t.hits + t.misses))
    assert t.transfer_seconds > 0 and 0 < t.stall_seconds <= t.transfer_seconds
    assert 0 < stats.resident_blocks <= stats.gpu_slot_capacity
    assert 0 < stats.host_blocks_used <= stats.host_blocks_total
    assert 0 < stats.host_bytes_used <= stats.host_capacity_bytes
    assert stats.mode == pb.RUNTIME_MODE_OFFLOAD and stats.device == "cpu"
    assert abs(stats.taken_at.ToNanoseconds() / 1e9 - time.time()) < 5


def test_stats_are_built_at_most_once_per_snapshot_interval():
    provider = SyntheticProvider()
    calls = []
    original = provider.snapshot
    provider.snapshot = lambda: calls.append(1) or original()  # type: ignore[method-assign]
    with start_control_server(provider) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.NosaControlStub(channel)
        end = time.monotonic() + 0.5

        def hammer() -> None:
            while time.monotonic() < end:
                stub.GetStats(pb.GetStatsRequest(), timeout=5)

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert 1 <= len(calls) <= 0.5 / 0.05 + 2, f"{len(calls)} snapshots in 0.5 s"


def test_watch_stats_sends_deltas_and_rates(served):
    request = _interval(0.1)
    request.max_updates = 4
    updates = list(served.stub.WatchStats(request, timeout=10))
    assert len(updates) == 4  # then the stream ended with OK
    assert not updates[0].HasField("delta")
    for prev, cur in zip(updates, updates[1:]):
        d = cur.delta
        assert not d.counters_reset
        assert d.steps == cur.stats.steps - prev.stats.steps > 0
        assert d.totals.hits == cur.stats.totals.hits - prev.stats.totals.hits
        assert d.totals.hit_rate == pytest.approx(d.totals.hits / (d.totals.hits + d.totals.misses))
        assert [lyr.counters.misses for lyr in d.layers] == [
            c.counters.misses - p.counters.misses for c, p in zip(cur.stats.layers, prev.stats.layers)
        ]
        assert 0.05 < d.interval_seconds < 1.0
        assert d.rates.steps_per_second == pytest.approx(d.steps / d.interval_seconds)
        assert d.rates.h2d_bytes_per_second == pytest.approx(d.totals.bytes_h2d / d.interval_seconds)


@pytest.mark.parametrize("seconds", [0.0, 0.01, 3601.0])
def test_watch_stats_rejects_interval_out_of_range(served, seconds):
    with pytest.raises(grpc.RpcError) as err:
        list(served.stub.WatchStats(_interval(seconds), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "interval" in err.value.details() and "[0.1s, 3600s]" in err.value.details()


def test_watch_delta_after_reset_counts_from_the_reset(served):
    request = _interval(0.1)
    request.max_updates = 2
    stream = served.stub.WatchStats(request, timeout=10)
    first = next(stream)
    epoch = served.call("ResetStats", pb.ResetStatsRequest()).stats_epoch
    second = next(stream)
    assert epoch == first.stats.stats_epoch + 1 == second.stats.stats_epoch
    assert second.delta.counters_reset
    assert second.delta.steps == second.stats.steps  # counted from zero


def test_list_requests_reports_residency_and_hit_rate(served):
    reply = served.call("ListRequests", pb.ListRequestsRequest())
    assert [r.request_id for r in reply.requests] == ["synthetic-1", "synthetic-2", "synthetic-3"]
    nosa = NosaConfig()
    for r in reply.requests:
        assert r.host_blocks == nosa.num_blocks(r.seq_len_tokens)
        assert r.resident_blocks > 0 and r.hits > 0
        assert r.hit_rate == pytest.approx(r.hits / (r.hits + r.misses))


def test_get_config_returns_knobs_constants_and_limits(served):
    reply = served.call("GetConfig", pb.GetConfigRequest())
    c = reply.config
    assert c.knobs == convert.knobs_to_proto(OffloadKnobs())  # the provider starts at the defaults
    assert c.knobs.gpu_slots == 64 and c.knobs.transfer_mode != pb.TRANSFER_MODE_UNSPECIFIED
    nosa = {f.name: getattr(c.nosa, f.name) for f in pb.NosaConstants.DESCRIPTOR.fields}
    assert nosa == NosaConfig().to_dict()
    assert (c.limits.min_gpu_slots, c.limits.max_gpu_slots) == (64, 1024)
    assert not reply.HasField("pending")


def test_update_config_applies_at_step_boundary_and_returns_config_in_force(served):
    reply = served.call("UpdateConfig", update_request(
        ["gpu_slots", "knobs.transfer_mode"], gpu_slots=128, transfer_mode=pb.TRANSFER_MODE_ZERO_COPY))
    assert reply.applied and not reply.HasField("pending")
    assert reply.config.knobs.gpu_slots == 128
    assert reply.config.knobs.transfer_mode == pb.TRANSFER_MODE_ZERO_COPY
    assert served.provider.knobs().gpu_slots == 128
    assert served.call("GetConfig", pb.GetConfigRequest()).config.knobs == reply.config.knobs


def test_update_config_is_queued_until_the_next_step_boundary(served_idle):
    request = update_request(["gpu_slots", "prefetch"], gpu_slots=256, prefetch=True)
    request.apply_timeout.FromSeconds(0)
    reply = served_idle.call("UpdateConfig", request)
    assert not reply.applied and reply.pending.gpu_slots == 256 and reply.pending.prefetch
    assert (reply.config.knobs.gpu_slots, reply.config.knobs.prefetch) == (64, False)  # both, atomically
    got = served_idle.call("GetConfig", pb.GetConfigRequest())
    assert got.config.knobs.gpu_slots == 64 and got.pending.gpu_slots == 256
    served_idle.provider.step()  # the boundary
    got = served_idle.call("GetConfig", pb.GetConfigRequest())
    assert (got.config.knobs.gpu_slots, got.config.knobs.prefetch) == (256, True)
    assert not got.HasField("pending")


def test_queued_updates_of_different_knobs_both_survive(served_idle):
    for paths, knobs in ((["gpu_slots"], dict(gpu_slots=96)), (["prefetch"], dict(prefetch=True))):
        request = update_request(paths, **knobs)
        request.apply_timeout.FromSeconds(0)
        served_idle.call("UpdateConfig", request)
    served_idle.provider.step()
    knobs = served_idle.provider.knobs()
    assert (knobs.gpu_slots, knobs.prefetch) == (96, True)


def test_update_config_wait_is_capped_by_the_call_deadline(served_idle):
    request = update_request(["gpu_slots"], gpu_slots=80)
    request.apply_timeout.FromSeconds(20)
    start = time.monotonic()
    reply = served_idle.stub.UpdateConfig(request, timeout=1.0)
    assert 0.5 < time.monotonic() - start < 1.0
    assert not reply.applied and reply.pending.gpu_slots == 80


def test_reset_stats_zeroes_counters_and_keeps_occupancy(served_idle):
    for _ in range(5):
        served_idle.provider.step()
    before = served_idle.call("GetStats", pb.GetStatsRequest()).stats
    reply = served_idle.call("ResetStats", pb.ResetStatsRequest())
    after = served_idle.call("GetStats", pb.GetStatsRequest()).stats
    assert reply.stats_epoch == after.stats_epoch == before.stats_epoch + 1
    assert after.steps == 0 and after.totals.hits == after.totals.misses == 0
    assert all(lyr.counters.bytes_h2d == 0 for lyr in after.layers)
    assert after.resident_blocks == before.resident_blocks > 0
    assert all(r.hits == 0 for r in served_idle.call("ListRequests", pb.ListRequestsRequest()).requests)
