"""benchmarks/plots.py: the figures are drawn from the committed results tables, which it must parse."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import plots  # noqa: E402


def test_tables_keep_their_heading_path_and_cells():
    text = """# T
## run 5
### one micro-batch
#### 1b @ 16384 tokens

| config | queries | tok/s |
|---|---|---|
| a | drift | 3.98e+03 |
| c | - | OOM: out of memory |
### two micro-batches
| config | queries | tok/s |
|---|---|---|
| a | drift | 5.12e+03 |
"""
    first, second = plots.read_tables(text)
    assert first.path == ("T", "run 5", "one micro-batch", "1b @ 16384 tokens")
    assert second.path == ("T", "run 5", "two micro-batches")
    assert first.rows == [["a", "drift", "3.98e+03"], ["c", "-", "OOM: out of memory"]]
    assert plots.number(first.rows[0][2]) == 3980.0 and plots.number(first.rows[1][2]) is None


def test_the_committed_results_parse():
    results = BENCH / "results"
    runtime = plots.read_tables((results / "runtime.md").read_text())
    micro = plots.micro_batch_series(runtime)
    assert micro[("16384", "2")]["a drift"] > micro[("16384", "1")]["a drift"] > 0
    assert {"a iid", "b drift", "c", "d"} <= set(plots.context_series(runtime))
    ratios = plots.step_graph_ratios(runtime)
    assert set(ratios[("step graphs", 2, "drift")]) == {16384, 32768, 65536, 131072}
    assert 2.8 < ratios[("step graphs", 2, "iid")][16384] < 2.9  # run C: 179 / 62.7 ms a step
    assert ratios[("segment graphs", 1, "drift")].keys() == {131072}
    largest = plots.max_batch_series(runtime)
    assert set(largest) == {("1b", 65536), ("1b", 131072), ("8b", 65536), ("8b", 131072)}
    assert largest[("1b", 131072)]["dg"] == (1130.0, "38") and largest[("8b", 131072)]["a"][1] == "3"
    assert all(set(v) == set(plots.MAX_BATCH_CONFIGS) for v in largest.values())
    rows = plots.grid_bound_rows(plots.read_tables((results / "kernels_transfer.md").read_text()))
    assert [r[0] for r in rows][:3] == ["8", "16", "32"] and all(r[1] > 0 for r in rows)
    assert {r[1] for r in plots.grpc_rows(plots.read_tables((results / "grpc_load.md").read_text()))} >= {
        "no clients", "under load, process server"}


def test_missing_table_is_a_clear_error(tmp_path):
    (tmp_path / "kernels_transfer.md").write_text("# nothing here\n")
    with pytest.raises(ValueError, match="table \\(e\\)"):
        plots.grid_bound_rows(plots.read_tables((tmp_path / "kernels_transfer.md").read_text()))


def test_draws_every_figure(tmp_path):
    written = plots.draw(BENCH / "results", tmp_path)
    assert {p.name for p in written} == {"runtime_micro_batches.png", "runtime_vs_context.png",
                                         "runtime_step_graphs.png", "transfer_grid_bound.png", "grpc_load.png",
                                         "runtime_max_batch.png"}
    for p in written:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
