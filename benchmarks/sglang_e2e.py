"""End to end on the GPU: the real SGLang server with --enable-nosa against the reference model.

Generates a small NOSA checkpoint, launches `python -m nosa_sglang.launch_server --enable-nosa` in each
configuration of `--configs` (default: offload on, then off; `CONFIGS`), sends prompts long enough for
sparse selection (> 64 blocks of 64 tokens) as token ids with greedy sampling, and compares every output
token with the reference model's greedy generation (`NosaLlamaForCausalLM.generate` in the server's
dtype, plain torch math) and with the fully-on-GPU server's. While a server runs, it reads the offload
counters and changes a knob through the control API in the scheduler process (`nosa-ctl`). `--serving`
adds the serving checks (tokenizer, frontend program, OpenAI endpoint, aborts) on `--serving-config`.
Prints a table and writes it as markdown (--out).

    python3 benchmarks/sglang_e2e.py --out sglang_e2e.md
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from nosa_sglang.reference.checkpoint import load_checkpoint, make_tiny_checkpoint
from nosa_sglang.reference.llama_config import LlamaShape

SHAPE = LlamaShape(vocab_size=259, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=32768)


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw.strip() else {}  # /abort_request answers with an empty body


def wait_healthy(url: str, proc: subprocess.Popen, limit_s: float) -> float:
    t0 = time.time()
    while time.time() - t0 < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {limit_s} s")


def ctl(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "nosa_sglang.control.ctl", *args], capture_output=True, text=True,
                       timeout=60)
    return f"$ nosa-ctl {' '.join(args)}  (exit {r.returncode})\n{r.stdout}{r.stderr}"


def serve(ckpt: Path, offload: bool, port: int, grpc_port: int, log: Path, dtype: str, extra: list[str],
          tokenizer: bool = False):
    cmd = [sys.executable, "-m", "nosa_sglang.launch_server", "--enable-nosa", "--nosa-offload",
           "on" if offload else "off", "--nosa-max-slots", "96", "--nosa-grpc-port", str(grpc_port),
           "--model-path", str(ckpt), "--dtype", dtype, "--port", str(port),
           *([] if tokenizer else ["--skip-tokenizer-init"]),
           "--max-total-tokens", "262144", "--mem-fraction-static", "0.3", "--sampling-backend", "pytorch",
           "--mm-feature-transport", "cpu", *extra]
    f = open(log, "w")
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True), cmd


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its scheduler and detokenizer too), SIGKILL after 30 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


#: config name -> (offloaded, NOSA flags beside --nosa-offload); gpu_only is the base every other is held to.
#: By default SGLang's decode graphs are full ones without offloading and breakable with it
#: (--nosa-model-graphs auto); the other kinds are configurations of their own.
CONFIGS = {"offload": (True, []), "gpu_only": (False, []), "eager_model": (False, ["--nosa-model-graphs", "off"]),
           "gpu_only_breakable": (False, ["--nosa-model-graphs", "breakable"]),
           "offload_eager_model": (True, ["--nosa-model-graphs", "off"])}


def run_config(args, ckpt: Path, prompts: list[list[int]], name: str, workdir: Path) -> dict:
    port, grpc_port = args.port, args.grpc_port
    url = f"http://127.0.0.1:{port}"
    log = workdir / f"server_{name}.log"
    offload, flags = CONFIGS[name]
    proc, cmd = serve(ckpt, offload, port, grpc_port, log, args.dtype, [*flags, *args.extra.split()])
    res = {"offload": offload, "cmd": " ".join(cmd[1:]), "log": log}
    try:
        res["startup_s"] = wait_healthy(url, proc, args.startup_s)
        sp = {"temperature": 0.0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
        body = {"sampling_params": sp, "return_logprob": True, "top_logprobs_num": 2}
        target = f"127.0.0.1:{grpc_port}"
        res["rounds"] = []
        for r in range(args.rounds):  # the second round hits the radix cache (prefill after a cached prefix)
            t0 = time.time()
            with ThreadPoolExecutor(args.concurrency) as pool:
                outs = list(pool.map(lambda p: post(f"{url}/generate", {**body, "input_ids": p}), prompts))
            res["rounds"].append({"wall_s": time.time() - t0, "tokens": [o["output_ids"] for o in outs],
                                  "top2": [o["meta_info"]["output_top_logprobs"] for o in outs],
                                  "cached": sum(o["meta_info"].get("cached_tokens", 0) for o in outs)})
        res["ctl"] = [ctl("--target", target, "stats"), ctl("--target", target, "config", "set", "gpu_slots=80"),
                      ctl("--target", target, "config", "get"), ctl("--target", target, "requests")]
    finally:
        stop_server(proc)
    return res


def margin(top2) -> float:
    """top-1 minus top-2 logprob of one step ([(logprob, token id, text), ...])."""
    lp = sorted((t[0] for t in top2), reverse=True)
    return lp[0] - lp[1] if len(lp) > 1 else float("inf")


#: a top-2 logprob margin (nats) under which bf16 rounding may decide the greedy token
NEAR_TIE = 0.05
NEAR_TIE_NOTE = "near tie after other prefill batching"


def near_tie_after_other_batching(a: dict, b: dict, i: int, step: int) -> str:
    """Why two runs' request i first differs at `step`. Accepted only when the runs prefilled in other
    batches (the radix cache served a different number of tokens: concurrent arrivals are timed by the
    OS), which rounds bf16 activations differently, and both runs' top-2 margins there are near ties.
    Runs with the same batching must agree token for token."""
    margins = [margin(r["top2"][i][step]) for r in (a, b) if step < len(r["top2"][i])]
    note = f"request {i} step {step} (margins {', '.join(f'{m:.3f}' for m in margins)}; cached {a['cached']} vs {b['cached']})"
    if a["cached"] != b["cached"] and margins and max(margins) <= NEAR_TIE:
        return f"{note}: {NEAR_TIE_NOTE}"
    return note


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int, list[int]]:
    """(requests equal, tokens equal at the same step, (request, first differing step) of each unequal one)."""
    first = [(i, next((j for j, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q))))
             for i, (p, q) in enumerate(zip(a, b)) if p != q]
    return sum(p == q for p, q in zip(a, b)), sum(x == y for p, q in zip(a, b) for x, y in zip(p, q)), first


def get(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Progress(list):
    """Lines of the report, each also printed at once (a later failure keeps what came before)."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)

    def __iadd__(self, lines):
        for line in lines:
            self.append(line)
        return self


def serving_checks(args, ckpt: Path, workdir: Path) -> list[str]:
    """With the tokenizer: the frontend program, the OpenAI endpoint, N concurrent requests of which some
    are aborted, then the pools back at their start (NOSA counters in /server_info; SGLang's own idle
    leak check would have killed the server), and the offline engine example."""
    port, url = args.port, f"http://127.0.0.1:{args.port}"
    offload, flags = CONFIGS[args.serving_config]
    proc, cmd = serve(ckpt, offload, port, args.grpc_port, workdir / "server_serving.log", args.dtype,
                      [*flags, *args.extra.split()], tokenizer=True)
    out = Progress([f"`{' '.join(cmd[1:])}`", ""])
    examples = Path(__file__).resolve().parent.parent / "examples"
    try:
        out.append(f"startup: {wait_healthy(url, proc, args.startup_s):.0f} s")
        r = subprocess.run([sys.executable, str(examples / "frontend_program.py"), "--url", url],
                           capture_output=True, text=True, timeout=300)
        out += [f"frontend_program.py: exit {r.returncode}", "```", (r.stdout + r.stderr[-1500:]).strip(), "```"]
        text = "offload " * 700
        sp = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
        native = post(f"{url}/generate", {"text": text, "sampling_params": sp})["text"]
        oai = post(f"{url}/v1/completions", {"model": str(ckpt), "prompt": text, "max_tokens": 8, "temperature": 0,
                                             "ignore_eos": True})["choices"][0]["text"]
        out.append(f"/v1/completions == /generate for one {len(text)}-character prompt: {oai == native}")
        g = torch.Generator().manual_seed(5)
        n = args.abort_requests
        lens = torch.randint(args.min_tokens, args.max_tokens + 1, (n,), generator=g).tolist()
        news = torch.randint(8, 65, (n,), generator=g).tolist()
        doomed = set(torch.randperm(n, generator=g)[: n * 3 // 10].tolist())

        def one(i: int):
            ids = torch.randint(3, 259, (lens[i],), generator=g).tolist()
            body = {"input_ids": ids, "rid": f"r{i}", "sampling_params": {**sp, "max_new_tokens": news[i]}}
            try:
                return post(f"{url}/generate", body)["meta_info"]["finish_reason"]["type"]
            except Exception as e:  # an aborted request may answer with an error status
                return f"error {type(e).__name__}"

        t0 = time.time()
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(one, i) for i in range(n)]
            time.sleep(1.0)
            for i in doomed:
                post(f"{url}/abort_request", {"rid": f"r{i}"})
            reasons = [f.result() for f in futures]
        kinds = {k: reasons.count(k) for k in sorted(set(reasons))}
        out.append(f"{n} concurrent requests, {len(doomed)} aborted after 1 s: finish reasons {kinds} "
                   f"in {time.time() - t0:.1f} s")
        time.sleep(3)  # idle: the scheduler's idle hook releases what finished
        nosa = get(f"{url}/server_info")["internal_states"][0]["nosa"]
        out.append(f"after: /health {urllib.request.urlopen(f'{url}/health', timeout=5).status}, "
                   f"NOSA running {nosa['running_requests']}, resident blocks {nosa['resident_blocks']}, host blocks "
                   f"{nosa['host_blocks_used']}/{nosa['host_blocks_total']}, hit rate {nosa['hit_rate']:.3f}, "
                   f"steps {nosa['steps']}")
        if "--enable-metrics" in args.extra.split():
            with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
                gauges = [ln for ln in r.read().decode().splitlines() if ln.startswith("nosa_")]
            out += ["/metrics, the nosa_* gauges:", "```", *gauges, "```"]
    finally:
        stop_server(proc)
    if args.engine_example:
        r = subprocess.run([sys.executable, str(examples / "offline_engine.py"), "--model-path", str(ckpt)],
                           capture_output=True, text=True, timeout=400)
        out += [f"offline_engine.py: exit {r.returncode}", "```", (r.stdout + r.stderr[-1500:]).strip()[-3000:], "```"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=20, help="the roadmap checks 20")
    ap.add_argument("--min-tokens", type=int, default=4200)
    ap.add_argument("--max-tokens", type=int, default=9000)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shared-prefix", type=int, default=4096, help="tokens the last quarter of prompts share")
    ap.add_argument("--port", type=int, default=31000)
    ap.add_argument("--grpc-port", type=int, default=50561)
    ap.add_argument("--startup-s", type=float, default=240)
    ap.add_argument("--configs", default="offload,gpu_only", help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="server and reference dtype (sgl_kernel's RMSNorm has no float32)")
    ap.add_argument("--extra", default="", help="more sglang flags")
    ap.add_argument("--serving", action="store_true", help="also the serving checks (tokenizer, frontend, aborts)")
    ap.add_argument("--serving-config", default="offload", choices=list(CONFIGS), help="the server of --serving")
    ap.add_argument("--abort-requests", type=int, default=100)
    ap.add_argument("--engine-example", action="store_true", help="also run examples/offline_engine.py")
    ap.add_argument("--out", default=None)
    ap.add_argument("--logs", default=None, help="folder for the server logs (default: a temporary one)")
    args = ap.parse_args()
    bad = [c for c in args.configs.split(",") if c and c not in CONFIGS]
    if bad:
        ap.error(f"--configs: {bad} not in {list(CONFIGS)}")

    workdir = Path(args.logs or tempfile.mkdtemp(prefix="nosa_e2e_"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="nosa_ckpt_")), shape=SHAPE, seed=7)
    g = torch.Generator().manual_seed(11)
    lens = torch.randint(args.min_tokens, args.max_tokens + 1, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(3, SHAPE.vocab_size, (n,), generator=g).tolist() for n in lens]
    common = torch.randint(3, SHAPE.vocab_size, (args.shared_prefix,), generator=g).tolist()
    for i in range(args.prompts - args.prompts // 4, args.prompts):  # radix-cache hits inside one round
        prompts[i] = common + prompts[i][args.shared_prefix:]

    t0 = time.time()
    model = load_checkpoint(ckpt, dtype=getattr(torch, args.dtype)).cuda()
    ref = model.generate(prompts, args.new_tokens).tokens
    ref_s = time.time() - t0
    del model
    torch.cuda.empty_cache()

    lines = [f"prompts: {args.prompts} ({args.prompts // 4} share a {args.shared_prefix}-token prefix), lengths "
             f"{min(lens)}-{max(lens)} tokens, {args.new_tokens} new tokens each (greedy), concurrency "
             f"{args.concurrency}, {args.dtype}; reference generate: {ref_s:.1f} s", "",
             "| config | round | startup s | wall s | cached tokens | requests equal to the reference | tokens equal "
             "| first divergence (step: server's top-2 logprob margin there) |", "|---|---|---|---|---|---|---|---|"]
    details, served = [], {}
    n_tok = sum(map(len, ref))
    configs = [c for c in args.configs.split(",") if c]
    for name in configs:
        res = run_config(args, ckpt, prompts, name, workdir)
        if not res.get("rounds"):
            lines.append(f"| {name} | | failed | | | | | |")
            details.append(Path(res["log"]).read_text()[-4000:])
            continue
        for r, rd in enumerate(res["rounds"]):
            served[(name, r)] = rd
            same_req, same_tok, first = agreement(rd["tokens"], ref)
            margins = [f"{step}: {margin(rd['top2'][i][step]):.3f}" for i, step in first]
            lines.append(f"| {name} | {r + 1} | {res['startup_s']:.0f} | {rd['wall_s']:.1f} | {rd['cached']} | "
                         f"{same_req}/{len(ref)} | {same_tok}/{n_tok} | {', '.join(margins) or '-'} |")
        details.append(f"### {name}\n\n`{res['cmd']}`\n\n```\n" + "\n".join(res["ctl"]) + "```\n")
    ok = len(served) == len(configs) * args.rounds
    base = ("gpu_only", 0)
    for key in sorted(served):  # offloading, and where a request's prefix came from, must change no token
        if key != base and base in served:
            a, b = served[key], served[base]
            same_req, same_tok, first = agreement(a["tokens"], b["tokens"])
            excused = [near_tie_after_other_batching(a, b, i, step) for i, step in first]
            lines.append(f"| {key[0]} round {key[1] + 1} vs gpu_only round 1 | | | | | {same_req}/{len(ref)} | "
                         f"{same_tok}/{n_tok} | {'; '.join(excused) or '-'} |")
            ok &= all(e.endswith(NEAR_TIE_NOTE) for e in excused)
    if args.serving:
        details += [f"### serving (tokenizer on, {args.serving_config})", "", *serving_checks(args, ckpt, workdir), ""]
    text = "\n".join(lines) + "\n\n" + "\n".join(details)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
