"""Check that the committed nosa.v1 stubs work with this machine's grpcio and protobuf.

Run on every machine kind before trusting the control service there (the GPU machine's versions
come from SGLang's dependency set, not from our pins):

    python benchmarks/check_grpc_env.py

Prints the versions, then three checks, one line each: the stubs import and round-trip a message;
a bare server built from the generated servicer answers a unary and a streaming call on loopback;
the full control server (health, reflection, auth) answers GetStats and a health check. Exit code
0 when all pass, 1 otherwise. Needs no GPU and takes about a second.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
import traceback
from collections.abc import Callable
from concurrent import futures

if importlib.util.find_spec("nosa_sglang") is None:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def print_versions() -> None:
    print(f"python                 {platform.python_version()}")
    for dist in ("grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection", "grpcio-tools"):
        print(f"{dist:<22} {_dist_version(dist)}")
    try:
        from google.protobuf.internal import api_implementation

        print(f"protobuf backend       {api_implementation.Type()}")
    except ImportError:
        pass


def check_roundtrip() -> str:
    from nosa_sglang.control.pb import control_pb2 as pb

    msg = pb.UpdateConfigRequest(
        knobs=pb.OffloadKnobs(gpu_slots=96, transfer_mode=pb.TRANSFER_MODE_ZERO_COPY, prefetch=True),
    )
    msg.update_mask.paths.extend(["gpu_slots", "transfer_mode"])
    msg.apply_timeout.FromMilliseconds(1500)
    back = pb.UpdateConfigRequest.FromString(msg.SerializeToString())
    assert back == msg and back.apply_timeout.ToMilliseconds() == 1500, back
    stats = pb.Stats(layers=[pb.LayerStats(layer=3, counters=pb.TransferCounters(hits=7))])
    assert pb.Stats.FromString(stats.SerializeToString()).layers[0].counters.hits == 7
    return f"module {type(msg).__module__}"


def check_bare_server() -> str:
    import grpc

    from nosa_sglang.control.pb import control_pb2 as pb
    from nosa_sglang.control.pb import control_pb2_grpc as pb_grpc

    class Servicer(pb_grpc.NosaControlServicer):
        def GetConfig(self, request, context):  # noqa: N802 (generated name)
            return pb.GetConfigResponse(config=pb.Config(knobs=pb.OffloadKnobs(gpu_slots=64)))

        def WatchStats(self, request, context):  # noqa: N802
            for i in range(request.max_updates):
                yield pb.WatchStatsResponse(stats=pb.Stats(steps=i))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_NosaControlServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.NosaControlStub(channel)
            reply = stub.GetConfig(pb.GetConfigRequest(), timeout=5)
            steps = [m.stats.steps for m in stub.WatchStats(pb.WatchStatsRequest(max_updates=3), timeout=5)]
        assert reply.config.knobs.gpu_slots == 64 and steps == [0, 1, 2], (reply, steps)
    finally:
        server.stop(None)
    return "unary + server-streaming over loopback"


def check_control_server() -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from nosa_sglang.control.pb import control_pb2 as pb
    from nosa_sglang.control.pb import control_pb2_grpc as pb_grpc
    from nosa_sglang.control.server import start_control_server
    from nosa_sglang.control.synthetic import SyntheticProvider

    provider = SyntheticProvider()
    provider.step()
    server = start_control_server(provider, port=0, token="check")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stats = pb_grpc.NosaControlStub(channel).GetStats(
                pb.GetStatsRequest(), metadata=[("authorization", "Bearer check")], timeout=5
            )
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="nosa.v1.NosaControl"), timeout=5
            )
        assert stats.stats.steps == 1, stats
        assert health.status == health_pb2.HealthCheckResponse.SERVING, health
    finally:
        server.stop(grace_s=1.0)
    return "GetStats with token + health SERVING"


def main() -> int:
    print_versions()
    checks: list[tuple[str, Callable[[], str]]] = [
        ("stubs import + round-trip", check_roundtrip),
        ("bare generated server", check_bare_server),
        ("control server", check_control_server),
    ]
    failed = 0
    for name, check in checks:
        try:
            print(f"OK   {name}: {check()}")
        except Exception as exc:  # report every check, one line each, then the trace
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
