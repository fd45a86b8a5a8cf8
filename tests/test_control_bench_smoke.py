"""benchmarks/grpc_load.py still runs end to end, over the synthetic provider and over the runtime
decoding on the CPU (tiny load, short phases; the figure is not checked)."""

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
    assert "| under load, thread server |" in run.stdout and "| under load, process server |" in run.stdout
    assert run.stdout.count(" 0 errors") == 2, run.stdout


def test_grpc_load_benchmark_runs_with_the_runtime_decoding_by_default():
    argv = [sys.executable, str(ROOT / "benchmarks" / "grpc_load.py"), "--device", "cpu",
            "--prompt-tokens", "4160",  # 65 blocks of 64: sparse
            "--phase-seconds", "0.3", "--clients", "2", "--watchers", "1"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "target: NosaRuntime decoding a random tiny NOSA-Llama" in run.stdout and "(topk 64: sparse)" in run.stdout
    assert "| under load, thread server |" in run.stdout and "| under load, process server |" in run.stdout
    assert run.stdout.count(" 0 errors") == 2, run.stdout
    assert "1 running" in run.stdout, run.stdout


def test_grpc_load_benchmark_runs_with_a_batched_runtime():
    argv = [sys.executable, str(ROOT / "benchmarks" / "grpc_load.py"), "--provider", "batched", "--model", "tiny",
            "--device", "cpu", "--batch", "3", "--prompt-tokens", "1000", "--restart-every", "4",
            "--phase-seconds", "0.3", "--clients", "2", "--watchers", "1"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "target: NosaRuntime attention stack (tiny" in run.stdout and "batch 3" in run.stdout, run.stdout
    assert run.stdout.count(" 0 errors") == 2 and "3 running" in run.stdout, run.stdout


def test_runtime_decode_restarts_its_request_before_max_seq_len():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from runtime_decode import build_runtime_decode
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    decode = build_runtime_decode("tiny", "cpu", prompt_tokens=300, restart_every=5)
    seen = []
    for _ in range(12):
        decode.step()
        seen.append((decode.request_id, decode.runtime.seq_len(decode.request_id)))
    assert seen[:6] == [("bench-1", 301 + i) for i in range(5)] + [("bench-2", 301)]
    assert max(n for _, n in seen) == decode.runtime.max_seq_len == 305
    assert decode.runtime.snapshot().steps == 12
    decode.close()
    assert decode.runtime.running_requests == ()
