"""Does serving the control API slow the decode loop? Step time with and without gRPC load, one run.

The stepping loop runs on this process's main thread. The control server runs either on its own
threads in this process (`thread`, `start_control_server`) or in a child process fed by one bridge
thread here (`process`, `start_control_process`); `--servers thread,process` measures both in one
run. The load comes from a separate process (as remote clients would): 32 clients at 10 calls/s each
(GetStats / ListRequests / GetConfig in turn) plus 8 WatchStats streams at 10 Hz. Phases alternate
idle, loaded (each server in turn), idle, loaded (every server is up in all of them) so drift hits
all conditions alike. Target: loaded mean step time (the throughput) <= 5 % slower.

    python benchmarks/grpc_load.py                      # the runtime decoding (auto = runtime)
    python benchmarks/grpc_load.py --model 1b --prompt-tokens 32768   # on a GPU: the real figure
    python benchmarks/grpc_load.py --provider batched --model 1b --prompt-tokens 16384 --batch 64  # graphed
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
from nosa_sglang.control.process_server import start_control_process  # noqa: E402
from nosa_sglang.control.server import start_control_server  # noqa: E402

SERVERS = {"thread": start_control_server, "process": start_control_process}


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


def batched_target(args: argparse.Namespace) -> BenchTarget:
    """The attention stack of benchmarks/decode_throughput.py: `--batch` synthetic requests of
    `--prompt-tokens` decoding through NosaRuntime with CUDA graphs (on a GPU), q/k/v/c random. A
    GPU-bound step at a serving batch, where the eager batch-1 model is a Python-bound one."""
    import torch
    from decode_throughput import MODELS, decode_step, synthetic_runtime
    from decode_workload import Workload

    from nosa_sglang.config import NosaConfig
    from nosa_sglang.control.runtime_provider import RuntimeProvider
    from nosa_sglang.runtime import MicroBatches, ModelShape, OffloadKnobs

    dev = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    dims = MODELS["1b"] if args.model == "1b" else (2, 4, 2, 64)  # tiny: the CPU smoke test's
    shape = ModelShape(*dims, torch.bfloat16 if cuda else torch.float32)
    rt, ids = synthetic_runtime(shape, NosaConfig(), OffloadKnobs(gpu_slots=80, victim_policy="lru"), args.prompt_tokens,
                                args.batch, args.prompt_tokens + args.restart_every, dev, cuda_graphs=cuda)
    work = Workload(shape, args.batch, "drift", 0.9, dev)
    whole = MicroBatches(rt, ids)
    done = [0]

    def step() -> None:
        if done[0] == args.restart_every - 1:  # keep below max_seq_len: the same requests, admitted again
            for i, rid in enumerate(ids):
                rt.end_request(rid)
                rt.begin_request_synthetic(rid, args.prompt_tokens, seed=i)
            done[0] = 0
        decode_step(rt, whole, work)
        done[0] += 1
        if cuda:
            torch.cuda.synchronize()

    label = (f"NosaRuntime attention stack ({args.model}: {shape.num_layers} layers, Hq {shape.num_q_heads}, "
             f"Hkv {shape.num_kv_heads}, d {shape.head_dim}) on {dev}, batch {args.batch}, "
             f"{'CUDA graphs' if cuda else 'eager'}; {args.prompt_tokens} tokens per request, 80 slots, drift queries")
    return BenchTarget(RuntimeProvider(rt), step, lambda: [rt.end_request(r) for r in ids], label)


def make_target(args: argparse.Namespace) -> BenchTarget:
    if args.provider == "synthetic":
        return synthetic_target(args)
    if args.provider == "batched":
        return batched_target(args)
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
    p.add_argument("--provider", default="auto",
                   help="auto (= runtime) | synthetic | runtime | batched | module:function")
    p.add_argument("--batch", type=int, default=64, help="batched only: requests decoding together")
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
    p.add_argument("--servers", default="thread,process",
                   help="comma list of thread (in this process) | process (a child process)")
    p.add_argument("--out", default="", help="also write the table to this file")
    args = p.parse_args(argv)

    target = make_target(args)
    snapshots = [0]
    original_snapshot = target.provider.snapshot

    def counted_snapshot():  # count provider snapshot builds under load
        snapshots[0] += 1
        return original_snapshot()

    target.provider.snapshot = counted_snapshot  # type: ignore[method-assign]
    modes = args.servers.split(",")
    if not modes or any(m not in SERVERS for m in modes):
        raise SystemExit(f"--servers={args.servers}: a comma list of {sorted(SERVERS)}")
    servers = {}
    ctx = mp.get_context("spawn")
    idle: list[float] = []
    loaded: dict[str, list[float]] = {m: [] for m in modes}
    load_stats: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        for m in modes:
            servers[m] = SERVERS[m](target.provider, port=0, token=args.token or None)
        run_phase(target.step, min(2.0, args.phase_seconds))  # warm-up
        for phase in ["idle", *modes] * 2:
            if phase == "idle":
                idle += run_phase(target.step, args.phase_seconds)
                continue
            ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
            proc = ctx.Process(target=_load_main, args=(servers[phase].address, args.clients, args.rate,
                               args.watchers, args.watch_hz, args.token or None, ready, stop, results))
            proc.start()
            if not ready.wait(60):
                raise RuntimeError("load process did not start within 60 s")
            before = snapshots[0]
            loaded[phase] += run_phase(target.step, args.phase_seconds)
            built = snapshots[0] - before
            stop.set()
            stats = results.get(timeout=60)
            proc.join(timeout=30)
            load_stats[phase].append({**stats, "snapshots": built})
        final = original_snapshot()
    finally:
        for server in servers.values():
            server.stop(grace_s=1.0)
        target.close()

    a = summarize(idle)
    lines = [
        f"# gRPC control load vs step time — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"target: {target.label}",
        f"host: {platform.node()}, python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"{os.cpu_count()} CPUs",
        f"load: {args.clients} clients x {args.rate:g} calls/s + {args.watchers} watchers x "
        f"{args.watch_hz:g} Hz (separate process), token {'on' if args.token else 'off'}; "
        f"2 x {args.phase_seconds:g} s per condition; servers: {', '.join(modes)}",
    ]
    for m in modes:
        st, secs = load_stats[m], sum(x["seconds"] for x in load_stats[m])
        lines.append(f"achieved ({m}): {sum(x['calls'] for x in st) / secs:.0f} calls/s, "
                     f"{sum(x['watch_messages'] for x in st) / secs:.0f} stream messages/s, "
                     f"{sum(x['errors'] for x in st)} errors, "
                     f"{sum(x['snapshots'] for x in st) / (2 * args.phase_seconds):.1f} provider snapshots/s")
    lines += [
        f"provider counters at the end: {final.steps} steps, {final.running_requests} running, hit rate "
        f"{final.totals.hit_rate:.3f} ({final.totals.hits + final.totals.misses} lookups), "
        f"{final.totals.bytes_h2d / 2**20:.1f} MiB H2D",
        "",
        "| condition | steps | mean ms | median ms | p90 ms | p99 ms | mean slowdown | median slowdown |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| no clients | {a['steps']} | {a['mean'] * 1e3:.3f} | {a['median'] * 1e3:.3f} | {a['p90'] * 1e3:.3f} | "
        f"{a['p99'] * 1e3:.3f} | | |",
    ]
    verdicts = []
    for m in modes:
        b = summarize(loaded[m])
        slow = {k: (b[k] / a[k] - 1) * 100 for k in ("mean", "median")}
        lines.append(f"| under load, {m} server | {b['steps']} | {b['mean'] * 1e3:.3f} | {b['median'] * 1e3:.3f} | "
                     f"{b['p90'] * 1e3:.3f} | {b['p99'] * 1e3:.3f} | {slow['mean']:+.1f} % | {slow['median']:+.1f} % |")
        verdicts.append(f"{m} server: mean step-time slowdown {slow['mean']:+.1f} % (= throughput loss; target "
                        f"<= 5 %): {'OK' if slow['mean'] <= 5 else 'OVER TARGET'}")
    lines += [""] + verdicts
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
