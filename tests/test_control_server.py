"""The server around the service: health, reflection, bearer token, stop, stream limits and cleanup,
message size limits, binding."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.server import ControlServerError, ServerOptions, start_control_server
from nosa_sglang.control.synthetic import SyntheticProvider
from test_control_helpers import TOKEN, serve, served, served_token, wait_until  # noqa: F401

SERVICE = "nosa.v1.NosaControl"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _watch(served, interval_s: float = 0.1):
    request = pb.WatchStatsRequest()
    request.interval.FromNanoseconds(int(interval_s * 1e9))
    return served.stub.WatchStats(request, metadata=served.metadata)


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_reports_serving(served, service):
    health = health_pb2_grpc.HealthStub(served.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING


def test_health_reports_not_serving_when_the_server_stops(served):
    watch = health_pb2_grpc.HealthStub(served.channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert next(watch).status == SERVING
    stopper = threading.Thread(target=served.server.stop, kwargs=dict(grace_s=0.3))
    stopper.start()
    assert next(watch).status == NOT_SERVING
    stopper.join()


def test_reflection_lists_the_service(served):
    db = ProtoReflectionDescriptorDatabase(served.channel)
    services = db.get_services()
    assert SERVICE in services and "grpc.health.v1.Health" in services
    proto = db.FindFileContainingSymbol(SERVICE)
    assert proto.name == "nosa/v1/control.proto" and proto.package == "nosa.v1"
    assert [m.name for m in proto.service[0].method] == [
        "GetStats", "WatchStats", "ListRequests", "GetConfig", "UpdateConfig", "ResetStats"]


@pytest.mark.parametrize("metadata", [
    [], [("authorization", "Bearer wrong")], [("authorization", TOKEN)],
    [("authorization", f"Basic {TOKEN}")], [("authorization", f"Bearer {TOKEN}x")],
], ids=["missing", "wrong", "no_scheme", "other_scheme", "longer"])
def test_token_is_required_for_every_control_call(served_token, metadata):
    calls = [("GetStats", pb.GetStatsRequest()), ("ListRequests", pb.ListRequestsRequest()),
             ("GetConfig", pb.GetConfigRequest()), ("ResetStats", pb.ResetStatsRequest()),
             ("UpdateConfig", pb.UpdateConfigRequest())]
    for name, request in calls:
        with pytest.raises(grpc.RpcError) as err:
            getattr(served_token.stub, name)(request, metadata=metadata, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    with pytest.raises(grpc.RpcError) as err:
        next(served_token.stub.WatchStats(pb.WatchStatsRequest(), metadata=metadata, timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert served_token.provider.snapshot().steps > 0  # ResetStats did not run


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_token_is_accepted(served_token, scheme):
    md = [("authorization", f"{scheme} {TOKEN}")]
    assert served_token.stub.GetStats(pb.GetStatsRequest(), metadata=md, timeout=5).stats.steps > 0
    request = pb.WatchStatsRequest(max_updates=1)
    assert len(list(served_token.stub.WatchStats(request, metadata=md, timeout=5))) == 1


def test_health_and_reflection_need_no_token(served_token):
    health = health_pb2_grpc.HealthStub(served_token.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status == SERVING
    assert SERVICE in ProtoReflectionDescriptorDatabase(served_token.channel).get_services()


def test_cancelled_streams_free_their_watchers(served):
    streams = [_watch(served) for _ in range(6)]
    for s in streams:
        next(s)
    assert served.server.active_watchers == 6
    for s in streams:
        s.cancel()
    assert wait_until(lambda: served.server.active_watchers == 0), served.server.active_watchers


def test_stop_ends_open_streams_cleanly(served):
    stream = _watch(served, interval_s=5.0)
    next(stream)
    start = time.monotonic()
    served.server.stop(grace_s=5.0)
    assert list(stream) == []  # ended with OK, not an error
    assert stream.code() == grpc.StatusCode.OK
    assert time.monotonic() - start < 2.0
    assert served.server.active_watchers == 0


def test_too_many_watchers_is_resource_exhausted():
    gen = serve(options=ServerOptions(max_watchers=2))
    served_ = next(gen)
    try:
        open_ = [_watch(served_) for _ in range(2)]
        for s in open_:
            next(s)
        with pytest.raises(grpc.RpcError) as err:
            next(_watch(served_))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 2" in err.value.details()
        for s in open_:
            s.cancel()
    finally:
        gen.close()


def test_oversized_request_is_refused(served):
    request = pb.UpdateConfigRequest()
    request.update_mask.paths.extend(["x" * 100] * 1000)  # ~100 KiB > 64 KiB limit
    with pytest.raises(grpc.RpcError) as err:
        served.call("UpdateConfig", request)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_binds_loopback_by_default_and_refuses_a_taken_port():
    provider = SyntheticProvider()
    with start_control_server(provider) as first:
        assert first.host == "127.0.0.1" and first.port > 0
        with pytest.raises(ControlServerError, match=f"127.0.0.1:{first.port}"):
            start_control_server(provider, port=first.port)


def test_stop_is_idempotent_and_releases_the_port():
    provider = SyntheticProvider()
    server = start_control_server(provider)
    port = server.port
    server.stop()
    server.stop()
    assert server.wait(0.1)
    with start_control_server(provider, port=port) as again:
        assert again.port == port
