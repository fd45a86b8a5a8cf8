"""The launcher's flags, the plugin in fresh processes, and the NOSA checkpoint tensor check.

Flag errors name the flag and the allowed range and happen before any GPU work; the plugin registers
through SGLang's real entry-point loading only when the launcher enabled NOSA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nosa_sglang.launch_server import DEFAULT_MAX_RUNNING_REQUESTS, sglang_argv, split_args
from nosa_sglang.server_flags import (
    ENV_VAR, TOKEN_ENV_VAR, UNSUPPORTED, NosaFlagError, NosaServerFlags, check_server_args, flags_from_args,
)

pytest.importorskip("sglang.srt.server_args")


def run_python(code: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A fresh interpreter (plugins and argparse choices are process-global), outside the repo root."""
    import os

    full = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, TOKEN_ENV_VAR)}
    full.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=full,
                          cwd=cwd or "/")


@pytest.mark.parametrize("argv, match", [
    (["--nosa-slots", "0"], r"--nosa-slots=0: allowed range is \[1, 1024\]"),
    (["--nosa-slots", "80", "--nosa-max-slots", "70"], r"--nosa-max-slots=70: allowed range is >= --nosa-slots=80"),
    (["--nosa-host-memory-gb", "-1"], r"--nosa-host-memory-gb=-1.0: allowed range is \(0, 16384\]"),
    (["--nosa-grpc-port", "70000"], r"--nosa-grpc-port=70000: allowed range is \[0, 65535\]"),
    (["--nosa-grpc-token", "t"], r"--nosa-grpc-token: needs --nosa-grpc-port"),
])
def test_bad_nosa_flags_name_the_flag_and_range(argv, match):
    ns, _ = split_args(["--enable-nosa", *argv])
    with pytest.raises(NosaFlagError, match=match):
        flags_from_args(ns)


def test_choice_flags_are_checked_by_argparse():
    with pytest.raises(SystemExit):
        split_args(["--enable-nosa", "--nosa-transfer-mode", "dma"])


def test_flags_travel_through_the_environment_without_the_token(monkeypatch):
    ns, rest = split_args(["--enable-nosa", "--nosa-offload", "off", "--nosa-slots", "80", "--nosa-grpc-port", "0",
                           "--nosa-grpc-token", "s3cret", "--model-path", "m", "--port", "1"])
    flags = flags_from_args(ns)
    assert rest == ["--model-path", "m", "--port", "1"]
    assert not flags.offload and flags.slots == 80 and flags.grpc_port == 0
    env = {ENV_VAR: flags.to_env()}
    assert "s3cret" not in env[ENV_VAR]
    assert NosaServerFlags.from_env(env) == NosaServerFlags(**{**json.loads(env[ENV_VAR]), "grpc_token": None})
    assert NosaServerFlags.from_env({**env, TOKEN_ENV_VAR: "s3cret"}) == flags
    assert NosaServerFlags.from_env({}) is None


@pytest.mark.parametrize("flag", ["--attention-backend", "--page-size", "--decode-attention-backend"])
@pytest.mark.parametrize("form", ["separate", "equals"])
def test_flags_the_launcher_owns_are_refused(flag, form):
    rest = [flag, "16"] if form == "separate" else [f"{flag}=16"]
    with pytest.raises(NosaFlagError, match=f"{flag}: not allowed with --enable-nosa"):
        sglang_argv(["--model-path", "m", *rest], NosaServerFlags())


def test_launcher_sets_backend_page_graphs_and_a_bounded_batch():
    argv = sglang_argv(["--model-path", "m"], NosaServerFlags())
    assert argv[argv.index("--attention-backend") + 1] == "nosa" and argv[argv.index("--page-size") + 1] == "64"
    assert argv[argv.index("--max-running-requests") + 1] == str(DEFAULT_MAX_RUNNING_REQUESTS)
    assert sglang_argv(["--max-running-requests=4"], NosaServerFlags()).count("--max-running-requests") == 0
    for flags, want in ((NosaServerFlags(), "breakable"), (NosaServerFlags(offload=False), "full"),
                        (NosaServerFlags(model_graphs="off"), "disabled")):
        argv = sglang_argv(["--model-path", "m"], flags)
        assert argv[argv.index("--cuda-graph-backend-decode") + 1] == want
        assert argv[argv.index("--cuda-graph-backend-prefill") + 1] == "disabled"


@pytest.mark.parametrize("argv, want", [([], "breakable"), (["--nosa-offload", "off"], "full"),
                                        (["--nosa-offload", "off", "--nosa-model-graphs", "off"], "off"),
                                        (["--nosa-offload", "off", "--nosa-model-graphs", "on"], "breakable"),
                                        (["--nosa-model-graphs", "off"], "off")])
def test_model_graphs_default_to_full_without_offloading_and_breakable_with_it(argv, want):
    flags = flags_from_args(split_args(["--enable-nosa", *argv])[0])
    assert flags.model_graphs == want
    assert NosaServerFlags.from_env({ENV_VAR: flags.to_env()}).model_graphs == want  # resolved once, travels so


@pytest.mark.parametrize("field, allowed, flag, why", UNSUPPORTED)
def test_unsupported_sglang_settings_are_refused(field, allowed, flag, why):
    defaults = {f: a for f, a, _, _ in UNSUPPORTED}
    check_server_args(SimpleNamespace(**defaults))
    bad = True if allowed is False else 2 if allowed == 1 else "fp8_e4m3" if allowed == "auto" else "x"
    with pytest.raises(NosaFlagError, match=f"{flag}=.*not supported with --enable-nosa"):
        check_server_args(SimpleNamespace(**{**defaults, field: bad}))


def test_launcher_prepares_sglang_args_in_a_fresh_process(tmp_path):
    from nosa_sglang.reference.checkpoint import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path / "ck")
    code = (
        "from nosa_sglang.launch_server import prepare\n"
        f"sa, flags = prepare(['--enable-nosa', '--nosa-grpc-port', '0', '--model-path', '{tmp_path / 'ck'}',"
        " '--device', 'cpu'])\n"
        "from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS\n"
        "from sglang.srt.models.registry import ModelRegistry\n"
        "print('RESULT', sa.attention_backend, sa.page_size, sa.cuda_graph_backend_decode, sa.max_running_requests,"
        " flags.grpc_port, 'nosa' in ATTENTION_BACKENDS, ModelRegistry.models['SparseLlamaForCausalLM'].__name__)\n"
        "for off in ([], ['--disable-cuda-graph'], ['--disable-decode-cuda-graph']):\n"
        f"    sa, flags = prepare(['--enable-nosa', '--nosa-offload', 'off', '--model-path', '{tmp_path / 'ck'}',"
        " '--device', 'cpu', *off])\n"
        "    print('GRAPHS', off, flags.model_graphs, sa.cuda_graph_config.decode.backend)\n"
    )
    r = run_python(code)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
    assert line == [f"RESULT nosa 64 breakable {DEFAULT_MAX_RUNNING_REQUESTS} 0 True SparseLlamaForCausalLM"], r.stderr[-3000:]
    # without offloading the model graphs are full ones, unless SGLang's own off-switch is given
    graphs = [x.split("] ", 1)[1].split() for x in r.stdout.splitlines() if x.startswith("GRAPHS")]
    assert [g[0] for g in graphs] == ["full", "off", "off"], r.stdout
    assert "full" in graphs[0][1].lower() and all("full" not in g[1].lower() for g in graphs[1:]), graphs


def test_launcher_exits_2_with_one_line_naming_the_flag():
    r = subprocess.run([sys.executable, "-m", "nosa_sglang.launch_server", "--enable-nosa", "--page-size", "16",
                        "--model-path", "m"], capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: --page-size: not allowed with --enable-nosa "
                                                 "(a page is a NOSA block (64 tokens); the launcher sets it)")


PLUGIN_PROBE = (
    "from sglang.srt.plugins import load_plugins\n"
    "from sglang.srt.plugins.hook_registry import HookRegistry\n"
    "load_plugins()\n"
    "from sglang.srt import server_args\n"
    "from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS\n"
    "from sglang.srt.models.registry import ModelRegistry\n"
    "hooked = all(t in HookRegistry._hooks for t in ('sglang.srt.managers.scheduler.Scheduler.on_idle',\n"
    "    'sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool',\n"
    "    'sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._profile_available_bytes'))\n"
    "print('RESULT', 'nosa' in ATTENTION_BACKENDS, 'nosa' in server_args.ATTENTION_BACKEND_CHOICES,"
    " getattr(ModelRegistry.models.get('NosaLlamaForCausalLM'), '__module__', None), hooked,"
    " ModelRegistry.models['LlamaForCausalLM'].__module__)\n"
)


def test_plugin_is_inactive_unless_nosa_is_enabled():
    r = run_python(PLUGIN_PROBE)
    assert "RESULT False False None False sglang.srt.models.llama" in r.stdout, r.stderr[-3000:]


def test_plugin_registers_through_the_entry_point_when_enabled():
    probe = PLUGIN_PROBE + ("from nosa_sglang import model_graphs as mg\n"
                            "print('GRAPH_HOOKS', [t in HookRegistry._hooks for t in (mg.LOAD_BATCH, mg.CAPTURE_ONE, "
                            "mg.REPLAY, mg.EXECUTE)])\n")
    r = run_python(probe, env={ENV_VAR: NosaServerFlags(model_graphs="off").to_env()})
    assert "RESULT True True nosa_sglang.models.nosa_llama True sglang.srt.models.llama" in r.stdout, r.stderr[-3000:]
    assert "GRAPH_HOOKS [False, False, False, False]" in r.stdout
    r = run_python(probe, env={ENV_VAR: NosaServerFlags().to_env()})  # offloading: breakable graphs
    assert "GRAPH_HOOKS [True, True, True, False]" in r.stdout, r.stderr[-3000:]
    r = run_python(probe, env={ENV_VAR: NosaServerFlags(offload=False).to_env()})  # full graphs
    assert "GRAPH_HOOKS [True, False, False, True]" in r.stdout, r.stderr[-3000:]


def test_the_pool_hook_builds_a_nosa_pool_with_sglangs_sizes():
    from nosa_sglang.kv_pool import NosaKVPool, build_mha_pool

    seen = []
    out = build_mha_pool(lambda cfg, **kw: seen.append((cfg, kw)) or "pool", "configurator",
                         max_total_num_tokens=4096, mha_pool_class=object)
    assert out == "pool" and seen == [("configurator", {"max_total_num_tokens": 4096, "mha_pool_class": NosaKVPool,
                                                         "quant_method": None})]


def test_the_kv_budget_is_host_memory_when_offloading(monkeypatch):
    import nosa_sglang.kv_pool as kv_pool

    gib = 1 << 30
    gpu = lambda cfg, pre: 40 * gib  # noqa: E731 - what SGLang would give the KV cache in GPU memory
    monkeypatch.setattr(kv_pool, "physical_ram_bytes", lambda: 128 * gib)
    cases = [(None, 40 * gib), (NosaServerFlags(offload=False, host_memory_gb=200), 40 * gib),
             (NosaServerFlags(host_memory_gb=200), 200 * gib), (NosaServerFlags(), 40 * gib)]
    for flags, want in cases:
        if flags is None:
            monkeypatch.delenv(ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(ENV_VAR, flags.to_env())
        assert kv_pool.host_kv_budget(gpu, "configurator", 0) == want, flags
    monkeypatch.setattr(kv_pool, "physical_ram_bytes", lambda: 64 * gib)  # default: at most half the RAM
    assert kv_pool.host_kv_budget(gpu, "configurator", 0) == 32 * gib


def test_nosa_tensor_check_names_the_tensor():
    from nosa_sglang.models.nosa_llama import NosaTensorCheck
    from nosa_sglang.reference.llama_config import CheckpointError

    shapes = {"model.layers.0.self_attn.A": (2,), "model.layers.0.self_attn.delta.weight": (2, 64),
              "model.layers.0.mlp.up_proj.weight": (8, 4)}
    good = [("model.layers.0.self_attn.A", torch.zeros(2)), ("model.layers.0.self_attn.delta.weight", torch.zeros(2, 64))]
    check = NosaTensorCheck(shapes)
    assert list(check.passing(good)) == good
    check.raise_if_missing()
    check = NosaTensorCheck(shapes)
    list(check.passing(good[:1]))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.0.self_attn.delta.weight: missing"):
        check.raise_if_missing()
    with pytest.raises(CheckpointError, match=r"tensor model.layers.0.self_attn.A: shape \[3\], expected \[2\]"):
        list(NosaTensorCheck(shapes).passing([("model.layers.0.self_attn.A", torch.zeros(3))]))


def test_engine_server_args_set_what_nosa_owns_and_refuse_the_rest(tmp_path):
    from nosa_sglang.engine import engine_server_args
    from nosa_sglang.reference.checkpoint import make_tiny_checkpoint

    with pytest.raises(NosaFlagError, match="page_size: not allowed with NOSA"):
        engine_server_args(model_path="m", page_size=16)
    make_tiny_checkpoint(tmp_path / "ck")
    code = (
        "from nosa_sglang import Engine, NosaServerFlags\n"
        "from nosa_sglang.engine import engine_server_args\n"
        f"sa = engine_server_args(NosaServerFlags(offload=False), model_path='{tmp_path / 'ck'}', device='cpu')\n"
        "print('RESULT', sa.attention_backend, sa.page_size, sa.cuda_graph_backend_decode, sa.max_running_requests,\n"
        f"      engine_server_args(NosaServerFlags(offload=False), model_path='{tmp_path / 'ck'}', device='cpu',\n"
        "                         disable_cuda_graph=True).cuda_graph_backend_decode)\n"
        "try:\n"
        f"    engine_server_args(model_path='{tmp_path / 'ck'}', device='cpu', enable_mixed_chunk=True)\n"
        "except Exception as e:\n"
        "    print('ERROR', e)\n"
    )
    r = run_python(code)
    assert f"RESULT nosa 64 full {DEFAULT_MAX_RUNNING_REQUESTS} disabled" in r.stdout, r.stderr[-3000:]
    assert "ERROR --enable-mixed-chunk=True: not supported with --enable-nosa" in r.stdout, r.stderr[-3000:]


def test_runtime_for_the_frontend_language_starts_sglangs_runtime_with_nosa_or_refuses_first(tmp_path):
    from nosa_sglang.reference.checkpoint import make_tiny_checkpoint

    ck = make_tiny_checkpoint(tmp_path / "ck")
    code = (
        "import sglang.lang.backend.runtime_endpoint as endpoint\n"
        "started = []\n"
        "endpoint.Runtime = lambda **kw: started.append(kw) or 'runtime'\n"  # records instead of launching
        "from nosa_sglang import NosaServerFlags, Runtime\n"
        f"rt = Runtime(NosaServerFlags(offload=False), model_path='{ck}', device='cpu', launch_timeout=5)\n"
        "kw = started[0]\n"
        "import os, json\n"
        "print('RESULT', rt, kw['attention_backend'], kw['page_size'], kw['launch_timeout'], kw['log_level'],"
        " json.loads(os.environ['NOSA_SGLANG_FLAGS'])['offload'])\n"
        "try:\n"
        f"    Runtime(model_path='{ck}', device='cpu', enable_mixed_chunk=True)\n"
        "except Exception as e:\n"
        "    print('ERROR', e, len(started))\n"
    )
    r = run_python(code)
    assert "RESULT runtime nosa 64 5 error False" in r.stdout, r.stderr[-3000:]
    assert "ERROR --enable-mixed-chunk=True: not supported with --enable-nosa" in r.stdout and r.stdout.strip().endswith(
        " 1"), r.stdout + r.stderr[-3000:]
