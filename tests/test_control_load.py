"""32 concurrent clients plus 8 watchers while the provider steps: no error, every answer consistent."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.pb import control_pb2_grpc as pb_grpc
from test_control_helpers import served, update_request, wait_until  # noqa: F401 (fixture)

CLIENTS, WATCHERS, DURATION_S = 32, 8, 2.0


def _check_counters(c: pb.TransferCounters, where: str) -> None:
    total = c.hits + c.misses
    expected = c.hits / total if total else 0.0
    assert c.hit_rate == pytest.approx(expected, abs=1e-12), where
    assert c.stall_seconds <= c.transfer_seconds + 1e-12, where


def _check_stats(s: pb.Stats, where: str) -> None:
    _check_counters(s.totals, where)
    for layer in s.layers:
        _check_counters(layer.counters, f"{where} layer {layer.layer}")
    for key in ("hits", "misses", "bytes_h2d", "bytes_d2h"):
        assert getattr(s.totals, key) == sum(getattr(lyr.counters, key) for lyr in s.layers), where
    assert s.resident_blocks <= s.gpu_slot_capacity, where


def test_32_clients_and_8_watchers_while_stepping(served):
    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    errors: list[str] = []
    counts = {"calls": 0, "updates": 0}
    lock = threading.Lock()
    end = time.monotonic() + DURATION_S

    def client(i: int) -> None:
        rng = random.Random(seed + i)
        with grpc.insecure_channel(served.server.address) as channel:
            stub = pb_grpc.NosaControlStub(channel)
            last_steps = 0
            try:
                while time.monotonic() < end:
                    kind = rng.choice(("stats", "stats", "requests", "config", "update"))
                    if kind == "stats":
                        s = stub.GetStats(pb.GetStatsRequest(), timeout=10).stats
                        _check_stats(s, f"client {i}")
                        assert s.steps >= last_steps, f"client {i}: steps went back"
                        last_steps = s.steps
                    elif kind == "requests":
                        for r in stub.ListRequests(pb.ListRequestsRequest(), timeout=10).requests:
                            total = r.hits + r.misses
                            assert r.hit_rate == pytest.approx(r.hits / total if total else 0.0)
                    elif kind == "config":
                        k = stub.GetConfig(pb.GetConfigRequest(), timeout=10).config.knobs
                        assert 64 <= k.gpu_slots <= 1024
                    else:
                        slots = rng.choice((64, 96, 128))
                        reply = stub.UpdateConfig(update_request(["gpu_slots"], gpu_slots=slots), timeout=10)
                        assert reply.applied and 64 <= reply.config.knobs.gpu_slots <= 1024
                        with lock:
                            counts["updates"] += 1
                    with lock:
                        counts["calls"] += 1
                    time.sleep(rng.uniform(0, 0.01))
            except (grpc.RpcError, AssertionError) as err:
                errors.append(f"client {i}: {err!r}")

    def watcher(i: int) -> None:
        request = pb.WatchStatsRequest()
        request.interval.FromMilliseconds(100)
        with grpc.insecure_channel(served.server.address) as channel:
            stream = pb_grpc.NosaControlStub(channel).WatchStats(request)
            prev = None
            try:
                for update in stream:
                    _check_stats(update.stats, f"watcher {i}")
                    if prev is not None:
                        d = update.delta
                        assert d.steps == update.stats.steps - prev.stats.steps >= 0
                        assert d.totals.hits == update.stats.totals.hits - prev.stats.totals.hits
                        _check_counters(d.totals, f"watcher {i} delta")
                    prev = update
                    if time.monotonic() >= end:
                        stream.cancel()
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.CANCELLED:
                    errors.append(f"watcher {i}: {err!r}")
            except AssertionError as err:
                errors.append(f"watcher {i}: {err!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    threads += [threading.Thread(target=watcher, args=(i,)) for i in range(WATCHERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    print(f"calls={counts['calls']} updates={counts['updates']}")
    assert not errors, errors[:5]
    assert counts["calls"] > CLIENTS * 10 and counts["updates"] > 0, counts
    assert wait_until(lambda: served.server.active_watchers == 0)
