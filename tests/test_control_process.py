"""The control server in a child process (start_control_process) keeps the in-process semantics:
stats from the owner's provider, knobs validated in the child and applied by the owner at its step
boundary, owner-side rejections as INVALID_ARGUMENT, reset, token, and a child that never outlives
its owner."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.process_server import start_control_process
from nosa_sglang.control.server import ControlServerError
from nosa_sglang.control.synthetic import SyntheticProvider
from nosa_sglang.runtime.knobs import KnobError
from test_control_helpers import TOKEN, Served, serve, update_request, wait_until

PUBLISH_S = 0.02


class CappedProvider(SyntheticProvider):
    """An owner that takes at most 100 GPU slots (as a runtime takes at most the slots it allocated)."""

    def request_knobs(self, knobs, timeout_s):
        if knobs.gpu_slots > 100:
            raise KnobError("gpu_slots", f"gpu_slots={knobs.gpu_slots}: allowed range is [64, 100] (allocated)")
        return super().request_knobs(knobs, timeout_s)


def _serve(provider, stepping: bool, token: str | None = None) -> Iterator[Served]:
    return serve(token, stepping, provider=provider, start=start_control_process, publish_interval_s=PUBLISH_S)


@pytest.fixture
def child() -> Iterator[Served]:
    yield from _serve(SyntheticProvider(), stepping=True)


@pytest.fixture
def child_idle() -> Iterator[Served]:
    yield from _serve(CappedProvider(), stepping=False)


def test_stats_watch_and_requests_come_from_the_owner(child):
    provider, stub = child.provider, child.stub
    first = stub.GetStats(pb.GetStatsRequest(), timeout=10).stats
    assert first.steps > 0 and len(first.layers) == provider.setup.num_layers
    assert wait_until(lambda: stub.GetStats(pb.GetStatsRequest(), timeout=10).stats.steps > first.steps)
    assert len(stub.ListRequests(pb.ListRequestsRequest(), timeout=10).requests) == provider.setup.num_requests
    request = pb.WatchStatsRequest(max_updates=3)
    request.interval.FromNanoseconds(int(0.1e9))
    updates = list(stub.WatchStats(request, timeout=10))
    assert len(updates) == 3 and all(u.delta.steps > 0 for u in updates[1:])
    assert stub.GetConfig(pb.GetConfigRequest(), timeout=10).config.knobs.gpu_slots == provider.knobs().gpu_slots


def test_knobs_are_applied_by_the_owner_at_its_step_boundary(child_idle):
    provider, stub = child_idle.provider, child_idle.stub
    before = provider.knobs().gpu_slots
    reply = stub.UpdateConfig(update_request(["gpu_slots"], gpu_slots=before + 8), timeout=10)
    assert not reply.applied and reply.pending.gpu_slots == before + 8
    assert provider.knobs().gpu_slots == before  # queued, not applied: no step boundary yet
    provider.step()
    assert provider.knobs().gpu_slots == before + 8
    assert wait_until(lambda: stub.GetConfig(pb.GetConfigRequest(), timeout=10).config.knobs.gpu_slots == before + 8)


@pytest.mark.parametrize("value,where", [(0, "the child's validation"), (200, "the owner's KnobError")])
def test_rejected_knobs_name_the_field_and_change_nothing(child_idle, value, where):
    provider, stub = child_idle.provider, child_idle.stub
    before = stub.GetConfig(pb.GetConfigRequest(), timeout=10).config
    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateConfig(update_request(["gpu_slots"], gpu_slots=value), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, where
    assert "gpu_slots" in err.value.details() and "allowed range" in err.value.details()
    provider.step()
    assert stub.GetConfig(pb.GetConfigRequest(), timeout=10).config == before
    assert provider.knobs().gpu_slots == before.knobs.gpu_slots


def test_reset_stats_counts_from_zero_in_the_owner(child_idle):
    provider, stub = child_idle.provider, child_idle.stub
    for _ in range(5):
        provider.step()
    assert wait_until(lambda: stub.GetStats(pb.GetStatsRequest(), timeout=10).stats.steps >= 6)
    assert stub.ResetStats(pb.ResetStatsRequest(), timeout=10).stats_epoch == 1
    assert provider.snapshot().steps == 0
    after = stub.GetStats(pb.GetStatsRequest(), timeout=10).stats
    assert after.stats_epoch == 1 and after.steps == 0


def test_token_is_checked_in_the_child_and_health_stays_open():
    gen = _serve(SyntheticProvider(), stepping=False, token=TOKEN)
    served = next(gen)
    stub, channel = served.stub, served.channel
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.GetStats(pb.GetStatsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub.GetStats(pb.GetStatsRequest(), timeout=10, metadata=[("authorization", f"Bearer {TOKEN}")])
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gen.close()


def test_a_taken_port_is_an_error_naming_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ControlServerError, match=f"127.0.0.1:{port}"):
            start_control_process(SyntheticProvider(), port=port)


def test_stop_releases_the_port_and_is_idempotent(child_idle):
    server = child_idle.server
    server.stop()
    server.stop()
    assert server.wait(0)
    with socket.socket() as again:
        again.bind(("127.0.0.1", server.port))  # free again


OWNER = """
import sys
from nosa_sglang.control.process_server import start_control_process
from nosa_sglang.control.synthetic import SyntheticProvider
server = start_control_process(SyntheticProvider())
print(server._proc.pid, flush=True)
sys.stdin.readline()
import os; os._exit(0)  # no stop(): the owner dies
"""


def test_the_child_does_not_outlive_its_owner():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
    child_pid = int(owner.stdout.readline())
    os.kill(child_pid, 0)  # alive while the owner is
    owner.stdin.write(b"\n")
    owner.stdin.close()
    owner.wait(30)

    def gone() -> bool:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return True
        # NOTE: an exited child of the dead owner is reparented and reaped by init; until then it is
        # a zombie, which no longer serves anything
        with open(f"/proc/{child_pid}/stat") as f:
            return f.read().split()[2] == "Z"

    assert wait_until(gone, timeout_s=20)


class FlakyProvider(SyntheticProvider):
    """An owner whose snapshot and reset fail on demand (a provider bug, not a wire problem)."""

    fail = False

    def snapshot(self):
        if self.fail:
            raise RuntimeError("counters unavailable")
        return super().snapshot()

    def reset_stats(self):
        if self.fail:
            raise RuntimeError("reset refused")
        super().reset_stats()


def test_a_failing_provider_keeps_the_last_state_and_answers_unavailable():
    gen = _serve(FlakyProvider(), stepping=False)
    served = next(gen)
    provider, server, stub = served.provider, served.server, served.stub
    try:
        steps = stub.GetStats(pb.GetStatsRequest(), timeout=10).stats.steps
        provider.fail = True
        assert wait_until(lambda: server.publish_errors > 2)
        assert stub.GetStats(pb.GetStatsRequest(), timeout=10).stats.steps == steps  # the last good state
        with pytest.raises(grpc.RpcError) as err:
            stub.ResetStats(pb.ResetStatsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "reset refused" in err.value.details()
        provider.fail = False
        provider.step()
        assert wait_until(lambda: stub.GetStats(pb.GetStatsRequest(), timeout=10).stats.steps == steps + 1)
        assert "counters unavailable" in server.last_publish_error
    finally:
        gen.close()


@pytest.mark.parametrize("kw, field", [({"port": 70000}, "port"), ({"publish_interval_s": 0.0}, "publish_interval_s")])
def test_bad_arguments_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"{field}=.*allowed range"):
        start_control_process(SyntheticProvider(), **kw)
