"""`nosa-sglang demo --grpc-port`: the control API served over the demo's offload runtime while it keeps
decoding, queried with the gRPC client and nosa-ctl, then stopped cleanly (stop event and SIGTERM)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from nosa_sglang import cli
from nosa_sglang.control import ctl
from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.pb import control_pb2_grpc as pb_grpc
from nosa_sglang.demo import DemoOptions, run_demo
from test_control_helpers import update_request, wait_until

ADDRESS = re.compile(r"control API on (\S+) ")
TOKEN = "demo-token-0123"
#: short prompt and rounds: prefill in a fraction of a second, several rounds within the test
PROMPT_TOKENS = 300
ROUND_STEPS = 40


def _address(lines: list[str]) -> str | None:
    found = [m.group(1) for m in map(ADDRESS.search, list(lines)) if m]
    return found[0] if found else None


@pytest.mark.parametrize("in_process", [False, True], ids=["child-process", "in-process"])
def test_demo_serves_the_runtime_while_decoding_rounds_and_stops_cleanly(tmp_path, capsys, in_process):
    lines: list[str] = []
    stop = threading.Event()
    result: list[list[int]] = []
    opts = DemoOptions(checkpoint=tmp_path / "ckpt", prompt_tokens=PROMPT_TOKENS, steps=ROUND_STEPS,
                       report_every=10, offload=True, grpc_port=0, grpc_token=TOKEN,
                       grpc_in_process=in_process)
    md = [("authorization", f"Bearer {TOKEN}")]
    demo = threading.Thread(target=lambda: result.append(run_demo(opts, print_fn=lines.append, stop=stop)))
    demo.start()
    try:
        assert wait_until(lambda: _address(lines) is not None, timeout_s=30), lines
        address = _address(lines)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.NosaControlStub(channel)

            def steps() -> int:
                return stub.GetStats(pb.GetStatsRequest(), metadata=md, timeout=5).stats.steps

            assert wait_until(lambda: steps() > 5, 20)
            first = stub.GetStats(pb.GetStatsRequest(), metadata=md, timeout=5).stats
            assert wait_until(lambda: steps() > first.steps, 20)
            assert first.totals.hits > 0 and len(first.layers) == 2 and first.mode == pb.RUNTIME_MODE_OFFLOAD
            reply = stub.UpdateConfig(update_request(["gpu_slots"], gpu_slots=128), metadata=md, timeout=10)
            assert reply.applied and reply.config.knobs.gpu_slots == 128
            assert wait_until(lambda: [r.request_id for r in stub.ListRequests(
                pb.ListRequestsRequest(), metadata=md, timeout=5).requests] == ["req-0"])
            with pytest.raises(grpc.RpcError) as err:
                stub.GetStats(pb.GetStatsRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        capsys.readouterr()
        assert ctl.main(["--target", address, "--token", TOKEN, "--json", "config", "get"]) == ctl.EXIT_OK
        assert json.loads(capsys.readouterr().out)["config"]["knobs"]["gpu_slots"] == 128
        # the decode loop goes on round after round (a fresh request each time)
        assert wait_until(lambda: sum(l.startswith("[demo] generated") for l in list(lines)) >= 2, 30), lines
    finally:
        stop.set()
        demo.join(timeout=30)
    assert not demo.is_alive()
    assert result and len(result[0]) == ROUND_STEPS
    assert lines[-1] == "[demo] control API stopped"
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.NosaControlStub(channel).GetStats(pb.GetStatsRequest(), metadata=md, timeout=2)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_sigterm_stops_the_serving_demo_with_exit_0(tmp_path, capsys):
    argv = [sys.executable, "-m", "nosa_sglang.cli", "demo", "--checkpoint", str(tmp_path / "ckpt"),
            "--prompt-tokens", str(PROMPT_TOKENS), "--report-every", "50", "--grpc-port", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: _address(lines) is not None, timeout_s=60), (lines, proc.poll())
        address = _address(lines)
        assert wait_until(lambda: ctl.main(["--target", address, "stats"]) == ctl.EXIT_OK
                          and "running requests 1" in capsys.readouterr().out, 30)  # prefill done
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    assert lines[-1].strip() == "[demo] control API stopped"
    assert "decoding rounds of 4096 tokens" in "".join(lines)  # the serving default


@pytest.mark.parametrize("argv, message", [
    (["--grpc-port", "70000"], "--grpc-port=70000: allowed range is [0, 65535]"),
    (["--grpc-port", "-1"], "--grpc-port=-1: allowed range is [0, 65535]"),
    (["--grpc-port", "x"], "--grpc-port='x': must be an integer in [0, 65535]"),
    (["--grpc-host", "0.0.0.0"], "--grpc-host: needs --grpc-port"),
    (["--grpc-in-process"], "--grpc-in-process: needs --grpc-port"),
    (["--grpc-port", "0", "--no-offload"], "--no-offload: the control API (--grpc-port) serves the offload runtime"),
])
def test_cli_rejects_bad_grpc_flags_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_a_taken_port_in_one_line(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        code = cli.main(["demo", "--checkpoint", str(tmp_path / "ckpt"), "--prompt-tokens", str(PROMPT_TOKENS),
                         "--grpc-port", str(port)])
    assert code == 1 and time.monotonic() - started < 30
    err = capsys.readouterr().err.strip()
    assert err.startswith("nosa-sglang demo: error: --grpc-port: cannot bind") and str(port) in err
    assert "\n" not in err


def test_demo_options_need_the_offload_runtime_to_serve():
    with pytest.raises(ValueError, match="grpc_port: .*offload=True"):
        DemoOptions(grpc_port=50051)
    with pytest.raises(ValueError, match=r"grpc_port=65536: allowed range is \[0, 65535\]"):
        DemoOptions(grpc_port=65536, offload=True)
