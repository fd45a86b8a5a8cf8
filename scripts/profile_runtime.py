"""Diagnostic (GPU): where a decode step of the runtime spends its time, (a*) / (a) against (c).

Builds the 1B-like stack of benchmarks/decode_throughput.py at one context and batch, times a few
steps, then profiles two steps with torch.profiler and prints the top GPU kernels and host ops, so
the runtime's overhead over NOSA fully on the GPU can be attributed (kernels vs Python between them).

    python scripts/profile_runtime.py --tokens 16384 --batch 64 --configs 'a*,c,a'
"""
import argparse
import cProfile
import gc
import pstats
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from decode_throughput import MODELS, decode_step, step_graph_runner, synthetic_runtime  # noqa: E402
from decode_workload import Workload, warm_up  # noqa: E402

from nosa_sglang.config import NosaConfig  # noqa: E402
from nosa_sglang.runtime import MicroBatches, ModelShape, OffloadKnobs  # noqa: E402


def build(conf: str, shape, cfg, tokens: int, B: int, graphs: bool, slots: int, inline: bool = False,
          ck_dtype: torch.dtype = torch.bfloat16):
    n = tokens + 256
    if conf == "a*":
        slots = cfg.num_blocks(n) + 1
    return synthetic_runtime(shape, cfg, OffloadKnobs(gpu_slots=slots, victim_policy="lru"), tokens, B, n, "cuda",
                             gpu_only=conf == "c", cuda_graphs=graphs, inline_gather=inline, ck_dtype=ck_dtype)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--configs", default="a*,c,a")
    p.add_argument("--slots", type=int, default=80)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--rows", type=int, default=18)
    p.add_argument("--split-append", action="store_true", help="append() + attend() instead of decode()")
    p.add_argument("--inline-gather", action="store_true", help="decode() with the gather inside its segment")
    p.add_argument("--micro-batches", type=int, default=1, help="configs a, a*: N parts on N streams")
    p.add_argument("--step-graphs", action="store_true",
                   help="each step as one CUDA graph (StepGraphs; warms up 130 steps so every kind of step replays)")
    p.add_argument("--ck-fp32", action="store_true",
                   help="K~ in fp32 (the runtime's default) instead of bf16 (decode_throughput.py's default)")
    p.add_argument("--cprofile", action="store_true", help="also print the Python functions' host time of 3 steps")
    p.add_argument("--no-tables", action="store_true", help="time the steps only (no profiler tables)")
    a = p.parse_args()
    shape = ModelShape(*MODELS["1b"], torch.bfloat16)
    cfg = NosaConfig()
    for conf in a.configs.split(","):
        profile_config(conf, a, shape, cfg)
        gc.collect()  # the runtime and its graphs form cycles: free them before the next one is built
        torch.cuda.empty_cache()
    return 0


WARMUP, TIMED, PROFILED, CPROFILED = 4, 20, 2, 3  # steps of each phase of profile_config


def profile_config(conf: str, a, shape, cfg) -> None:
    """Time and profile one configuration; everything it built dies on return."""
    rt, ids = build(conf, shape, cfg, a.tokens, a.batch, not a.no_graphs, a.slots, a.inline_gather,
                    torch.float32 if a.ck_fp32 else torch.bfloat16)
    warmup = 2 * cfg.block_size + 2 if a.step_graphs else WARMUP  # NOTE: each kind of step captured first
    work = Workload(shape, a.batch, "drift", 0.9, "cuda", steps=warmup + TIMED + PROFILED + CPROFILED)
    parts = MicroBatches(rt, ids, 1 if conf == "c" else a.micro_batches)
    runner = step_graph_runner(rt, parts, work, a.batch) if a.step_graphs else None

    def step():
        if runner is not None:
            runner()
        else:
            decode_step(rt, parts, work, a.split_append)

    idle_host_ms = warm_up(argparse.Namespace(warmup=warmup, device="cuda"), step)
    n = TIMED
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    host_s = time.perf_counter() - t0  # time to enqueue (the host side) ...
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0  # ... and until the GPU finished
    print(f"\n===== {conf}: B={a.batch} tokens={a.tokens} graphs={not a.no_graphs} split={a.split_append} "
          f"inline={a.inline_gather} step-graphs={a.step_graphs} micro-batches={len(parts.parts)} K~ {'fp32' if a.ck_fp32 else 'bf16'}: "
          f"step {1e3 * wall / n:.2f} ms (host enqueue {1e3 * host_s / n:.2f} ms, onto an idle GPU "
          f"{idle_host_ms:.2f} ms; "
          f"{len(gc.get_objects())} Python objects tracked)", flush=True)
    if a.no_tables:
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED):
            step()
        torch.cuda.synchronize()
    if a.cprofile:  # where the host time goes, by Python function (the op table misses pure Python)
        cp = cProfile.Profile()
        cp.enable()
        for _ in range(CPROFILED):
            step()
        cp.disable()
        torch.cuda.synchronize()
        pstats.Stats(cp).sort_stats("tottime").print_stats(a.rows + 10)
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    sys.exit(main())
