"""benchmarks/grpc_load.py still runs end to end (tiny load, short phases; the figure is not checked)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_grpc_load_benchmark_runs_and_prints_the_table():
    argv = [sys.executable, str(ROOT / "benchmarks" / "grpc_load.py"), "--provider", "synthetic",
            "--phase-seconds", "0.3", "--clients", "2", "--watchers", "1", "--step-work-ms", "1"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| under load |" in run.stdout and "0 errors" in run.stdout, run.stdout
