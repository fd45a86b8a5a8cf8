"""The end-to-end check's equality rule (benchmarks/sglang_e2e.py): two served runs must agree token for
token, unless they prefilled in other batches and first differ at a near tie in both."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import sglang_e2e  # noqa: E402


def run(cached: int, lp1: float, lp2: float) -> dict:
    return {"cached": cached, "tokens": [[1]], "top2": [[[(lp1, 5, "a"), (lp2, 6, "b")]]]}


def test_a_near_tie_is_excused_only_after_other_batching():
    rule, note = sglang_e2e.near_tie_after_other_batching, sglang_e2e.NEAR_TIE_NOTE
    assert rule(run(4096, -0.10, -0.12), run(3328, -0.20, -0.20), 0, 0).endswith(note)
    assert not rule(run(4096, -0.10, -0.12), run(4096, -0.20, -0.20), 0, 0).endswith(note)  # same batching
    assert not rule(run(4096, -0.10, -0.50), run(3328, -0.20, -0.20), 0, 0).endswith(note)  # no near tie
    assert "request 0 step 0 (margins 0.020, 0.000; cached 4096 vs 3328)" in rule(
        run(4096, -0.10, -0.12), run(3328, -0.20, -0.20), 0, 0)


def test_serve_throughput_gives_every_configuration_one_capacity_and_compares_with_dense():
    from types import SimpleNamespace

    import serve_throughput as st

    args = SimpleNamespace(mem_fraction=0.85, requests=4, prompt_tokens=[1024, 2048], output_tokens=8, extra="",
                           max_requests=128)
    cmds = {c: st.server_cmd(c, "/ck", 1, args) for c in st.CONFIGS}
    assert cmds["dense"][1:3] == ["-m", "sglang.launch_server"] and "LlamaForCausalLM" in " ".join(cmds["dense"])
    assert cmds["nosa"][1:5] == ["-m", "nosa_sglang.launch_server", "--enable-nosa", "--nosa-offload"]
    assert "--nosa-model-graphs" not in cmds["nosa"]  # the launcher's defaults (model graphs on without offloading)
    assert cmds["nosa_eager_model"][5:9] == ["off", "--nosa-model-graphs", "off", "--model-path"]
    capacity = {c: cmd[cmd.index("--max-total-tokens") + 1] for c, cmd in cmds.items()}
    assert len(set(capacity.values())) == 1 and int(capacity["dense"]) >= 4 * (2048 + 8)
    base = {"N": 4, "pool_tokens": 9000, "prefill_s": 1.0, "cached": 8000, "gpu_mib": 1, "P": 2048, "fixed_s": 0.5,
            "decode_s": 1.0, "tpot_ms": 1.0, "hit_rate": None, "h2d_bytes": None}
    rows = [{**base, "config": "dense", "tok_s": 100.0, "step_ms": 10.0, "steady_tok_s": 400.0},
            {**base, "config": "nosa", "tok_s": 50.0, "step_ms": 5.0, "steady_tok_s": 800.0}]
    nosa_line = [x for x in st.table(rows, args).splitlines() if "| nosa |" in x][0]
    assert "| 0.50x |" in nosa_line and "| 2.00x |" in nosa_line
    assert st.admitted(10**6, 2048, args) == 4  # a fixed batch whatever the pool
    spread = {**base, "config": "nosa", "tok_s": 60.0, "step_ms": None, "steady_tok_s": None,
              "graphs": {"replays": 90, "captures": 6, "eager": 7, "clears": 2}}
    line = [x for x in st.table([rows[0], spread], args).splitlines() if "| nosa |" in x][0]
    assert "| 0.60x | - | - | - |" in line and line.endswith("| 90 / 6 / 7 / 2 |")


def test_serve_throughput_spreads_outputs_so_requests_leave_one_by_one():
    from types import SimpleNamespace

    import serve_throughput as st

    args = SimpleNamespace(output_tokens=128, output_spread=0.0)
    assert st.output_lengths(4, args) == [128] * 4
    args.output_spread = 0.5
    assert st.output_lengths(5, args) == [128, 112, 96, 80, 64] and st.output_lengths(1, args) == [128]
    args.output_tokens, args.output_spread = 4, 0.9
    assert min(st.output_lengths(8, args)) == 3  # never fewer than the passes before it decode


def test_serve_throughput_max_batch_lets_each_configuration_size_its_pool_and_fills_it():
    from types import SimpleNamespace

    import serve_throughput as st

    args = SimpleNamespace(mem_fraction=0.85, requests="max", prompt_tokens=[32768], output_tokens=128, extra="",
                           max_requests=128)
    for config in st.CONFIGS:
        cmd = st.server_cmd(config, "/ck", 1, args)
        assert "--max-total-tokens" not in cmd and cmd[cmd.index("--max-running-requests") + 1] == "128"
    per_request = 32768 + 128 + 64
    assert st.admitted(110 * per_request + per_request - 1, 32768, args) == 110  # whole requests only
    assert st.admitted(10**9, 32768, args) == 128 and st.admitted(1000, 32768, args) == 1
    info = lambda nosa: {"internal_states": [nosa]}  # noqa: E731
    assert st.host_pool_gib(info({})) is None  # dense
    assert st.host_pool_gib(info({"nosa": {"kv_pool": {"memory": "gpu", "kv_bytes": 2**30}}})) is None
    assert st.host_pool_gib(info({"nosa": {"kv_pool": {"memory": "host", "kv_bytes": 3 * 2**30}}})) == 3.0


def test_serve_throughput_reads_sglang_logged_rate_of_the_full_batch():
    import serve_throughput as st

    line = ("[2026-11-30 01:08:00] Decode batch, #running-req: {n}, #token: 1052672, token usage: 0.90, cuda graph: "
            "True, gen throughput (token/s): {r}, #queue-req: 0\n")
    log = "".join(line.format(n=n, r=r) for n, r in ((32, 34.65), (32, 6021.3), (32, 6014.0), (31, 9000.0),
                                                      (32, 6011.3), (32, 5000.0)))
    assert st.logged_gen_tok_s(log, 32) == (6011.3 + 6014.0) / 2  # the first interval and other batch sizes left out
    assert st.logged_gen_tok_s(log, 16) is None and st.logged_gen_tok_s("Prefill batch\n", 32) is None
    args = type("A", (), {})()
    base = {"N": 4, "pool_tokens": 9000, "prefill_s": 1.0, "cached": 8000, "gpu_mib": 1, "P": 2048, "fixed_s": 0.5,
            "decode_s": 1.0, "tpot_ms": 1.0, "hit_rate": None, "h2d_bytes": None, "tok_s": 1.0, "step_ms": 1.0,
            "steady_tok_s": 1.0}
    rows = [{**base, "config": "dense", "logged_tok_s": 2000.0},
            {**base, "config": "nosa", "logged_tok_s": 6000.0, "compiles": (2, 0)}]
    assert "| 6000 | 3.00x | 2 / 0 |" in [x for x in st.table(rows, args).splitlines() if "| nosa |" in x][0]


def test_serve_throughput_counts_the_kernels_a_pass_compiled(tmp_path):
    import serve_throughput as st

    assert st.kernels_compiled(tmp_path / "none") == 0  # no cache yet: nothing compiled
    for name in ("a1", "b2"):
        (tmp_path / name).mkdir()
    assert st.kernels_compiled(tmp_path) == 2


def test_serve_throughput_submits_as_concurrent_clients_or_as_one_batch(monkeypatch):
    import serve_throughput as st

    calls = []
    def post(url, body, timeout):
        calls.append(body)
        batch = isinstance(body["sampling_params"], list)
        return [{"meta_info": {}}] * len(body["input_ids"]) if batch else {"meta_info": {}}

    monkeypatch.setattr(st, "post", post)
    prompts = [[5, 6], [7], [8, 9, 10]]
    _, outs = st.send("http://x", prompts, [4, 3, 2])
    assert len(calls) == 3 and len(outs) == 3  # one request per prompt
    assert sorted(c["sampling_params"]["max_new_tokens"] for c in calls) == [2, 3, 4]
    calls.clear()
    _, outs = st.send("http://x", prompts, 4, batch=True)
    assert len(calls) == 1 and calls[0]["input_ids"] == prompts and len(outs) == 3
    assert [p["max_new_tokens"] for p in calls[0]["sampling_params"]] == [4, 4, 4]
