"""Transfer kernels and the eviction head on one GPU, against ceilings measured in the same run.

    python benchmarks/kernels_transfer.py --out benchmarks/results/kernels_transfer.md
    python benchmarks/kernels_transfer.py --only d --out eviction.md    # the eviction head alone

Tables: (a) pinned H2D / D2H copy ceilings (1 GiB torch copies) and device-to-device bandwidth;
(b) gather (and write-back) GB/s of random 8 KiB / 16 KiB runs, zero_copy vs each copy-engine backend,
as % of the H2D (D2H) ceiling, with the host time each call costs; (c) how much a bf16 8192^3 GEMM on
another stream slows down while transfers run, and how fast the transfers go meanwhile; (d) eviction
head time vs its byte roofline (N = 1..32768 tokens) and torch, (d'') other dtypes and the fp32 paths,
(d') a tile sweep of the bf16 tensor-core path; (e) the zero-copy grid bound (block_copy.MAX_PROGRAMS):
gather speed alone and the GEMM slowdown beside it, per number of programs.
Timing: CUDA events (or triton.testing.do_bench, median), warm-up first, id sets rotated; the host store
(--host-gib of pinned memory, random data) is far larger than L2.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources

from report import table, write_markdown
from nosa_sglang.kernels.block_copy import MAX_PROGRAMS, gather_runs, launch_zero_copy, scatter_runs
from nosa_sglang.kernels.copy_engine import batch_memcpy_available, coalesce_runs
from nosa_sglang.kernels.eviction_head import (
    EvictionLaunchConfig, eviction_bias, eviction_launch_config, launch_eviction_bias,
)
from nosa_sglang.reference import eviction_bias as reference_eviction_bias
from nosa_sglang.kernels.pinned import alloc_pinned, pinned_mode

GiB = 1 << 30
ROTATE = 4  # id sets / inputs rotated between timed calls


def time_calls(fn: Callable[[int], object], stream: torch.cuda.Stream, reps: int, warmup: int = 2):
    """(median device ms, median host ms) of fn(i) on `stream`; the device time includes any gap
    the host leaves while it is still issuing (a host-bound path shows up as slow, as it would)."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    dev, host = [], []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        t0 = time.perf_counter()
        fn(i)
        host.append((time.perf_counter() - t0) * 1e3)
        end.record(stream)
        end.synchronize()
        dev.append(start.elapsed_time(end))
    return statistics.median(dev), statistics.median(host)


def ceilings(host_bytes: torch.Tensor, stream: torch.cuda.Stream, md: list[str]) -> dict[str, float]:
    src = host_bytes[:GiB]
    dev = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    with torch.cuda.stream(stream):
        h2d, _ = time_calls(lambda i: dev.copy_(src, non_blocking=True), stream, 5)
        d2h, _ = time_calls(lambda i: src.copy_(dev, non_blocking=True), stream, 5)
    a = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    with torch.cuda.stream(stream):
        d2d, _ = time_calls(lambda i: b.copy_(a), stream, 5)
    del dev, a, b
    c = {"h2d": GiB / h2d / 1e6, "d2h": GiB / d2h / 1e6, "d2d": 2 * 2 * GiB / d2d / 1e6}
    table("(a) copy ceilings (GB/s)", ["pinned H2D 1 GiB", "pinned D2H 1 GiB", "device copy 2 GiB (read+write)"],
          [[c["h2d"], c["d2h"], c["d2d"]]], md)
    return c


def run_methods() -> list[tuple[str, str]]:
    methods = [("zero_copy", "-")]
    methods += [("copy_engine", "batch")] if batch_memcpy_available() else []
    return methods + [("copy_engine", "cupy"), ("copy_engine", "torch")]


def gather_table(host_k8: torch.Tensor, host_v8: torch.Tensor, ceil: dict[str, float], counts: list[int],
                 stream: torch.cuda.Stream, md: list[str]) -> dict[tuple, float]:
    rows, per_call = [], {}
    for run_kib in (8, 16):
        run_elems = run_kib * 1024 // 2
        hk, hv = host_k8.view(torch.bfloat16).view(-1, run_elems), host_v8.view(torch.bfloat16).view(-1, run_elems)
        n_host = hk.shape[0]
        for n in counts:
            gk = torch.empty(n, run_elems, dtype=torch.bfloat16, device="cuda")
            gv = torch.empty_like(gk)
            sets = [(torch.randperm(n_host, device="cuda")[:n], torch.randperm(n, device="cuda")) for _ in range(ROTATE)]
            sets_cpu = [(s.cpu(), d.cpu()) for s, d in sets]
            spans = len(coalesce_runs(sets_cpu[0][0].numpy(), sets_cpu[0][1].numpy()).length)
            nbytes = 2 * n * run_kib * 1024
            for direction in ("H2D", "D2H"):
                if direction == "D2H" and n != counts[len(counts) // 2]:
                    continue
                for mode, backend in run_methods():
                    ids = sets if mode == "zero_copy" else sets_cpu
                    cb = "auto" if backend == "-" else backend
                    if direction == "H2D":
                        fn = lambda i: gather_runs(hk, hv, ids[i % ROTATE][0], gk, gv, ids[i % ROTATE][1], mode,  # noqa: E731
                                                   stream, validate_ids=False, copy_backend=cb)
                    else:
                        fn = lambda i: scatter_runs(gk, gv, ids[i % ROTATE][1], hk, hv, ids[i % ROTATE][0], mode,  # noqa: E731
                                                    stream, validate_ids=False, copy_backend=cb)
                    reps = 3 if (backend == "torch" and n >= 32768) else 5
                    dev_ms, host_ms = time_calls(fn, stream, reps)
                    if direction == "H2D":  # correctness spot check of the last call
                        s, d = ids[(reps - 1) % ROTATE]
                        pick = torch.arange(0, n, max(1, n // 64))
                        ok = torch.equal(gk[d.cuda()[pick.cuda()]].cpu().view(torch.int16), hk[s.cpu()[pick]].view(torch.int16))
                    else:
                        ok = "-"
                    gbs = nbytes / dev_ms / 1e6
                    ceiling = ceil["h2d"] if direction == "H2D" else ceil["d2h"]
                    rows.append([direction, f"{run_kib} KiB", n, spans, mode, backend, gbs, 100 * gbs / ceiling,
                                 dev_ms, host_ms, ok])
                    per_call[(direction, run_kib, n, mode, backend)] = dev_ms
                    per_call[("host", direction, run_kib, n, mode, backend)] = host_ms
            del gk, gv
    table("(b) random runs, K+V per run (GB/s; % of the pinned ceiling of that direction)",
          ["dir", "run", "runs", "spans", "mode", "backend", "GB/s", "% ceiling", "device ms", "host ms", "ok"],
          rows, md)
    return per_call


class Contention:
    """A batch of bf16 8192^3 GEMMs on one stream, with transfers issued on another meanwhile."""

    def __init__(self, stream: torch.cuda.Stream, n_gemm: int = 30) -> None:
        self.stream, self.n_gemm = stream, n_gemm
        self.a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        self.b, self.c = torch.randn_like(self.a), torch.empty_like(self.a)
        self.gemm_stream = torch.cuda.Stream()
        with torch.cuda.stream(self.gemm_stream):
            self.alone, _ = time_calls(lambda i: self._gemms(), self.gemm_stream, 3, warmup=1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(100_000_000)
        end.record()
        end.synchronize()
        self.cycles_per_ms = 100_000_000 / start.elapsed_time(end)

    def _gemms(self) -> None:
        for _ in range(self.n_gemm):
            torch.mm(self.a, self.b, out=self.c)

    def run(self, transfer: Callable[[int], object], x_alone_ms: float, x_host_ms: float, bytes_per_call: int):
        """(GEMM ms, GEMM slowdown x, transfer GB/s meanwhile, transfers covered the GEMMs, host issue ms):
        medians of 3, both streams held by a gate until the host has issued everything."""
        calls = max(2, math.ceil(1.3 * self.alone / x_alone_ms))
        results = []
        for _ in range(3):
            torch.cuda.synchronize()
            gate_stream = torch.cuda.Stream()
            gate = torch.cuda.Event(enable_timing=True)
            g_end, x_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(gate_stream):  # hold both streams while the host issues everything
                torch.cuda._sleep(int(self.cycles_per_ms * (5 + 2 * calls * x_host_ms)))
                gate.record(gate_stream)
            self.stream.wait_event(gate)
            self.gemm_stream.wait_event(gate)
            t0 = time.perf_counter()
            with torch.cuda.stream(self.gemm_stream):  # GEMMs first: a full copy queue can't delay them
                self._gemms()
            g_end.record(self.gemm_stream)
            with torch.cuda.stream(self.stream):
                for i in range(calls):
                    transfer(i)
            x_end.record(self.stream)
            issue_ms = (time.perf_counter() - t0) * 1e3
            torch.cuda.synchronize()
            results.append((gate.elapsed_time(g_end), gate.elapsed_time(x_end), issue_ms))
        g_ms, x_ms, issue_ms = (statistics.median(r[i] for r in results) for i in range(3))
        return g_ms, g_ms / self.alone, calls * bytes_per_call / x_ms / 1e6, x_ms >= g_ms, f"{issue_ms:.1f}"


class ContentionGathers:
    """The gathers beside the GEMMs (tables c and e): n random 16 KiB runs of K and of V per call."""

    def __init__(self, host_k8: torch.Tensor, host_v8: torch.Tensor, n: int = 4096, run_elems: int = 8192) -> None:
        self.n = n
        self.hk = host_k8.view(torch.bfloat16).view(-1, run_elems)
        self.hv = host_v8.view(torch.bfloat16).view(-1, run_elems)
        self.gk = torch.empty(n, run_elems, dtype=torch.bfloat16, device="cuda")
        self.gv = torch.empty_like(self.gk)
        self.sets = [(torch.randperm(self.hk.shape[0], device="cuda")[:n], torch.randperm(n, device="cuda"))
                     for _ in range(ROTATE)]
        self.bytes_per_call = 2 * n * run_elems * 2


def gemm_contention(x: ContentionGathers, bench: Contention, per_call: dict, stream: torch.cuda.Stream,
                    md: list[str]) -> None:
    n, hk, hv, gk, gv, sets = x.n, x.hk, x.hv, x.gk, x.gv, x.sets
    sets_cpu = [(s.cpu(), d.cpu()) for s, d in sets]
    rows = [["none", "-", bench.alone, 1.0, "-", "-", "-"]]
    methods = [("zero_copy", "-"), ("copy_engine", "batch" if batch_memcpy_available() else "cupy")]
    for mode, backend in methods:
        ids = sets if mode == "zero_copy" else sets_cpu
        cb = "auto" if backend == "-" else backend
        fn = lambda i: gather_runs(hk, hv, ids[i % ROTATE][0], gk, gv, ids[i % ROTATE][1], mode,  # noqa: E731
                                   stream, validate_ids=False, copy_backend=cb)
        rows.append([mode, backend, *bench.run(fn, per_call[("H2D", 16, n, mode, backend)],
                                               per_call[("host", "H2D", 16, n, mode, backend)], x.bytes_per_call)])
    table(f"(c) {bench.n_gemm} bf16 8192^3 GEMMs on one stream, 16 KiB-run gathers of {n} runs on another "
          f"(zero-copy grid: at most {MAX_PROGRAMS} programs)",
          ["transfers", "backend", "GEMM ms", "GEMM slowdown x", "transfer GB/s meanwhile",
           "transfers covered the GEMMs", "host issue ms"], rows, md)


def program_sweep(x: ContentionGathers, bench: Contention, ceil: dict[str, float], stream: torch.cuda.Stream,
                  md: list[str]) -> None:
    """The zero-copy grid bound (MAX_PROGRAMS): gather speed alone and the slowdown of concurrent GEMMs."""
    n, hk, hv, gk, gv, sets = x.n, x.hk, x.hv, x.gk, x.gv, x.sets
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for programs in (8, 16, 32, 64, 128, sms, 2 * sms, 0):
        fn = lambda i: launch_zero_copy(hk, hv, gk, gv, *sets[i % ROTATE], programs=programs)  # noqa: E731
        with torch.cuda.stream(stream):
            x_ms, x_host = time_calls(fn, stream, 5)
        gbs = x.bytes_per_call / x_ms / 1e6
        rows.append([programs or "one per item", gbs, 100 * gbs / ceil["h2d"],
                     *bench.run(fn, x_ms, x_host, x.bytes_per_call)[:4]])
        print(rows[-1], flush=True)
    table(f"(e) zero-copy grid bound: {n} random 16 KiB runs (K+V), alone and beside {bench.n_gemm} bf16 8192^3 "
          f"GEMMs (alone {bench.alone:.1f} ms); runtime default MAX_PROGRAMS = {MAX_PROGRAMS}",
          ["programs", "gather GB/s alone", "% H2D ceiling", "GEMM ms", "GEMM slowdown x", "gather GB/s meanwhile",
           "gathers covered the GEMMs"], rows, md)


def device_copy_gbs() -> float:
    """Device-to-device copy GB/s (read + write) of 2 GiB, as in table (a): the eviction roofline's rate."""
    a = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=5, rep=50, return_mode="median")
    del a, b
    return 2 * 2 * GiB / ms / 1e6


def eviction_inputs(n: int, hkv: int, d: int, v_dtype: torch.dtype, w_dtype: torch.dtype):
    """ROTATE value batches, A, W, bias, out; the roofline's bytes (v once, W once, c written)."""
    w = (torch.randn(hkv, hkv * d, device="cuda") / (hkv * d) ** 0.5).to(w_dtype)
    A, bias = torch.rand(hkv, device="cuda") + 0.5, torch.randn(hkv, device="cuda")
    vs = [torch.randn(n, hkv, d, device="cuda").to(v_dtype) for _ in range(ROTATE)]
    out = torch.empty(n, hkv, device="cuda")
    nbytes = n * hkv * d * vs[0].element_size() + w.numel() * w.element_size() + n * hkv * 4
    return vs, A, w, bias, out, nbytes


def bench_config(vs, A, w, bias, out, config: EvictionLaunchConfig, rep: int = 100) -> float | None:
    """Median us of one launch with `config` (L2 flushed between calls by do_bench); None if it can't run."""
    it = iter(range(10**9))
    try:
        ms = triton.testing.do_bench(lambda: launch_eviction_bias(vs[next(it) % ROTATE], A, w, bias, out, config),
                                     warmup=max(10, rep // 4), rep=rep, return_mode="median")
    except OutOfResources:
        return None
    return ms * 1e3


def eviction_row(n: int, hkv: int, d: int, v_dtype: torch.dtype, w_dtype: torch.dtype, d2d_gbs: float,
                 config: EvictionLaunchConfig | None = None) -> list[object]:
    """[kernel us, roofline us, % roofline, torch us, torch/kernel x, host us/call, rel err, config]."""
    vs, A, w, bias, out, nbytes = eviction_inputs(n, hkv, d, v_dtype, w_dtype)
    if config is None:  # the wrapper's own pick: host time through eviction_bias (checks included)
        config = eviction_launch_config(n, hkv, d, v_dtype, w_dtype)
        call = lambda i: eviction_bias(vs[i % ROTATE], A, w, bias, out=out)  # noqa: E731
    else:
        call = lambda i: launch_eviction_bias(vs[i % ROTATE], A, w, bias, out, config)  # noqa: E731
    us = bench_config(vs, A, w, bias, out, config)
    it = iter(range(10**9))
    torch_us = 1e3 * triton.testing.do_bench(
        lambda: A * F.softplus(F.linear(vs[next(it) % ROTATE].flatten(1).to(w.dtype), w, None).float() + bias),
        warmup=25, rep=100, return_mode="median")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(200):
        call(i)
    host_us = (time.perf_counter() - t0) / 200 * 1e6
    torch.cuda.synchronize()
    launch_eviction_bias(vs[0], A, w, bias, out.fill_(float("nan")), config)
    ref = reference_eviction_bias(vs[0].double(), A.double(), w.double(), bias.double())
    err = ((out.double() - ref).norm() / ref.norm()).item()
    roof_us = nbytes / (d2d_gbs * 1e3)
    return [us, roof_us, 100 * roof_us / us, torch_us, torch_us / us, host_us, err, tuple(config)]


def eviction_sweep_configs(hkv: int, d: int, n: int) -> list[EvictionLaunchConfig]:
    """bf16 dot tiles: BLOCK_N 16-128 x BLOCK_K 64-256 x (warps, stages); shared memory <= 200 KiB."""
    configs = []
    for bn in ((16,) if n <= 2048 else (16, 32, 64, 128)):
        for bk in (64, 128, 256):
            if bk > hkv * d:
                continue
            for nw, ns in ((4, 2), (4, 3), (4, 4), (8, 3)):
                if ns * (bn * bk + bk * max(16, hkv)) * 2 <= 200 * 1024:
                    configs.append(EvictionLaunchConfig(True, bn, bk, nw, ns))
    return configs


def eviction_table(d2d_gbs: float, md: list[str]) -> None:
    """(d) the default configs, bf16 v and W, against torch; (d'') other dtypes and the fp32 paths;
    (d') a tile sweep (the default marked *) to re-fit eviction_launch_config from."""
    t0 = time.perf_counter()
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cols = ["kernel us", "roofline us", "% roofline", "torch us", "torch / kernel", "host us/call", "rel err",
            "config (dot, BLOCK_N, BLOCK_K, warps, stages)"]
    rows = [[hkv, d, n] + eviction_row(n, hkv, d, bf16, bf16, d2d_gbs)
            for hkv, d in ((2, 128), (8, 128)) for n in (1, 8, 64, 512, 4096, 32768)]
    table(f"(d) eviction head, bf16 v and delta_weight (us; roofline = bytes / {d2d_gbs:.0f} GB/s device copy)",
          ["Hkv", "d", "tokens"] + cols, rows, md)
    rows = []
    for v_dtype, w_dtype, config in ((fp16, fp16, None), (bf16, fp32, None), (fp16, fp32, None), (fp32, fp32, None),
                                     (fp32, fp32, EvictionLaunchConfig(False, 4, 256, 4, 1)),
                                     (fp32, fp32, EvictionLaunchConfig(False, 16, 64, 4, 1))):
        for n in (1, 4096, 32768):
            row = eviction_row(n, 8, 128, v_dtype, w_dtype, d2d_gbs, config)
            rows.append([str(v_dtype)[6:], str(w_dtype)[6:], n] + row)
    table("(d'') eviction head, other dtypes, Hkv 8, d 128 (dot False = the 3-D fp32 multiply-add path)",
          ["v", "delta_weight", "tokens"] + cols, rows, md)
    print(f"(d), (d'') took {time.perf_counter() - t0:.0f} s", flush=True)
    sweep = []
    for hkv, d, n in ((8, 128, 64), (8, 128, 4096), (8, 128, 32768), (2, 128, 32768)):
        vs, A, w, bias, out, nbytes = eviction_inputs(n, hkv, d, bf16, bf16)
        default = eviction_launch_config(n, hkv, d, bf16, bf16)
        for config in eviction_sweep_configs(hkv, d, n):
            us = bench_config(vs, A, w, bias, out, config, rep=50)
            pct = 100 * nbytes / (d2d_gbs * 1e3) / us if us else "-"
            sweep.append([hkv, n, "*" if config == default else "", config.block_n, config.block_k, config.num_warps,
                          config.num_stages, us if us else "out of resources", pct])
    table("(d') eviction head tile sweep, bf16, d 128 (* = eviction_launch_config's pick)",
          ["Hkv", "tokens", "default", "BLOCK_N", "BLOCK_K", "warps", "stages", "us", "% roofline"], sweep, md)
    print(f"(d) section took {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the markdown tables here")
    parser.add_argument("--host-gib", type=float, default=8.0, help="pinned host store, K+V together")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: a,b,c,d,e (b needs a, c needs a and b, e needs a)")
    parser.add_argument("--only", default="", help="comma list of sections to run instead, e.g. d (the eviction "
                        "head alone, ~3-5 min: no pinned host store, its roofline from a device copy timed here)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    md = [f"## kernels_transfer on {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}, pinned mode {pinned_mode()}, cudaMemcpyBatchAsync "
          f"{'yes' if batch_memcpy_available() else 'no'}", ""]
    print(md[0], flush=True)
    sections = set(args.only.split(",")) if args.only else {"a", "b", "c", "d", "e"} - set(args.skip.split(","))
    ceil = per_call = None
    if sections & {"a", "b", "c", "e"}:
        half = int(args.host_gib * GiB / 2) // GiB * GiB
        t0 = time.perf_counter()
        host_k8, host_v8 = alloc_pinned((half,), torch.uint8), alloc_pinned((half,), torch.uint8)
        noise = torch.randint(0, 255, (GiB,), dtype=torch.uint8, device="cuda")
        for h in (host_k8, host_v8):  # random bytes (bf16 NaN patterns included; copies don't care)
            for off in range(0, half, GiB):
                h[off : off + GiB].copy_(noise)
                noise = noise.roll(4096)
        del noise
        torch.cuda.synchronize()
        print(f"pinned {2 * half / GiB:.0f} GiB in {time.perf_counter() - t0:.1f} s", flush=True)
        stream = torch.cuda.Stream()
        ptx = launch_zero_copy(host_k8.view(-1, 4096)[:1], host_v8.view(-1, 4096)[:1],
                               torch.empty(1, 4096, dtype=torch.uint8, device="cuda"),
                               torch.empty(1, 4096, dtype=torch.uint8, device="cuda"),
                               torch.zeros(1, dtype=torch.int64, device="cuda"),
                               torch.zeros(1, dtype=torch.int64, device="cuda")).asm["ptx"]
        md += [f"zero-copy kernel PTX has 16-byte loads: {bool(re.search(r'ld[.]global([.][a-z0-9]+)*[.]v4', ptx))}",
               ""]
        print(md[-2], flush=True)
        ceil = ceilings(host_k8, stream, md) if "a" in sections else None
        if "b" in sections:
            per_call = gather_table(host_k8, host_v8, ceil, [256, 4096, 32768], stream, md)
        run_c, run_e = "c" in sections and per_call is not None, "e" in sections and ceil is not None
        if run_c or run_e:  # one set of GEMMs and gathers, one GEMM-alone baseline for both tables
            gathers, bench = ContentionGathers(host_k8, host_v8), Contention(stream)
            if run_c:
                gemm_contention(gathers, bench, per_call, stream, md)
            if run_e:
                program_sweep(gathers, bench, ceil, stream, md)
    if "d" in sections:
        eviction_table(ceil["d2d"] if ceil else device_copy_gbs(), md)
    if args.out:
        write_markdown(args.out, md)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
