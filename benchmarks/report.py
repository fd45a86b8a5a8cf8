"""Markdown tables for the benchmark scripts: printed as they are made, collected for `--out`."""

from __future__ import annotations


def table(title: str, cols: list[str], rows: list[list[object]], md: list[str]) -> None:
    """Print a markdown table and append it to `md`; floats with 3 significant digits."""
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    print("\n".join(lines) + "\n", flush=True)
    md += lines + [""]


def write_markdown(path: str, md: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
