"""Figures from the benchmark results: the markdown tables the scripts write are the data.

    python benchmarks/plots.py                      # benchmarks/results/*.md -> benchmarks/results/plots/*.png

Why from the markdown: the GPU machine has no matplotlib and no way to fetch it, and every figure must
show exactly the numbers recorded beside card, date, commit and command. So the scripts print and
write tables (`--out`), the tables are committed, and this script draws them (matplotlib, CPU).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Table:
    """One markdown table and the headings above it (outermost first)."""

    path: tuple[str, ...]
    cols: list[str]
    rows: list[list[str]]

    def under(self, *words: str) -> bool:
        """Whether every word occurs in one of the headings above the table."""
        return all(any(w in h for h in self.path) for w in words)

    def column(self, name: str) -> int:
        return self.cols.index(name)


def read_tables(text: str) -> list[Table]:
    """Every `| a | b |` table of a markdown text, with the heading path it sits under."""
    tables: list[Table] = []
    headings: dict[int, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            headings = {k: v for k, v in headings.items() if k < level}
            headings[level] = line.lstrip("#").strip()
        elif line.startswith("|") and i + 1 < len(lines) and lines[i + 1].strip().startswith("|---"):
            cols = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append(Table(tuple(headings[k] for k in sorted(headings)), cols, rows))
            continue
        i += 1
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def number(cell: str) -> float | None:
    """A table cell as a float (None for '', '-', text such as 'OOM: ...')."""
    try:
        return float(cell.replace("**", "").split()[0])
    except (ValueError, IndexError):
        return None


def micro_batch_series(tables: list[Table]) -> dict[tuple[str, str], dict[str, float]]:
    """runtime.md, run 5: {(context, micro-batches): {"a iid": tok/s, ...}}."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for t in tables:
        if not t.under("run 5"):
            continue
        parts = "2" if "two micro-batches" in t.path else "1" if "one micro-batch" in t.path else None
        ctx = next((h.split("@")[1].split()[0] for h in t.path if "@" in h), None)
        if parts is None or ctx is None:
            continue
        cfg, q, tps = t.column("config"), t.column("queries"), t.column("tok/s")
        series = out.setdefault((ctx, parts), {})
        for r in t.rows:
            value = number(r[tps])
            if value is not None:
                series[f"{r[cfg]} {r[q]}".replace(" -", "")] = value
    return out


def context_series(tables: list[Table], view: str = "common") -> dict[str, dict[int, float]]:
    """runtime.md, the 2026-11-28 1B-like tables (80 slots): {"a drift": {context: tok/s}, ...}."""
    out: dict[str, dict[int, float]] = {}
    for t in tables:
        if "Raw tables" not in t.path or not t.under("1b @"):
            continue
        ctx = int(next(h for h in t.path if "@" in h).split("@")[1].split()[0])
        cfg, q, tps, v = t.column("config"), t.column("queries"), t.column("tok/s"), t.column("view")
        for r in t.rows:
            value = number(r[tps])
            if r[v] == view and value is not None:
                out.setdefault(f"{r[cfg]} {r[q]}".replace(" -", ""), {})[ctx] = value
    return out


MICRO_WORDS = {"one batch": 1, "two micro-batches": 2, "three micro-batches": 3, "four micro-batches": 4}


def step_graph_ratios(tables: list[Table]) -> dict[tuple[str, int, str], dict[int, float]]:
    """runtime.md, the 2026-11-29 night raw tables: {(graph mode, micro-batches, queries): {context:
    (a)/(b) tok/s}} at the batch both hold ("common" view)."""
    out: dict[tuple[str, int, str], dict[int, float]] = {}
    for t in tables:
        if not t.under("Raw tables, 2026-11-29 night", "1b @"):
            continue
        run = next(h for h in t.path if h.startswith("run "))
        mode = "step graphs" if "step graphs" in run else "segment graphs"
        parts = next(n for words, n in MICRO_WORDS.items() if words in run)
        ctx = int(next(h for h in t.path if "@" in h).split("@")[1].split()[0])
        cfg, q, tps = t.column("config"), t.column("queries"), t.column("tok/s")
        tok = {(r[cfg], r[q]): number(r[tps]) for r in t.rows}
        for queries in ("iid", "drift"):
            a, b = tok.get(("a", queries)), tok.get(("b", queries))
            if a and b:
                out.setdefault((mode, parts, queries), {})[ctx] = a / b
    return out


MAX_BATCH_CONFIGS = ("d", "dg", "a", "ac", "c")


def max_batch_series(tables: list[Table]) -> dict[tuple[str, int], dict[str, tuple[float, str]]]:
    """runtime.md, session 8 calls 2-3 (the max view, all HBM, 64 GiB host): {(model, context):
    {config: (tok/s, batch)}} for MAX_BATCH_CONFIGS."""
    out: dict[tuple[str, int], dict[str, tuple[float, str]]] = {}
    for t in tables:
        if not t.under("Raw tables, 2026-11-29 session 8") or not (t.under("call 2") or t.under("call 3")):
            continue
        model, ctx = next(h for h in t.path if "@" in h).split("@")
        cfg, tps, batch = t.column("config"), t.column("tok/s"), t.column("batch")
        for r in t.rows:
            value = number(r[tps])
            if r[cfg] in MAX_BATCH_CONFIGS and value is not None:
                out.setdefault((model.strip(), int(ctx.split()[0])), {})[r[cfg]] = (value, r[batch])
    return out


def grid_bound_rows(tables: list[Table]) -> list[tuple[str, float, float, float]]:
    """kernels_transfer.md table (e): [(programs, GB/s alone, GB/s beside GEMMs, GEMM slowdown x)]."""
    for t in tables:
        if any("grid bound" in h for h in t.path) and "programs" in t.cols:
            p, alone, meanwhile, slow = (t.column(c) for c in (
                "programs", "gather GB/s alone", "gather GB/s meanwhile", "GEMM slowdown x"))
            return [(r[p], number(r[alone]), number(r[meanwhile]), number(r[slow])) for r in t.rows]
    raise ValueError("kernels_transfer.md: no table (e) with a 'programs' column")


def grpc_rows(tables: list[Table]) -> list[tuple[str, str, float, float]]:
    """grpc_load.md: [(run, condition, mean ms, p99 ms)] of every run's condition table."""
    out = []
    for t in tables:
        if "condition" in t.cols and "mean ms" in t.cols:
            run = next((h.split(":")[0] for h in t.path if h.startswith("Run")), "?")
            c, mean, p99 = t.column("condition"), t.column("mean ms"), t.column("p99 ms")
            out += [(run, r[c], number(r[mean]), number(r[p99])) for r in t.rows]
    if not out:
        raise ValueError("grpc_load.md: no table with 'condition' and 'mean ms' columns")
    return out


def draw(results: Path, out: Path) -> list[Path]:
    """Render every figure; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    runtime = read_tables((results / "runtime.md").read_text())
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    micro = micro_batch_series(runtime)
    contexts = sorted({ctx for ctx, _ in micro}, key=int)
    if not contexts:
        raise ValueError("runtime.md: no run-5 micro-batch tables")
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4), squeeze=False)
    for ax, ctx in zip(axes[0], contexts):
        labels = list(micro[(ctx, "1")])
        for k, parts in enumerate(("1", "2")):
            xs = [i + (k - 0.5) * 0.38 for i in range(len(labels))]
            ax.bar(xs, [micro[(ctx, parts)].get(lab, 0) for lab in labels], width=0.38,
                   label=f"{parts} micro-batch{'es' if parts == '2' else ''}")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yscale("log")
        ax.set_title(f"1B-like, {int(ctx) // 1024}K tokens")
        ax.set_ylabel("decode tok/s")
        ax.legend()
    fig.suptitle("(a) NOSA offload, (b) InfLLM-V2 offload, (c) NOSA on GPU: one vs two micro-batches (H200)")
    save(fig, "runtime_micro_batches.png")

    series = context_series(runtime)
    if not series:
        raise ValueError("runtime.md: no 2026-11-28 1B-like raw tables")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(series.items()):
        xs = sorted(points)
        ax.plot([x // 1024 for x in xs], [points[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (K tokens)")
    ax.set_ylabel("decode tok/s at the batch all four hold")
    ax.set_title("1B-like attention stack, H200, 2026-11-28 (one micro-batch)")
    ax.legend(fontsize=8)
    save(fig, "runtime_vs_context.png")

    ratios = step_graph_ratios(runtime)
    if not ratios:
        raise ValueError("runtime.md: no 2026-11-29 night raw tables")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {key[:2]: f"C{i}" for i, key in enumerate(sorted({k[:2] for k in ratios}))}
    for (mode, parts, queries), points in sorted(ratios.items()):
        xs = sorted(points)
        ax.plot([x // 1024 for x in xs], [points[x] for x in xs], "-" if queries == "iid" else "--",
                marker="o" if mode == "step graphs" else "x", color=colors[(mode, parts)],
                label=f"{queries}, {mode}, {'one batch' if parts == 1 else f'{parts} micro-batches'}")
    ax.axhline(2.5, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (K tokens)")
    ax.set_ylabel("(a) NOSA / (b) InfLLM-V2 tok/s")
    ax.set_title("Offloaded decode, 1B-like, H200: NOSA over InfLLM-V2 (target 2.5x)")
    ax.legend(fontsize=7)
    save(fig, "runtime_step_graphs.png")

    largest = max_batch_series(runtime)
    if not largest:
        raise ValueError("runtime.md: no session-8 max-view raw tables (calls 2-3)")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    groups = sorted(largest, key=lambda k: (k[0], k[1]))
    width = 0.8 / len(MAX_BATCH_CONFIGS)
    for j, conf in enumerate(MAX_BATCH_CONFIGS):
        xs = [i + (j - (len(MAX_BATCH_CONFIGS) - 1) / 2) * width for i in range(len(groups))]
        ys = [largest[g].get(conf, (0.0, ""))[0] for g in groups]
        bars = ax.bar(xs, ys, width=width, label=conf)
        for bar, g in zip(bars, groups):
            if conf in largest[g] and "dg" in largest[g]:
                ratio = largest[g][conf][0] / largest[g]["dg"][0]
                ax.annotate(f"{ratio:.1f}x\nB {largest[g][conf][1]}", (bar.get_x() + width / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(groups)), [f"{m.upper()}, {c // 1024}K" for m, c in groups])
    ax.set_yscale("log")
    ax.set_ylim(top=2 * max(v[0] for g in groups for v in largest[g].values()))  # NOTE: room for the labels
    ax.set_ylabel("decode tok/s at each one's largest batch")
    ax.set_title("H200, 64 GiB host: dense eager (d) / as one graph (dg), NOSA offload (a), "
                 "+ HBM-homed (ac), on GPU (c); x = over dg", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "runtime_max_batch.png")

    rows = grid_bound_rows(read_tables((results / "kernels_transfer.md").read_text()))
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(rows))
    ax.plot(xs, [r[1] for r in rows], marker="o", label="gather alone (GB/s)")
    ax.plot(xs, [r[2] for r in rows], marker="o", label="gather beside GEMMs (GB/s)")
    ax.set_xticks(list(xs), [r[0].replace("one per item", "unbounded") for r in rows])
    ax.set_xlabel("zero-copy programs (grid bound)")
    ax.set_ylabel("GB/s")
    ax2 = ax.twinx()
    ax2.plot(xs, [r[3] for r in rows], color="tab:red", marker="s", label="GEMM slowdown (x)")
    ax2.set_ylabel("GEMM slowdown x")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="center left")
    ax.set_title("Zero-copy gather of 16 KiB runs vs concurrent GEMMs (H200)")
    save(fig, "transfer_grid_bound.png")

    grpc = grpc_rows(read_tables((results / "grpc_load.md").read_text()))
    runs = sorted({r[0] for r in grpc})
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        mine = [r for r in grpc if r[0] == run]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r[2] for r in mine], width=0.4, label="mean")
        ax.bar([x + 0.2 for x in xs], [r[3] for r in mine], width=0.4, label="p99")
        ax.set_xticks(list(xs), [r[1].replace("under load, ", "") for r in mine])
        ax.set_ylabel("decode step ms")
        ax.set_title(run)
        ax.legend()
    fig.suptitle("Step time with and without 32 gRPC clients + 8 watchers")
    save(fig, "grpc_load.png")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the results markdown files")
    ap.add_argument("--out", type=Path, default=RESULTS / "plots")
    args = ap.parse_args(argv)
    for path in draw(args.results, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
