"""Serving throughput: the NOSA SGLang server against the same weights served densely by stock SGLang.

One generated NOSA checkpoint (random weights, nonzero `A`; a Llama-3.2-1B-like shape by default) is
served by, one after the other on the same GPU:
  dense         stock `python -m sglang.launch_server`, the weights loaded as plain Llama (the eviction
                head's tensors are ignored), triton attention, CUDA graphs on: SGLang as users run it;
  nosa          `python -m nosa_sglang.launch_server --enable-nosa --nosa-offload off`: NOSA decoding from
                the KV pool's pages with its defaults there: each decode step, NOSA's layers included, is
                one of SGLang's full CUDA graphs (`--nosa-model-graphs auto` = full without offloading);
  nosa_breakable        the same with SGLang's breakable graphs, broken at the NOSA attention, where the
                runtime replays each layer's work as graphs of its own (`--nosa-model-graphs breakable`);
  nosa_eager_model      the same with the model's other decode work eager (`--nosa-model-graphs off`);
  nosa_offload          the host tier (`--nosa-offload on`; breakable model graphs by default);
  nosa_offload_eager_model   the host tier with the model's other decode work eager.
For each prompt length, N concurrent requests of random token ids (no shared prefix) are sent several
times: with one output token (prefill; it also fills the radix cache), with 4 (warm-up: kernel compiles
and graph captures for this batch), then timed with 2 and with `--output-tokens` tokens (greedy,
ignore_eos). The cached passes prefill only each prompt's last page. Output tokens/s of the whole pass
= N * output_tokens / wall; it includes what each request pays once (the extend of its last page over
the cached prefix and its first decode step, which admits it to the NOSA runtime), which the 2-token
pass measures, so the steady decode step is (t_all - t_2) / (output_tokens - 2); beside it, the median
of SGLang's own logged gen throughput while the whole batch decodes (no fixed cost in it at all), and
how many Triton kernels each timed pass compiled (each server has its own cache). GPU memory is read from
nvidia-smi while the server idles after the passes; NOSA's hit rate and H2D bytes of the timed pass
from /server_info. N is --requests with one KV pool size for all, or with `--requests max` as many
as each configuration's own pool holds to the end (the roadmap's "as many concurrent requests as each
configuration admits": SGLang sizes the pool from --mem-fraction-static, offloaded NOSA from host memory).
`--output-spread f` gives the requests outputs from (1 - f) x to 1 x --output-tokens, so they leave the
batch one by one as in continuous serving (output tok/s only: no steady step then); the last column
shows how the NOSA runtime's per-layer segments ran in the timed pass (replayed from CUDA graphs,
captured, run eagerly, and how often every graph was dropped: a batch that changes size or rows).

    python3 benchmarks/serve_throughput.py --prompt-tokens 16384,32768 --requests 32 --out serve.md
    python3 benchmarks/serve_throughput.py --prompt-tokens 32768 --requests max --configs dense,nosa
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_e2e import get, post, stop_server, wait_healthy  # noqa: E402 (PYTHONSAFEPATH drops this folder)

from nosa_sglang.reference.checkpoint import make_tiny_checkpoint  # noqa: E402
from nosa_sglang.reference.llama_config import LlamaShape  # noqa: E402

SHAPES = {
    # Llama-3.2-1B's attention and MLP (16 layers, 32 query / 8 KV heads of 64), a byte-sized vocabulary
    "1b": LlamaShape(vocab_size=259, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072),
    "small": LlamaShape(vocab_size=259, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=131072),
}
#: config -> the NOSA launcher's flags (dense: stock SGLang); "nosa" and "nosa_offload" are the defaults
CONFIGS = {"dense": None, "nosa": ["--nosa-offload", "off"],
           "nosa_breakable": ["--nosa-offload", "off", "--nosa-model-graphs", "breakable"],
           "nosa_eager_model": ["--nosa-offload", "off", "--nosa-model-graphs", "off"],
           "nosa_offload": ["--nosa-offload", "on"],
           "nosa_offload_eager_model": ["--nosa-offload", "on", "--nosa-model-graphs", "off"]}


def request_tokens(P: int, args) -> int:
    """KV tokens one request holds at its end: prompt, output, and a page of slack for page rounding."""
    return P + args.output_tokens + 64


def server_cmd(config: str, ckpt: Path, port: int, args) -> list[str]:
    if args.requests == "max":  # each configuration sizes its own KV pool (GPU memory, or host memory offloaded)
        capacity = ["--max-running-requests", str(args.max_requests)]
    else:  # NOTE: one KV capacity for every configuration (the host pool of nosa_offload is sized by it)
        capacity = ["--max-running-requests", str(args.requests), "--max-total-tokens",
                    str(int(1.1 * args.requests * request_tokens(max(args.prompt_tokens), args)))]
    common = ["--model-path", str(ckpt), "--dtype", "bfloat16", "--port", str(port), "--skip-tokenizer-init",
              "--mem-fraction-static", str(args.mem_fraction), *capacity,
              "--context-length", str(request_tokens(max(args.prompt_tokens), args)),
              "--sampling-backend", "pytorch", "--mm-feature-transport", "cpu", *args.extra.split()]
    if config == "dense":
        override = json.dumps({"architectures": ["LlamaForCausalLM"]})
        return [sys.executable, "-m", "sglang.launch_server", "--attention-backend", "triton",
                "--json-model-override-args", override, *common]
    return [sys.executable, "-m", "nosa_sglang.launch_server", "--enable-nosa", *CONFIGS[config], *common]


def gpu_memory_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return int(out[0]) if out else -1


def nosa_counters(url: str) -> dict:
    """NOSA's cumulative hits, misses, H2D bytes and segment-graph runs ({} on the dense server)."""
    nosa = get(f"{url}/server_info")["internal_states"][0].get("nosa", {})
    graphs = {f"graph_{k}": v for k, v in nosa.get("segment_graphs", {}).items()}
    return {**{k: nosa[k] for k in ("hits", "misses", "bytes_h2d") if k in nosa}, **graphs}


def output_lengths(n: int, args) -> list[int]:
    """Each request's output tokens: all --output-tokens, or with --output-spread f evenly from
    (1 - f) x that to that (at least 3), so requests finish one after another as in continuous serving."""
    out = args.output_tokens
    return [max(3, out - round(args.output_spread * out * i / max(1, n - 1))) for i in range(n)]


def admitted(pool_tokens: int, P: int, args) -> int:
    """Requests sent at prompt length P: --requests, or with `max` as many as the KV pool holds to their
    end (at most --max-requests, the server's --max-running-requests)."""
    if args.requests != "max":
        return args.requests
    return max(1, min(args.max_requests, pool_tokens // request_tokens(P, args)))


def host_pool_gib(info: dict) -> float | None:
    """The KV pool's size when it lives in host memory (NOSA offloaded), else None."""
    pool = info["internal_states"][0].get("nosa", {}).get("kv_pool", {})
    return pool["kv_bytes"] / 2**30 if pool.get("memory") == "host" else None


def send(url: str, prompts: list[list[int]], new_tokens: int | list[int], batch: bool = False
         ) -> tuple[float, list[dict]]:
    """All prompts at once (new_tokens: one for all, or one per prompt); (wall s, answers). Concurrent
    clients by default, one request each, which SGLang prefills in as many batches as they arrive in;
    `batch`: one /generate call with every prompt (a batch client), which it admits together."""
    news = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
    sp = {"temperature": 0.0, "ignore_eos": True}
    t0 = time.time()
    if batch:
        outs = post(f"{url}/generate", {"input_ids": prompts,
                                        "sampling_params": [{**sp, "max_new_tokens": n} for n in news]}, 1800)
        return time.time() - t0, outs
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda pn: post(f"{url}/generate", {
            "input_ids": pn[0], "sampling_params": {**sp, "max_new_tokens": pn[1]}}, 1800), zip(prompts, news)))
    return time.time() - t0, outs


def run_config(config: str, ckpt: Path, args, workdir: Path) -> list[dict]:
    url = f"http://127.0.0.1:{args.port}"
    cmd = server_cmd(config, ckpt, args.port, args)
    log = open(workdir / f"server_{config}.log", "w")
    triton_cache = workdir / f"triton_cache_{config}"  # NOTE: its own, so that the timed passes' compiles show
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TRITON_CACHE_DIR": str(triton_cache)})
    rows = []
    try:
        startup = wait_healthy(url, proc, args.startup_s)
        info = get(f"{url}/server_info")
        pool_tokens = info.get("max_total_num_tokens")
        print(f"{config}: up in {startup:.0f} s, KV pool {pool_tokens} tokens", flush=True)
        host_gib = host_pool_gib(info)
        for P in args.prompt_tokens:
            g = torch.Generator().manual_seed(P)
            n = admitted(pool_tokens, P, args)
            prompts = [torch.randint(3, 259, (P,), generator=g).tolist() for _ in range(n)]
            batch = args.submit == "batch"
            prefill_s, _ = send(url, prompts, 1, batch)
            send(url, prompts, 4, batch)  # NOTE: a short decode first: kernel compiles and graph captures of this batch
            compiled = kernels_compiled(triton_cache)
            fixed_s, _ = send(url, prompts, 2, batch)  # the tail's extend, the first decode step (admission), one more
            compiles_fixed = kernels_compiled(triton_cache) - compiled
            before = nosa_counters(url)
            news = output_lengths(n, args)
            log.flush()
            log_from = (workdir / f"server_{config}.log").stat().st_size
            compiled = kernels_compiled(triton_cache)
            decode_s, outs = send(url, prompts, news, batch)
            compiles_decode = kernels_compiled(triton_cache) - compiled
            logged = logged_gen_tok_s((workdir / f"server_{config}.log").read_text(errors="replace")[log_from:], n)
            # NOTE: the steady step holds only while the whole batch decodes every step (no spread)
            step_s = (decode_s - fixed_s) / (args.output_tokens - 2) if not args.output_spread else None
            cached = sum(o["meta_info"].get("cached_tokens", 0) for o in outs)
            nosa = {k: v - before.get(k, 0) for k, v in nosa_counters(url).items()}  # the decode pass's
            looked_up = nosa.get("hits", 0) + nosa.get("misses", 0)
            graphs = {k.removeprefix("graph_"): v for k, v in nosa.items() if k.startswith("graph_")}
            row = {"config": config, "P": P, "N": n, "pool_tokens": pool_tokens, "prefill_s": prefill_s,
                   "decode_s": decode_s, "cached": cached, "tok_s": sum(news) / decode_s,
                   "tpot_ms": 1e3 * decode_s / args.output_tokens, "fixed_s": fixed_s,
                   "step_ms": 1e3 * step_s if step_s else None, "steady_tok_s": n / step_s if step_s else None,
                   "logged_tok_s": logged, "compiles": (compiles_fixed, compiles_decode),
                   "gpu_mib": gpu_memory_used_mib(), "host_gib": host_gib, "graphs": graphs or None,
                   "hit_rate": nosa["hits"] / looked_up if looked_up else None, "h2d_bytes": nosa.get("bytes_h2d")}
            print(row, flush=True)
            rows.append(row)
            if args.profile_dir:  # torch profiler traces (SGLang writes them, gzipped): the first forwards of
                # a pass (the extend of each last page, the admission, the first steps), then 4 steady steps
                start_profile(url, Path(args.profile_dir) / f"{config}_{P}_fixed", 4)
                send(url, prompts, 4, batch)
                with ThreadPoolExecutor(1) as pool:  # NOTE: asked for once the pass's fixed cost is behind it
                    passing = pool.submit(send, url, prompts, 64, batch)
                    time.sleep(fixed_s + 0.1)
                    start_profile(url, Path(args.profile_dir) / f"{config}_{P}_steady", 4)
                    passing.result()
    except Exception as e:  # noqa: BLE001 - report the failure and the log tail, keep the other configs
        rows.append({"config": config, "error": f"{type(e).__name__}: {e}",
                     "log": (workdir / f"server_{config}.log").read_text()[-3000:]})
    finally:
        stop_server(proc)
        log.close()
    rows.append({"config": config, "cmd": " ".join(cmd[1:])})
    return rows


def kernels_compiled(cache: Path) -> int:
    """Triton kernels compiled into the server's cache so far (one folder each): a timed pass that
    compiles a new specialization (an integer argument that became 1 or a multiple of 16) pays
    seconds that are not serving."""
    return sum(1 for _ in cache.iterdir()) if cache.is_dir() else 0


def start_profile(url: str, out_dir: Path, steps: int) -> None:
    """SGLang's profiler over the server's next `steps` forwards, written to out_dir."""
    body = json.dumps({"output_dir": str(out_dir), "num_steps": steps, "activities": ["CPU", "GPU"]}).encode()
    urllib.request.urlopen(urllib.request.Request(f"{url}/start_profile", data=body, headers={
        "Content-Type": "application/json"}), timeout=60).read()  # NOTE: answers in plain text


def logged_gen_tok_s(log_text: str, batch: int) -> float | None:
    """Median of SGLang's own "gen throughput" log lines while all `batch` requests decode (one every
    --decode-log-interval steps): a steady rate that no pass's fixed cost enters (the 2-token pass varied
    0.3-0.8 s between passes of one server on an H200, which moves the difference-of-passes step by ms)."""
    rates = [float(m.group(2)) for m in _DECODE_LOG.finditer(log_text) if int(m.group(1)) == batch]
    rates = rates[1:]  # NOTE: the first line's interval began before the pass (it reads ~35 tok/s)
    return statistics.median(rates) if rates else None


_DECODE_LOG = re.compile(r"Decode batch[^\n]*?#running-req: (\d+)[^\n]*?gen throughput \(token/s\): ([\d.]+)")


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict], args) -> str:
    lines = ["| prompt tokens | config | requests | KV pool tokens | prefill pass s | 2-token pass s | decode pass s "
             "| cached tokens | output tok/s | vs dense | steady step ms | steady tok/s | vs dense | GPU MiB used "
             "| SGLang-logged gen tok/s | vs dense | Triton compiles in the 2-token / decode pass | host KV pool GiB "
             "| NOSA hit rate | H2D GiB | runtime segments: replayed / captured / eager / clears |",
             "|" + "---|" * 21]
    dense = {r["P"]: r for r in rows if r.get("config") == "dense" and "tok_s" in r}

    def ratio(r, key):
        d = dense.get(r["P"], {}).get(key)
        return "-" if d is None or r[key] is None else f"{r[key] / d:.2f}x"

    for r in sorted((r for r in rows if "tok_s" in r), key=lambda r: (r["P"], list(CONFIGS).index(r["config"]))):
        h2d = None if r["h2d_bytes"] is None else r["h2d_bytes"] / 2**30
        g = r.get("graphs")
        compiles = "-" if r.get("compiles") is None else " / ".join(map(str, r["compiles"]))
        graphs = "-" if not g else f"{g['replays']} / {g['captures']} / {g['eager']} / {g['clears']}"
        lines.append(f"| {r['P']} | {r['config']} | {r['N']} | {r['pool_tokens']} | {r['prefill_s']:.1f} | "
                     f"{r['fixed_s']:.2f} | {r['decode_s']:.2f} | {r['cached']} | {r['tok_s']:.0f} | "
                     f"{ratio(r, 'tok_s')} | {fmt(r['step_ms'], '.1f')} | {fmt(r['steady_tok_s'], '.0f')} | "
                     f"{ratio(r, 'steady_tok_s')} | {r['gpu_mib']} | {fmt(r.get('logged_tok_s'), '.0f')} | "
                     f"{ratio(r, 'logged_tok_s')} | {compiles} | {fmt(r.get('host_gib'), '.1f')} | "
                     f"{fmt(r['hit_rate'], '.3f')} | {fmt(h2d, '.2f')} | {graphs} |")
    extra = [f"- {r['config']}: `{r['cmd']}`" for r in rows if "cmd" in r]
    errors = [f"- {r['config']} failed: {r['error']}\n```\n{r['log']}\n```" for r in rows if "error" in r]
    return "\n".join(lines + [""] + extra + errors)


def requests_arg(text: str) -> int | str:
    if text == "max" or (text.isdigit() and int(text) > 0):
        return text if text == "max" else int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: a positive integer or 'max'")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--prompt-tokens", default="16384,32768", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--output-tokens", type=int, default=128, help="> 2")
    ap.add_argument("--output-spread", type=float, default=0.0,
                    help="in [0, 0.9]: outputs evenly from (1 - f) x --output-tokens to it, so requests leave the "
                         "batch one by one (continuous serving); no steady step then")
    ap.add_argument("--requests", type=requests_arg, default=32,
                    help="concurrent requests (also --max-running-requests), or `max`: as many as each "
                         "configuration's KV pool holds (the roadmap's view), at most --max-requests")
    ap.add_argument("--max-requests", type=int, default=128, help="with --requests max: the servers' batch limit")
    ap.add_argument("--submit", default="concurrent", choices=("concurrent", "batch"),
                    help="concurrent: one HTTP request per prompt (SGLang prefills them in as many batches as they "
                         "arrive in); batch: one /generate call with every prompt")
    ap.add_argument("--configs", default="dense,nosa,nosa_offload")
    ap.add_argument("--mem-fraction", type=float, default=0.85)
    ap.add_argument("--extra", default="", help="more flags for every server")
    ap.add_argument("--port", type=int, default=31100)
    ap.add_argument("--startup-s", type=float, default=300)
    ap.add_argument("--profile-dir", default=None, help="also write torch profiler traces here: the first 4 "
                    "forwards of a pass (its fixed cost) and 4 steady decode steps")
    ap.add_argument("--out", default=None)
    ap.add_argument("--logs", default=None)
    args = ap.parse_args()
    if not 0 <= args.output_spread <= 0.9:
        ap.error(f"--output-spread={args.output_spread}: allowed range is [0, 0.9]")
    if args.output_tokens <= 2:
        ap.error(f"--output-tokens={args.output_tokens}: allowed range is > 2 (a 2-token pass is subtracted)")
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"--configs: {bad} not in {list(CONFIGS)}")
    workdir = Path(args.logs or tempfile.mkdtemp(prefix="nosa_serve_"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ckpt = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="nosa_ckpt_")), shape=SHAPES[args.shape], seed=3)
    print(f"checkpoint ({args.shape}) in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for config in configs:
        rows += run_config(config, ckpt, args, workdir)
    spread = f" down to {output_lengths(2, args)[-1]} (--output-spread)" if args.output_spread else " each"
    text = (f"shape {args.shape}: {SHAPES[args.shape]}\n"
            f"{args.requests} concurrent requests ({args.submit} submission), "
            f"{args.output_tokens} output tokens{spread} (greedy, ignore_eos)\n\n" + table(rows, args))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
