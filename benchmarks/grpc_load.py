"""Does serving the control API slow the decode loop? Step time with and without gRPC load, one run.

The stepping loop runs on this process's main thread, the control server on its own threads in this
process (as in SGLang's scheduler process); the load comes from a separate process (as remote
clients would): 32 clients at 10 calls/s each (GetStats / ListRequests / GetConfig in turn) plus
8 WatchStats streams at 10 Hz. Phases alternate idle, loaded, idle, loaded (the server is up in
all of them) so drift hits both conditions alike. Target: loaded mean step time (the throughput)
<= 5 % slower.

    python benchmarks/grpc_load.py                      # the runtime decoding (auto = runtime)
    python benchmarks/grpc_load.py --model 1b --prompt-tokens 32768   # on a GPU: the real figure
    python benchmarks/grpc_load.py --provider synthetic --step-work-ms 5
    python benchmarks/grpc_load.py --provider my_module:make_target   # fn(args) -> BenchTarget

The runtime target (benchmarks/runtime_decode.py) decodes one request of a random NOSA-Llama through
NosaRuntime (CUDA if there is one, else the CPU mode), served by RuntimeProvider.

Prints a markdown table (also written to --out if given).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import multiprocessing as mp
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

if importlib.util.find_spec("nosa_sglang") is None:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402

from nosa_sglang.control.provider import ControlProvider  # noqa: E402
from nosa_sglang.control.server import start_control_server  # noqa: E402


class BenchTarget(NamedTuple):
    """What the benchmark steps and serves."""

    provider: ControlProvider
    step: Callable[[], None]  # one decode step of the whole batch, returns when it is done
    close: Callable[[], None]
    label: str


def synthetic_target(args: argparse.Namespace) -> BenchTarget:
    from nosa_sglang.control.synthetic import SyntheticProvider, SyntheticSetup

    provider = SyntheticProvider(SyntheticSetup(num_layers=32, step_work_s=args.step_work_ms / 1e3))
    label = f"synthetic provider ({args.step_work_ms:g} ms of GIL-holding Python per step)"
    return BenchTarget(provider, provider.step, lambda: None, label)


def runtime_target(args: argparse.Namespace) -> BenchTarget:
    """NosaRuntime decoding a random NOSA-Llama (CUDA if there is one), served by RuntimeProvider: the
    control server and the decode loop share this process, as in SGLang's scheduler."""
    from runtime_decode import build_runtime_decode  # torch: only here, not in the load process

    from nosa_sglang.control.runtime_provider import RuntimeProvider

    decode = build_runtime_decode(args.model, args.device, args.prompt_tokens, args.restart_every)
    return BenchTarget(RuntimeProvider(decode.runtime), decode.step, decode.close, decode.label)


def make_target(args: argparse.Namespace) -> BenchTarget:
    if args.provider == "synthetic":
        return synthetic_target(args)
    if args.provider in ("runtime", "auto"):
        return runtime_target(args)
    module, _, fn = args.provider.partition(":")
    return getattr(importlib.import_module(module), fn)(args)


# -- load process --------------------------------------------------------------------------------
def _load_main(address: str, clients: int, rate_hz: float, watchers: int, watch_hz: float,
               token: str | None, ready: mp.Event, stop: mp.Event, results: mp.Queue) -> None:
    from nosa_sglang.control.pb import control_pb2 as pb
    from nosa_sglang.control.pb import control_pb2_grpc as pb_grpc

    md = [("authorization", f"Bearer {token}")] if token else []
    counts = {"calls": 0, "errors": 0, "watch_messages": 0}
    lock = threading.Lock()
    calls = [("GetStats", pb.GetStatsRequest()), ("ListRequests", pb.ListRequestsRequest()),
             ("GetConfig", pb.GetConfigRequest())]
    channels = [grpc.insecure_channel(address) for _ in range(clients + watchers)]
    started = threading.Barrier(clients + watchers + 1)

    def client(i: int) -> None:
        stub = pb_grpc.NosaControlStub(channels[i])
        stub.GetStats(pb.GetStatsRequest(), metadata=md, timeout=10)  # connected before timing
        started.wait()
        next_at = time.monotonic() + i / (clients * rate_hz)  # spread the clients over a period
        n = 0
        while not stop.is_set():
            name, request = calls[n % len(calls)]
            try:
                getattr(stub, name)(request, metadata=md, timeout=10)
                key = "calls"
            except grpc.RpcError:
                key = "errors"
            with lock:
                counts[key] += 1
            n += 1
            next_at += 1 / rate_hz
            stop.wait(max(0.0, next_at - time.monotonic()))

    def watcher(i: int) -> None:
        stub = pb_grpc.NosaControlStub(channels[clients + i])
        request = pb.WatchStatsRequest()
        request.interval.FromNanoseconds(int(1e9 / watch_hz))
        stream = stub.WatchStats(request, metadata=md)
        first = True
        try:
            for _ in stream:
                if first:
                    started.wait()
                    first = False
                with lock:
                    counts["watch_messages"] += 1
                if stop.is_set():
                    stream.cancel()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                with lock:
                    counts["errors"] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    threads += [threading.Thread(target=watcher, args=(i,)) for i in range(watchers)]
    for t in threads:
        t.start()
    started.wait()
    t0 = time.monotonic()
    ready.set()
    stop.wait()
    for t in threads:
        t.join(timeout=10)
    elapsed = time.monotonic() - t0
    results.put({**counts, "seconds": elapsed})
    for ch in channels:
        ch.close()


# -- measurement ---------------------------------------------------------------------------------
def run_phase(step: Callable[[], None], seconds: float) -> list[float]:
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=100)
    return {"steps": len(times), "mean": statistics.fmean(times), "median": statistics.median(times),
            "p90": q[89], "p99": q[98]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--provider", default="auto", help="auto (= runtime) | synthetic | runtime | module:function")
    p.add_argument("--model", default="tiny", choices=("tiny", "1b"), help="runtime only: random NOSA-Llama shape")
    p.add_argument("--device", default="auto", help="runtime only: auto (CUDA if available) | cuda[:N] | cpu")
    p.add_argument("--prompt-tokens", type=int, default=8192,
                   help="runtime only: prompt length (> 64 blocks of 64 = 4096 tokens: sparse selection)")
    p.add_argument("--restart-every", type=int, default=16384,
                   help="runtime only: decode steps before the request is ended and prefilled again")
    p.add_argument("--phase-seconds", type=float, default=8.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--rate", type=float, default=10.0, help="calls/s per client")
    p.add_argument("--watchers", type=int, default=8)
    p.add_argument("--watch-hz", type=float, default=10.0)
    p.add_argument("--step-work-ms", type=float, default=5.0, help="synthetic provider only")
    p.add_argument("--token", default="bench-token", help="exercise the auth path too ('' = off)")
    p.add_argument("--out", default="", help="also write the table to this file")
    args = p.parse_args(argv)

    target = make_target(args)
    snapshots = [0]
    original_snapshot = target.provider.snapshot

    def counted_snapshot():  # count provider snapshot builds under load
        snapshots[0] += 1
        return original_snapshot()

    target.provider.snapshot = counted_snapshot  # type: ignore[method-assign]
    server = start_control_server(target.provider, port=0, token=args.token or None)
    ctx = mp.get_context("spawn")
    idle: list[float] = []
    loaded: list[float] = []
    load_stats: list[dict] = []
    try:
        run_phase(target.step, min(2.0, args.phase_seconds))  # warm-up
        for phase in ("idle", "loaded", "idle", "loaded"):
            if phase == "idle":
                idle += run_phase(target.step, args.phase_seconds)
                continue
            ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
            proc = ctx.Process(target=_load_main, args=(server.address, args.clients, args.rate,
                               args.watchers, args.watch_hz, args.token or None, ready, stop, results))
            proc.start()
            if not ready.wait(60):
                raise RuntimeError("load process did not start within 60 s")
            before = snapshots[0]
            loaded += run_phase(target.step, args.phase_seconds)
            built = snapshots[0] - before
            stop.set()
            stats = results.get(timeout=60)
            proc.join(timeout=30)
            load_stats.append({**stats, "snapshots": built})
        final = original_snapshot()
    finally:
        server.stop(grace_s=1.0)
        target.close()

    a, b = summarize(idle), summarize(loaded)
    secs = sum(s["seconds"] for s in load_stats)
    lines = [
        f"# gRPC control load vs step time — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"target: {target.label}",
        f"host: {platform.node()}, python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"{os.cpu_count()} CPUs",
        f"load: {args.clients} clients x {args.rate:g} calls/s + {args.watchers} watchers x "
        f"{args.watch_hz:g} Hz (separate process), token {'on' if args.token else 'off'}; "
        f"2 x {args.phase_seconds:g} s per condition",
        f"achieved: {sum(s['calls'] for s in load_stats) / secs:.0f} calls/s, "
        f"{sum(s['watch_messages'] for s in load_stats) / secs:.0f} stream messages/s, "
        f"{sum(s['errors'] for s in load_stats)} errors, "
        f"{sum(s['snapshots'] for s in load_stats) / (2 * args.phase_seconds):.1f} provider snapshots/s",
        f"provider counters at the end: {final.steps} steps, {final.running_requests} running, hit rate "
        f"{final.totals.hit_rate:.3f} ({final.totals.hits + final.totals.misses} lookups), "
        f"{final.totals.bytes_h2d / 2**20:.1f} MiB H2D",
        "",
        "| condition | steps | mean ms | median ms | p90 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in (("no clients", a), ("under load", b)):
        lines.append(f"| {name} | {s['steps']} | {s['mean'] * 1e3:.3f} | {s['median'] * 1e3:.3f} | "
                     f"{s['p90'] * 1e3:.3f} | {s['p99'] * 1e3:.3f} |")
    slow = {k: (b[k] / a[k] - 1) * 100 for k in ("mean", "median", "p90", "p99")}
    lines.append(f"| slowdown | | {slow['mean']:+.1f} % | {slow['median']:+.1f} % | "
                 f"{slow['p90']:+.1f} % | {slow['p99']:+.1f} % |")
    lines += ["", f"mean step-time slowdown {slow['mean']:+.1f} % (= throughput loss; target <= 5 %): "
              f"{'OK' if slow['mean'] <= 5 else 'OVER TARGET'}; median {slow['median']:+.1f} %"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
