"""examples/tune_offload.py, run as written against a real server: it raises gpu_slots until the
(synthetic) hit rate reaches the target, and stops there."""

from __future__ import annotations

import importlib.util
import pathlib

from test_control_helpers import served  # noqa: F401 (fixture)

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "tune_offload.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("tune_offload", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tune_offload_raises_slots_until_the_target_hit_rate(served, capsys):
    # synthetic model: hit rate 70% at 64 slots, 87% at 96, 92.5% at 128 (>= 90%: stop raising)
    argv = ["--target", served.server.address, "--min-hit-rate", "0.9", "--step-slots", "32",
            "--interval", "0.1", "--cooldown", "1", "--min-lookups", "1", "--max-updates", "10"]
    assert _load_example().main(argv) == 0
    out = capsys.readouterr().out
    assert "gpu_slots 64 -> 96" in out and "gpu_slots 96 -> 128" in out, out
    assert served.provider.knobs().gpu_slots == 128


def test_tune_offload_dry_run_changes_nothing(served, capsys):
    argv = ["--target", served.server.address, "--interval", "0.1", "--min-lookups", "1",
            "--max-updates", "3", "--dry-run"]
    assert _load_example().main(argv) == 0
    assert "would raise gpu_slots 64 -> 96" in capsys.readouterr().out
    assert served.provider.knobs().gpu_slots == 64


def test_tune_offload_unreachable_server_exits_1(capsys):
    assert _load_example().main(["--target", "127.0.0.1:1", "--max-updates", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
