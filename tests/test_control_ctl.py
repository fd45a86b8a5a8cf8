"""nosa-ctl run in-process (main(argv)): output, exit codes 0/1/2, one-line errors."""

from __future__ import annotations

import json

import pytest

from nosa_sglang.control.ctl import EXIT_OK, EXIT_SERVER, EXIT_USAGE, main
from test_control_helpers import TOKEN, served, served_token  # noqa: F401 (fixtures)


def ctl(served, *argv: str) -> int:
    return main(["--target", served.server.address, *argv])


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nosa-ctl: "), captured.err
    return lines[0]


def test_stats_prints_a_table_with_layers_and_totals(served, capsys):
    assert ctl(served, "stats") == EXIT_OK
    out = capsys.readouterr().out
    assert "running requests 3" in out and "hit rate" in out
    rows = [line.split()[0] for line in out.splitlines() if line[:1].isdigit() or line.startswith("total")]
    assert rows == ["0", "1", "2", "3", "total"]


def test_stats_watch_prints_one_table_per_update_with_rates(served, capsys):
    assert ctl(served, "stats", "--watch", "0.1", "--count", "3", "--no-layers") == EXIT_OK
    out = capsys.readouterr().out
    assert out.count("running requests") == 3
    assert out.count("steps/s") == 2  # every update after the first has interval rates


def test_stats_watch_with_bad_interval_is_a_usage_error(served, capsys):
    assert ctl(served, "stats", "--watch", "0.001", "--count", "1") == EXIT_USAGE
    assert "interval" in _one_line_error(capsys)


def test_requests_lists_running_requests(served, capsys):
    assert ctl(served, "requests") == EXIT_OK
    out = capsys.readouterr().out
    assert all(f"synthetic-{i}" in out for i in (1, 2, 3))


def test_config_get_shows_knobs_and_read_only_constants(served, capsys):
    assert ctl(served, "config", "get") == EXIT_OK
    out = capsys.readouterr().out
    assert "gpu_slots" in out and "[64, 1024]" in out and "copy_engine" in out
    assert "read-only" in out and "topk_blocks" in out


def test_config_set_applies_and_prints_the_config_in_force(served, capsys):
    argv = ["config", "set", "gpu_slots=128", "prefetch=on", "transfer_mode=zero_copy",
            "host_capacity_bytes=2GiB", "victim_policy=lru"]
    assert ctl(served, *argv) == EXIT_OK
    assert capsys.readouterr().out.startswith("applied: gpu_slots=128")
    k = served.provider.knobs()
    assert (k.gpu_slots, k.prefetch, k.transfer_mode, k.host_capacity_bytes, k.victim_policy) == (
        128, True, "zero_copy", 2 << 30, "lru")


@pytest.mark.parametrize("assignment, text", [
    ("gpu_slots=10", "[64, 1024]"),
    ("topk_blocks=128", "read-only"),
    ("gpu_slot=128", "unknown knob"),
])
def test_config_set_rejected_by_the_server_is_a_usage_error(served, capsys, assignment, text):
    before = served.provider.knobs()
    assert ctl(served, "config", "set", assignment) == EXIT_USAGE
    line = _one_line_error(capsys)
    assert "INVALID_ARGUMENT" in line and text in line and assignment.split("=")[0] in line
    assert served.provider.knobs() == before


@pytest.mark.parametrize("argv, text", [
    (["config", "set", "gpu_slots"], "KEY=VALUE"),
    (["config", "set", "gpu_slots=many"], "gpu_slots='many'"),
    (["config", "set", "prefetch=maybe"], "true/false"),
    (["config", "set", "transfer_mode=dma"], "copy_engine"),
    (["config", "set", "host_capacity_bytes=lots"], "byte count"),
    (["config"], "required"),
    (["frobnicate"], "invalid choice"),
    (["stats", "--watch", "soon"], "invalid float"),
])
def test_bad_command_line_is_a_usage_error(served, capsys, argv, text):
    assert ctl(served, *argv) == EXIT_USAGE
    assert text in _one_line_error(capsys)


def test_unreachable_server_is_a_server_error(capsys):
    assert main(["--target", "127.0.0.1:1", "--timeout", "2", "stats"]) == EXIT_SERVER
    assert "UNAVAILABLE" in _one_line_error(capsys)


def test_token_missing_is_a_server_error_and_given_is_ok(served_token, capsys, monkeypatch):
    monkeypatch.delenv("NOSA_CTL_TOKEN", raising=False)
    assert ctl(served_token, "stats") == EXIT_SERVER
    assert "UNAUTHENTICATED" in _one_line_error(capsys)
    assert ctl(served_token, "--token", TOKEN, "stats") == EXIT_OK
    monkeypatch.setenv("NOSA_CTL_TOKEN", TOKEN)
    assert main(["--target", served_token.server.address, "requests"]) == EXIT_OK


def test_json_output_parses(served, capsys):
    assert ctl(served, "--json", "config", "get") == EXIT_OK
    reply = json.loads(capsys.readouterr().out)
    assert reply["config"]["knobs"]["gpu_slots"] == 64
    assert reply["config"]["nosa"]["topk_blocks"] == 64


def test_reset_zeroes_the_counters(served, capsys):
    assert ctl(served, "reset") == EXIT_OK
    assert "epoch 1" in capsys.readouterr().out


def test_help_exits_zero(capsys):
    assert main(["--help"]) == EXIT_OK
    assert "config" in capsys.readouterr().out
