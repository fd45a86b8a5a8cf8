"""The control API as SGLang hosts it: started with the NOSA backend in the scheduler of TP rank 0, over
that backend's runtime, with knob changes applied when the idle scheduler runs its idle hook."""

from __future__ import annotations

import json
from types import SimpleNamespace

import grpc
import pytest

from kernel_checks import SMALL

from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.pb import control_pb2_grpc as pb_grpc
from nosa_sglang.server_flags import NosaServerFlags

pytest.importorskip("sglang.srt.mem_cache.memory_pool")

from nosa_sglang import scheduler_control  # noqa: E402
from nosa_sglang.backend import NosaAttnBackend  # noqa: E402
from test_control_helpers import update_request  # noqa: E402
from test_sglang_backend import Scheduler, make_runner  # noqa: E402


@pytest.fixture
def served(gen, monkeypatch):
    """A NOSA backend in a fake scheduler (real runtime, real SGLang pools) with its control server."""
    monkeypatch.setattr(scheduler_control, "_server", None)
    runner = make_runner()
    backend = NosaAttnBackend(runner, NosaServerFlags(slots=SMALL.topk_blocks, max_slots=12, grpc_port=0))
    runner.attn_backend = backend
    server = scheduler_control.maybe_start_control_server(backend, runner)
    yield backend, runner, server, Scheduler(backend, runner, gen)
    server.stop(0)


def test_only_tp_rank_0_with_a_port_serves(monkeypatch):
    monkeypatch.setattr(scheduler_control, "_server", None)
    runner = make_runner()
    runner.ps.tp_rank = 1
    backend = NosaAttnBackend(runner, NosaServerFlags(slots=SMALL.topk_blocks, grpc_port=0))
    assert scheduler_control.maybe_start_control_server(backend, runner) is None
    runner.ps.tp_rank = 0
    no_port = NosaAttnBackend(make_runner(), NosaServerFlags(slots=SMALL.topk_blocks))
    assert scheduler_control.maybe_start_control_server(no_port, runner) is None


def test_stats_and_knobs_of_the_scheduler_runtime(served):
    backend, runner, server, sched = served
    sched.serve("a", prompt_tokens=200, decode_steps=5)
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.NosaControlStub(ch)
        stats = stub.GetStats(pb.GetStatsRequest(), timeout=10).stats
        assert stats.totals.hits + stats.totals.misses > 0 and stats.running_requests == 1
        req = update_request(["gpu_slots"], gpu_slots=12)
        req.apply_timeout.FromSeconds(10)
        future = stub.UpdateConfig.future(req, timeout=15)
        scheduler = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=runner), running_batch=SimpleNamespace(reqs=[]))
        while not future.done():  # the idle scheduler's hook applies it (and releases the finished request)
            scheduler_control.on_scheduler_idle(None, scheduler)
        assert future.result().applied and future.result().config.knobs.gpu_slots == 12
        assert backend.runtime.knobs().gpu_slots == 12 and backend.runtime.running_requests == ()


def test_idle_hook_ignores_other_backends():
    scheduler = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(attn_backend=object())))
    assert scheduler_control.on_scheduler_idle("r", scheduler) == "r"
    assert scheduler_control.nosa_backend_of(SimpleNamespace()) is None


def test_server_info_carries_the_counters(served):
    backend, runner, _, sched = served
    sched.serve("a", prompt_tokens=150, decode_steps=3)
    result = SimpleNamespace(internal_state={"last_gen_throughput": 1.0})
    scheduler = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=runner))
    assert scheduler_control.add_internal_state(result, scheduler) is result
    nosa = json.loads(json.dumps(result.internal_state["nosa"]))  # what /server_info serialises
    assert nosa["running_requests"] == 1 and nosa["steps"] == 3 and nosa["hits"] + nosa["misses"] > 0
    assert nosa["knobs"]["gpu_slots"] == SMALL.topk_blocks and nosa["host_blocks_used"] > 0
    pool = backend.kv_pool.pages  # offloading: the pool is in host memory, all its pages the host store
    assert nosa["kv_pool"] == {"memory": "host", "pages": pool.num_pages, "kv_bytes": pool.kv_bytes}
    assert nosa["host_blocks_total"] == pool.num_pages
    assert nosa["segment_graphs"] == {}  # CPU: the runtime's segments run eagerly (GPU: eager/captures/replays)


def test_the_token_from_the_launcher_guards_the_scheduler_api(monkeypatch):
    """The launcher hands the token down in NOSA_GRPC_TOKEN (not in the flags' JSON): the scheduler's
    server then refuses NosaControl calls without it; Health stays open."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from nosa_sglang.server_flags import ENV_VAR, TOKEN_ENV_VAR

    monkeypatch.setattr(scheduler_control, "_server", None)
    env = {ENV_VAR: NosaServerFlags(slots=SMALL.topk_blocks, grpc_port=0).to_env(), TOKEN_ENV_VAR: "s3cret"}
    flags = NosaServerFlags.from_env(env)
    runner = make_runner()
    backend = NosaAttnBackend(runner, flags)
    server = scheduler_control.maybe_start_control_server(backend, runner)
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.NosaControlStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.GetConfig(pb.GetConfigRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.GetConfig(pb.GetConfigRequest(), timeout=10, metadata=[("authorization", "Bearer s3cret")])
            assert ok.config.knobs.gpu_slots == SMALL.topk_blocks
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


METRICS_PROBE = """
import sys
sys.path.insert(0, {tests!r})
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from kernel_checks import SMALL
from nosa_sglang.backend import NosaAttnBackend
from nosa_sglang.server_flags import NosaServerFlags
from test_sglang_backend import Scheduler, make_runner
runner = make_runner()
runner.server_args.enable_metrics, runner.server_args.served_model_name = True, "tiny"
backend = NosaAttnBackend(runner, NosaServerFlags(slots=SMALL.topk_blocks))
backend.metrics.interval_s = 0.0
sched = Scheduler(backend, runner, torch.Generator().manual_seed(0))
sched.serve("a", prompt_tokens=150, decode_steps=4)
registry = CollectorRegistry()
MultiProcessCollector(registry, {path!r})
print(generate_latest(registry).decode())
"""


def test_prometheus_gauges_in_multiprocess_mode(tmp_path):
    """With --enable-metrics, SGLang serves every process's prometheus values from the multiprocess
    directory: the backend's nosa_* gauges must land there (a fresh process: the mode is chosen at import)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = METRICS_PROBE.format(tests=str(Path(__file__).parent), path=str(tmp_path))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'nosa_decode_steps{model_name="tiny"} 4.0' in r.stdout
    assert 'nosa_running_requests{model_name="tiny"} 1.0' in r.stdout
    hits = float(r.stdout.split('nosa_slot_hits{model_name="tiny"} ')[1].split()[0])
    misses = float(r.stdout.split('nosa_slot_misses{model_name="tiny"} ')[1].split()[0])
    assert hits + misses > 0


def test_metrics_are_refreshed_at_most_every_interval():
    from nosa_sglang.metrics import NosaMetrics

    backend = NosaAttnBackend(make_runner(), NosaServerFlags(slots=SMALL.topk_blocks))
    metrics = NosaMetrics({"model_name": "m"}, interval_s=3600)
    assert metrics.update(backend.runtime) and not metrics.update(backend.runtime)
    assert metrics.update(backend.runtime, force=True)
