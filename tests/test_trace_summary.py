"""scripts/trace_summary.py: what a torch-profiler trace says about GPU busy time, gaps and kernels."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import trace_summary as ts  # noqa: E402


def X(cat: str, name: str, ts_us: float, dur: float) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts_us, "dur": dur}


EVENTS = [
    X("kernel", "gemm", 0, 100), X("kernel", "gemm", 50, 100),  # overlapping on two streams: 150 busy
    X("gpu_memcpy", "Memcpy HtoD", 400, 40),  # after a 250 us gap
    X("kernel", "nosa_decode", 460, 20),  # a 20 us gap: not counted as long
    X("cpu_op", "aten::mm", 0, 30), X("cpu_op", "aten::mm", 40, 30), X("cpu_op", "aten::cat", 80, 5),
    X("cuda_runtime", "cudaLaunchKernel", 1, 2), X("cuda_driver", "cuLaunchKernelEx", 51, 2),
    X("cuda_runtime", "cudaStreamSynchronize", 90, 300),
    {"ph": "i", "name": "marker", "ts": 10},  # not a complete event: ignored
]


def test_busy_time_gaps_and_top_kernels_of_a_trace(tmp_path):
    path = tmp_path / "t.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": EVENTS}, f)
    s = ts.summarize(ts.load_events(path))
    assert s["wall_us"] == 480 and s["busy_us"] == 150 + 40 + 20
    assert s["gaps"] == 1 and s["gap_us"] == 250 and s["launches"] == 2
    assert s["kernels"][0] == ("gemm", [2, 200.0]) and [k for k, _ in s["kernels"]] == ["gemm", "Memcpy HtoD",
                                                                                      "nosa_decode"]
    assert s["cpu_ops"][0] == ("aten::mm", [2, 60.0])
    text = ts.render("t", s)
    assert "busy 0.21 ms (44 %)" in text and "| gemm | 2 | 0.200 | 100.0 |" in text


def test_a_folder_is_searched_and_an_empty_trace_says_so(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cpu_only.json").write_text(json.dumps([X("cpu_op", "aten::add", 0, 5)]))
    assert ts.main([str(tmp_path), "--out", str(tmp_path / "s.md")]) == 0
    assert "no GPU activity" in (tmp_path / "s.md").read_text()
    (tmp_path / "empty").mkdir()
    for nothing in (tmp_path / "empty", tmp_path / "missing.json"):
        assert ts.main([str(nothing)]) == 1 and "no traces under" in capsys.readouterr().err
