"""Summarize torch-profiler traces (Chrome trace JSON, gzipped or not) into a few small tables.

Why: SGLang's `/start_profile` writes traces of tens to hundreds of MiB; the device tool brings back
small files better, and the question asked of a trace is usually the same: is the GPU busy, which
kernels take the time, how much of the wall is the host launching work (GPU idle between kernels).

    python3 scripts/trace_summary.py TRACE_OR_DIR [...] [--top 25] [--out summary.md]

Per trace: wall span of the GPU activity, GPU busy time (the union of kernel and memcpy intervals on all
streams) and its share, the idle gaps longer than 50 us (count, total), kernel launches, then the top
kernels by total GPU time and the top CPU ops by total time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
GAP_US = 50.0


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]


def union_us(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """(covered time, gaps between covered stretches) of [start, end) intervals."""
    covered, gaps, end = 0.0, [], None
    for lo, hi in sorted(intervals):
        if end is None or lo > end:
            if end is not None:
                gaps.append(lo - end)
            covered += hi - lo
            end = hi
        elif hi > end:
            covered += hi - end
            end = hi
    return covered, gaps


def summarize(events: list[dict], top: int = 25) -> dict:
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    if not gpu:
        return {"gpu_events": 0}
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in gpu]
    wall = max(hi for _, hi in spans) - min(lo for lo, _ in spans)
    busy, gaps = union_us(spans)
    long_gaps = [g for g in gaps if g > GAP_US]
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in gpu:
        k = kernels[e.get("name", "?")]
        k[0] += 1
        k[1] += float(e["dur"])
    cpu: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") == "cpu_op":
            c = cpu[e.get("name", "?")]
            c[0] += 1
            c[1] += float(e["dur"])
    # NOTE: Triton launches through the driver API (cuLaunchKernel: category cuda_driver); graphs: cudaGraphLaunch
    launches = sum(1 for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "Launch" in e.get("name", ""))
    by_time = lambda d: sorted(d.items(), key=lambda kv: -kv[1][1])[:top]  # noqa: E731
    return {"gpu_events": len(gpu), "wall_us": wall, "busy_us": busy, "gaps": len(long_gaps),
            "gap_us": sum(long_gaps), "launches": launches, "kernels": by_time(kernels), "cpu_ops": by_time(cpu)}


def render(name: str, s: dict) -> str:
    if not s["gpu_events"]:
        return f"## {name}\n\nno GPU activity in this trace\n"
    lines = [f"## {name}", "",
             f"GPU span {s['wall_us'] / 1e3:.2f} ms, busy {s['busy_us'] / 1e3:.2f} ms "
             f"({100 * s['busy_us'] / max(s['wall_us'], 1e-9):.0f} %), {s['gaps']} idle gaps > {GAP_US:.0f} us "
             f"totalling {s['gap_us'] / 1e3:.2f} ms, {s['gpu_events']} GPU events, {s['launches']} launches", "",
             "| GPU kernel / copy | count | total ms | mean us |", "|---|---|---|---|"]
    lines += [f"| {n[:90]} | {c} | {t / 1e3:.3f} | {t / c:.1f} |" for n, (c, t) in s["kernels"]]
    lines += ["", "| CPU op | count | total ms |", "|---|---|---|"]
    lines += [f"| {n[:90]} | {c} | {t / 1e3:.3f} |" for n, (c, t) in s["cpu_ops"]]
    return "\n".join(lines) + "\n"


def trace_files(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(x for x in p.rglob("*") if x.name.endswith((".json", ".json.gz")))
        elif p.exists():
            out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="trace files, or folders searched for *.json / *.json.gz")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    files = trace_files(args.paths)
    if not files:
        print(f"no traces under {args.paths}", file=sys.stderr)
        return 1
    text = "\n".join(render(str(f), summarize(load_events(f), args.top)) for f in files)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
