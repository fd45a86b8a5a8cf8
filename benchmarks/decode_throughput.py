"""Decode throughput of NOSA with a pinned host KV tier, against InfLLM-V2 selection, NOSA fully on the
GPU and dense attention, on one GPU (attention + KV only; q/k/v/c random; the rest of the model is not
run, so these are upper bounds of the attention-side speedup).

    python benchmarks/decode_throughput.py --out benchmarks/results/runtime.md              # everything
    python benchmarks/decode_throughput.py --model 1b --contexts 16k,32k --out r1.md       # one call's share
    python benchmarks/decode_throughput.py --simulate                                      # CPU hit rates

Configurations (same runtime code, same kernels):
  (a) NOSA with offload: NosaRuntime, host store in pinned memory, `--gpu-slots` slots per head;
  (b) InfLLM-V2 selection (top-64 by query score alone) on the same runtime, LRU victims;
  (c) NOSA fully on the GPU (gpu_only: every block resident);
  (d) dense attention fully on the GPU: torch SDPA (enable_gqa, FlashAttention backend) over a bf16
      KV cache, K/V never repeated, eager;
  (dg) the same dense attention as a server runs it: each step one CUDA graph, our decode kernel over
      every block (zero bias): (d) without its host loop;
  (a*) (a) with enough slots that every block hits: the cost of the runtime itself against (c);
  (a+), (b+) (a), (b) with one H2D copy stream per micro-batch (`per_stream_copies`) instead of one shared;
  (ac) max view only: (a) at its largest batch, and beside it on a side stream a second runtime holding
      fully on the GPU as many more requests as the HBM left over holds: a second home tier in spare HBM,
      emulated (the runtime has one home, the host store); one step joins both (one scheduler's batch);
  (ad) as ac, but each runtime steps in a loop of its own (two batches in flight, none waits for the
      other's copies); tok/s counts both loops' tokens over the time (a) takes for --steps steps.
Query models (the weights are random, so the query stream is a model choice, stated in the output):
  iid    q ~ N(0, 1) afresh for every step, layer and head;
  drift  q_t = rho * q_{t-1} + sqrt(1 - rho^2) * eps_t per (request, layer, head), eps ~ N(0, 1)
         (rho = --drift-rho): a slowly turning query, as in real decoding where consecutive steps look alike.
Compressed keys K~ ~ N(0, 1) and per-token biases c ~ U(0, 1) are random; new tokens append random k/v/c.
Views: one batch all four configurations hold, and the largest batch each holds (host RAM for (a)/(b),
HBM for (c)/(d); the binding limit is printed). Prefill is synthetic (`begin_request_synthetic`): the host
store is filled once with zeros and never rewritten, so admission costs no PCIe pass.
Steps: `--step-graphs` runs each decode step as one CUDA graph (runtime.StepGraphs, the way SGLang
replays its decode forward; the best mode measured), `--cuda-graphs` one graph per layer segment,
neither: eager; `--micro-batches N` cuts (a)/(b)'s batch into N parts on N streams.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from decode_workload import Workload, sync, timed_steps, wall_of_steps, warm_up
from dense_decode import DenseGraphed, run_dense
from report import table, write_markdown
from two_homes import SIDE_STEPS, beside, decoupled_steps
from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels import pdl as pdl_module
from nosa_sglang.kernels import topk as topk_module
from nosa_sglang.runtime import MicroBatches, ModelShape, NosaRuntime, OffloadKnobs, StepGraphs
from nosa_sglang.runtime.knobs import MAX_GPU_SLOTS

GiB = 1 << 30
MODELS = {"1b": (28, 16, 2, 128), "8b": (32, 32, 8, 128)}
CONTEXTS = {"4k": 4096, "16k": 16384, "32k": 32768, "64k": 65536, "128k": 131072}


# -- memory model -----------------------------------------------------------------------------------------
def host_bytes_per_request(shape: ModelShape, cfg: NosaConfig, tokens: int) -> int:
    return cfg.num_blocks(tokens) * shape.kv_bytes(cfg.block_size)


def host_bytes_owned(shape: ModelShape, cfg: NosaConfig, tokens: int, host_tokens: int) -> tuple[int, int]:
    """(host bytes of a request of `tokens` grown to `host_tokens`, the part of them a request that shares
    another's full prompt blocks still owns: its tail and decode blocks)."""
    per_request = host_bytes_per_request(shape, cfg, host_tokens)
    return per_request, per_request - (tokens // cfg.block_size) * host_bytes_per_request(shape, cfg, cfg.block_size)


def runtime_gpu_bytes_per_request(shape: ModelShape, cfg: NosaConfig, tokens: int, slots: int, gpu_only: bool,
                                  ck_bytes: int) -> int:
    """Mirror of the runtime's per-row allocations (slot buffers, maps, K~, chunk means, biases)."""
    L, H, d, bs = shape.num_layers, shape.num_kv_heads, shape.head_dim, cfg.block_size
    nb = cfg.num_blocks(tokens)
    per_head = nb if gpu_only else slots + 1
    slot_bytes = L * H * per_head * bs * (2 * d * shape.dtype_bytes + 4)
    maps = 0 if gpu_only else L * H * ((slots + 2) * 12 + (nb + 1) * 4) + nb * 4
    chunks = cfg.num_chunks(nb * bs)
    sel = L * (chunks * H * (d * ck_bytes + 4) + H * nb * bs * 4 + cfg.kernel_size * H * d * shape.dtype_bytes)
    return slot_bytes + maps + sel


def decode_step(rt: NosaRuntime, parts: MicroBatches, work: Workload, split_append: bool = False) -> None:
    """One decode step of the attention stack: every layer's next q/k/v/c through `decode()` (or
    `append()` then `attend()`) of every micro-batch (one part: the whole batch on the current stream),
    then the step boundary (it joins the parts' streams)."""
    for layer in range(rt.shape.num_layers):
        parts.decode(layer, *work.next(layer), split_append=split_append)
    rt.step_boundary()


def step_graph_runner(rt: NosaRuntime, parts: MicroBatches, work: Workload, B: int):
    """One decode step as a StepGraphs replay: the step's inputs written into fixed [L, ...] buffers,
    then every layer's decode() of every micro-batch reading them (the shape of a captured forward)."""
    s, L, dev = rt.shape, rt.shape.num_layers, rt.device
    q = torch.empty((L, B, s.num_q_heads, s.head_dim), dtype=s.dtype, device=dev)
    k = torch.empty((L, B, s.num_kv_heads, s.head_dim), dtype=s.dtype, device=dev)
    v, c = torch.empty_like(k), torch.empty((L, B, s.num_kv_heads), device=dev)

    graphs = StepGraphs(rt, [part.request_ids for part in parts.parts],  # NOTE: the runtime joins the parts
                        lambda: [parts.decode(layer, q[layer], k[layer], v[layer], c[layer]) for layer in range(L)])

    def step() -> None:
        work.next_step_into(q, k, v, c)
        graphs.step()

    step.graphs = graphs
    return step


def synthetic_runtime(shape: ModelShape, cfg: NosaConfig, knobs: OffloadKnobs, tokens: int, B: int, max_seq_len: int,
                      device, host_tokens: int | None = None, host_buffer: torch.Tensor | None = None,
                      gpu_only: bool = False, leaders: int | None = None, **kw) -> tuple[NosaRuntime, list[str]]:
    """A NosaRuntime holding B synthetic requests of `tokens` (ids r0..), its host store sized for
    `host_tokens` (default max_seq_len) per request: carved from `host_buffer`, else (on CUDA) a zeroed
    pinned buffer of its own. `leaders` (< B): only that many requests own their prompt blocks; the
    others share a leader's full prompt blocks (`begin_request_synthetic(shared_blocks=)`) and own only
    their tail and decode blocks: a host store larger than the pinned one, emulated."""
    per_request, own = host_bytes_owned(shape, cfg, tokens, host_tokens or max_seq_len)
    n_shared = tokens // cfg.block_size
    leaders = B if leaders is None else max(1, min(B, leaders))
    host_cap = 0 if gpu_only else leaders * per_request + (B - leaders) * own
    if host_buffer is None and not gpu_only and torch.device(device).type == "cuda":
        from nosa_sglang.kernels.pinned import alloc_pinned

        host_buffer = alloc_pinned((host_cap,), torch.uint8)
        host_buffer.zero_()  # finite K/V for every block the synthetic requests fetch
    rt = NosaRuntime(shape, cfg, knobs, device=device, host_capacity_bytes=host_cap, max_requests=B,
                     max_seq_len=max_seq_len, gpu_only=gpu_only, host_buffer=host_buffer, **kw)
    ids = [f"r{i}" for i in range(B)]
    for i, rid in enumerate(ids):
        shared = None if gpu_only or i < leaders else list(rt.host_blocks(ids[i % leaders])[:n_shared])
        rt.begin_request_synthetic(rid, tokens, seed=i, shared_blocks=shared)
    return rt, ids


def emulated_leaders(args, shape, cfg, tokens, B, host_buffer, gpu_only) -> int | None:
    """With --emulate-host-gib: how many of B requests own their prompt blocks in the pinned buffer (the
    rest share theirs); None: every request owns its blocks. --alias-prompts: one owner, every other
    request shares its blocks (the emulation's worst case, to bound its bias at any batch)."""
    if gpu_only or host_buffer is None:
        return None
    if args.alias_prompts:
        return 1
    if not args.emulate_host_gib:
        return None
    per, own = host_bytes_owned(shape, cfg, tokens, tokens + args.steps + args.warmup + 1)
    have = host_buffer.numel() * host_buffer.element_size()
    return max(1, (have - B * own) // (per - own))


def runtime_stepper(args, shape, cfg, tokens, B, policy, gpu_only, slots, query_model, host_buffer,
                    micro_batches: int = 1, per_stream: bool = False):
    """A synthetic runtime of B requests, its decode step (a StepGraphs replay, or eager) and the
    StepGraphs runner (None when eager)."""
    victim = "lru" if policy == "infllmv2" else args.victim_policy
    knobs = OffloadKnobs(gpu_slots=slots, transfer_mode=args.transfer_mode, prefetch=args.prefetch,
                         victim_policy=victim)
    rt, ids = synthetic_runtime(shape, cfg, knobs, tokens, B, tokens + args.steps + args.warmup + 2, args.device,
                                host_tokens=tokens + args.steps + args.warmup + 1, host_buffer=host_buffer,
                                leaders=emulated_leaders(args, shape, cfg, tokens, B, host_buffer, gpu_only),
                                gpu_only=gpu_only, selection_policy=policy,
                                ck_dtype=shape.dtype if args.ck_bf16 else torch.float32, cuda_graphs=args.cuda_graphs,
                                inline_gather=args.inline_gather and not args.split_append,
                                per_stream_copies=per_stream)
    work = Workload(shape, B, query_model, args.drift_rho, args.device, steps=args.warmup + args.steps)
    parts = MicroBatches(rt, ids, micro_batches)
    runner = step_graph_runner(rt, parts, work, B) if args.step_graphs else None

    def step() -> None:
        if runner is not None:
            runner()
        else:
            decode_step(rt, parts, work, args.split_append)

    return rt, step, runner


def run_runtime(args, shape, cfg, tokens, B, policy, gpu_only, slots, query_model, host_buffer,
                micro_batches: int = 1, per_stream: bool = False, resident: int = 0, decoupled: bool = False) -> dict:
    """Time B requests' decode steps. `resident` > 0 (configs ac, ad): that many more requests, fully on
    the GPU in a second runtime, step beside the first on a side stream: what a second home tier in spare
    HBM would add to (a) (the runtime has one home, the host store; docs/runtime.md "Limits"). ac joins
    the two every step (one batch, as one scheduler steps it); ad (`decoupled`) lets each run its own
    step loop, so the resident requests need not wait for (a)'s copies."""
    rt, step, runner = runtime_stepper(args, shape, cfg, tokens, B, policy, gpu_only, slots, query_model,
                                       host_buffer, micro_batches, per_stream)
    side = None
    if resident:
        side_args = argparse.Namespace(**{**vars(args), "steps": SIDE_STEPS * args.steps if decoupled else args.steps})
        _, side, _ = runtime_stepper(side_args, shape, cfg, tokens, resident, "nosa", True, slots, query_model, None)
        if not decoupled:
            step, side = beside(args, step, side), None
    host_ms = warm_up(args, step)
    if side is not None:
        warm_up(args, side)
    rt.step_boundary()
    sync(args)
    rt.reset_stats()
    syncs0 = rt.transfer.host_syncs if rt.transfer else 0
    unreplayed0 = runner.graphs.unreplayed_steps if runner else 0
    wall, side_steps = decoupled_steps(args, step, side) if side is not None else (wall_of_steps(args, step), 0)
    rt.step_boundary()
    sync(args)
    rt.step_boundary()
    snap = rt.snapshot().totals
    out = {
        "tok_s": (B * args.steps + resident * (side_steps or args.steps)) / wall, "step_ms": 1e3 * wall / args.steps,
        "host_ms": host_ms, "side_steps": side_steps,
        "hit": snap.hit_rate,
        "h2d_gbs": snap.bytes_h2d / wall / 1e9,
        "copy_gbs": snap.bytes_h2d / snap.transfer_time_s / 1e9 if snap.transfer_time_s else 0.0,
        "stall": snap.stall_time_s / wall, "host_wait": snap.host_wait_time_s / wall,
        "miss_per_head": snap.misses / max(1, args.steps * B * shape.num_layers * shape.num_kv_heads),
        "syncs_per_step": ((rt.transfer.host_syncs if rt.transfer else 0) - syncs0) / args.steps,
        # timed steps that did not replay a step graph (a key first seen, or captured, while timing)
        "unreplayed": (runner.graphs.unreplayed_steps - unreplayed0) if runner else 0,
    }
    return out  # NOTE: the caller frees the GPU state (bench_one: free_cache), once this frame is gone


def free_cache(args) -> None:
    """Release the previous configuration's GPU memory: the runtime and its CUDA graphs form reference
    cycles, which only the collector frees (without this, every later configuration ran out of HBM)."""
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()


# -- ceilings ---------------------------------------------------------------------------------------------
def measure_ceilings(host_buffer: torch.Tensor) -> dict:
    """Pinned H2D copy bandwidth (1 GiB, copy engine) and zero-copy gather of random 16 KiB runs."""
    from nosa_sglang.kernels.block_copy import gather_runs

    n = min(GiB, host_buffer.numel())
    src = host_buffer[:n]
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    for _ in range(2):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    h2d = 5 * n / (time.perf_counter() - t0) / 1e9
    run = 16384
    runs = n // run // 2
    hk, hv = src[: runs * run].view(runs, run), src[runs * run : 2 * runs * run].view(runs, run)
    gk = torch.empty((4096, run), dtype=torch.uint8, device="cuda")
    gv = torch.empty_like(gk)
    res = {"h2d_copy_gbs": h2d}
    for mode in ("zero_copy", "copy_engine"):
        ids = [torch.randperm(runs)[:4096] for _ in range(3)]
        dst_ids = torch.arange(4096)
        dev = (lambda t: t.cuda()) if mode == "zero_copy" else (lambda t: t)
        calls = [(dev(i), dev(dst_ids)) for i in ids]
        gather_runs(hk, hv, *calls[0][:1], gk, gv, calls[0][1], mode=mode, validate_ids=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s, d_ in calls:
            gather_runs(hk, hv, s, gk, gv, d_, mode=mode, validate_ids=False)
        torch.cuda.synchronize()
        res[f"gather_{mode}_gbs"] = 3 * 2 * 4096 * run / (time.perf_counter() - t0) / 1e9
    del dst, gk, gv
    torch.cuda.empty_cache()
    return res


# -- driver -----------------------------------------------------------------------------------------------
def plan_batches(args, shape, cfg, tokens, host_cap, gpu_cap) -> dict:
    t = tokens + args.steps + args.warmup + 2
    ckb = shape.dtype_bytes if args.ck_bf16 else 4
    host_req = host_bytes_per_request(shape, cfg, t)
    off_req = runtime_gpu_bytes_per_request(shape, cfg, t, args.gpu_slots, False, ckb)
    full_req = runtime_gpu_bytes_per_request(shape, cfg, t, 0, True, ckb)
    dense_req = shape.kv_bytes(t)
    by_host, by_hbm = host_cap // host_req, gpu_cap // off_req
    host_label = "host RAM"
    if args.emulate_host_gib:
        by_host = int(args.emulate_host_gib * GiB * 0.85 // host_req)
        host_label = f"host RAM, {args.emulate_host_gib:g} GiB emulated"
    ab = min(by_host, by_hbm, args.max_batch)
    limits = {
        "a": (ab, host_label if by_host <= by_hbm else "HBM"),
        "c": (min(gpu_cap // full_req, args.max_batch), "HBM"),
        "d": (min(gpu_cap // dense_req, args.max_batch), "HBM"),
    }
    limits["b"] = limits["a"]
    return {"limits": limits, "host_req": host_req, "off_req": off_req, "full_req": full_req, "dense_req": dense_req}


def view_runs(args, view, batch, common, lim, plan, gpu_cap):
    """(config, batch, resident) of each run of one view. Configs ac / ad (max view only) run (a) at each
    batch of --ac-host-batches (default: its largest) plus the resident requests the HBM left over holds."""
    for conf in args.configs:
        if conf not in ("ac", "ad"):
            yield conf, batch.get("d" if conf == "dg" else conf.rstrip("*+"), common), 0
            continue
        if view != "max":
            continue
        for B in sorted({min(b, lim["a"][0]) for b in args.ac_host_batches or [lim["a"][0]]}):
            yield conf, B, max(0, min(args.max_batch, (gpu_cap - B * plan["off_req"]) // plan["full_req"] - 1))


def bench_one(args, name, tokens, host_buffer, host_cap, gpu_cap, ceil, md) -> None:
    shape = ModelShape(*MODELS[name], torch.bfloat16)
    cfg = NosaConfig()
    plan = plan_batches(args, shape, cfg, tokens, host_cap, gpu_cap)
    lim = plan["limits"]
    common = min(v[0] for v in lim.values())
    md.append(f"## {name.upper()}-like ({shape.num_layers} layers, Hq {shape.num_q_heads}, Hkv {shape.num_kv_heads}, "
              f"d {shape.head_dim}), context {tokens}")
    md.append(f"per request: host {plan['host_req'] / GiB:.2f} GiB; GPU (a) {plan['off_req'] / GiB:.2f} GiB, "
              f"(c) {plan['full_req'] / GiB:.2f} GiB, (d) {plan['dense_req'] / GiB:.2f} GiB. Largest batch: "
              + ", ".join(f"({k}) {v[0]} [{v[1]}]" for k, v in lim.items())
              + f"; with 256 GiB of host RAM (a) would hold {int(256 * GiB * 0.85 // plan['host_req'])} by host.")
    md.append("")
    print("\n".join(md[-3:]), flush=True)
    rows = []
    views = [("common", {k: common for k in lim})] if "common" in args.views else []
    if "max" in args.views:
        views.append(("max", {k: v[0] for k, v in lim.items()}))
    for view, batch in views:
        for conf, B, resident in view_runs(args, view, batch, common, lim, plan, gpu_cap):
            label = f"{B}+{resident}" if resident else B
            if B < 1:
                rows.append([view, conf, "-", 0, "does not fit", "", "", "", "", "", "", ""])
                continue
            qms = ["-"] if conf in ("c", "d", "dg", "a*") else args.query_models
            for qm in qms:
                free_cache(args)  # NOTE: the previous configuration's runtime is a cycle: only now collectable
                t0 = time.perf_counter()
                try:
                    if conf == "d":
                        r = run_dense(args, shape, tokens, B)
                    elif conf == "dg":
                        r = timed_steps(args, DenseGraphed(args, shape, tokens, B).step, B)
                    elif conf == "a*":
                        slots = cfg.num_blocks(tokens + args.steps + args.warmup + 2) + 1
                        if slots > MAX_GPU_SLOTS or view != "common":
                            continue
                        r = run_runtime(args, shape, cfg, tokens, B, "nosa", False, slots, "drift", host_buffer)
                    else:
                        qm_run = qm if qm != "-" else "drift"
                        r = run_runtime(args, shape, cfg, tokens, B, "infllmv2" if conf[0] == "b" else "nosa",
                                        conf == "c", args.gpu_slots, qm_run, host_buffer,
                                        1 if conf == "c" else args.micro_batches, per_stream=conf.endswith("+"),
                                        resident=resident, decoupled=conf == "ad")
                except torch.OutOfMemoryError as e:
                    failed = f"OOM: {str(e)[:60]}"
                except Exception as e:  # noqa: BLE001 - one broken configuration must not end the call
                    import traceback

                    traceback.print_exc()
                    failed = f"error: {type(e).__name__}: {str(e)[:80]}"
                else:
                    failed = ""
                if failed:  # NOTE: outside the except block, so the traceback's frames (and tensors) are gone
                    free_cache(args)
                    rows.append([view, conf, qm, label, failed, "", "", "", "", "", "", ""])
                    continue
                rows.append([view, conf, qm, label, round(r["tok_s"], 1), round(r["step_ms"], 2), round(r["host_ms"], 2),
                             round(r.get("hit", float("nan")), 4), round(r.get("h2d_gbs", 0.0), 2),
                             round(100 * r.get("copy_gbs", 0.0) / ceil["h2d_copy_gbs"], 1) if r.get("copy_gbs") else "",
                             "" if args.step_graphs else round(100 * r.get("stall", 0.0), 1),
                             round(100 * r.get("host_wait", 0.0), 1)])
                if r.get("side_steps"):
                    md.append(f"NOTE: {view} {conf} {qm} {label}: the resident loop ran {r['side_steps']} steps while "
                              f"(a) ran {args.steps}")
                if r.get("unreplayed"):
                    md.append(f"NOTE: {view} {conf} {qm}: {r['unreplayed']} of the timed steps did not replay a step graph")
                print(f"  [{name} {tokens} {view} {conf} {qm} B={B}] {rows[-1][4:]} ({time.perf_counter() - t0:.1f} s)",
                      flush=True)
    table(f"{name} @ {tokens} tokens", ["view", "config", "queries", "batch", "tok/s", "step ms", "host ms", "hit rate",
                                         "H2D GB/s", "copy % of ceiling", "stall %", "host wait %"], rows, md)


def simulate(args) -> None:
    """CPU: hit rates of both victim policies under both query models (default NOSA constants)."""
    torch.set_num_threads(1)
    cfg = NosaConfig()
    shape = ModelShape(1, 8, 2, 64, torch.float32)
    rows = []
    for qm in args.query_models:
        for policy in ("nosa", "infllmv2"):
            for victim in args.sim_victims.split(","):
                for slots in (int(x) for x in args.sim_slots.split(",")):
                    for prefetch in ((True, False) if policy == "nosa" and slots > 64 else (False,)):
                        knobs = OffloadKnobs(gpu_slots=slots, victim_policy=victim, prefetch=prefetch)
                        T = args.sim_context
                        rt = NosaRuntime(shape, cfg, knobs, host_capacity_bytes=2 * host_bytes_per_request(
                            shape, cfg, T + args.sim_steps + 2), max_requests=2, max_seq_len=T + args.sim_steps + 2,
                            selection_policy=policy)
                        ids = ["x", "y"]
                        for i, rid in enumerate(ids):
                            rt.begin_request_synthetic(rid, T - 37 * i, seed=i)
                        work = Workload(shape, 2, qm, args.drift_rho, "cpu")
                        for step in range(args.sim_steps):
                            if step == args.sim_warmup:
                                rt.reset_stats()
                            q, k, v, c = work.next(0)
                            rt.append(0, ids, k, v, c)
                            rt.attend(0, ids, q)
                            rt.step_boundary()
                        s = rt.snapshot().totals
                        rows.append([qm, policy, victim, slots, prefetch, round(s.hit_rate, 4),
                                     round(s.misses / (2 * 2 * (args.sim_steps - args.sim_warmup)), 2)])
                        print(rows[-1], flush=True)
    md: list[str] = [f"CPU simulation: context {args.sim_context}, {args.sim_steps - args.sim_warmup} steps after "
                     f"{args.sim_warmup} warm-up, 2 requests, Hkv 2, default NOSA constants, "
                     f"drift rho {args.drift_rho}", ""]
    table("hit rate by victim policy", ["queries", "selection", "victims", "slots", "prefetch", "hit rate",
                                        "misses / (request, head, step)"], rows, md)
    if args.out:
        write_markdown(args.out, md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1b,8b", help="comma list of 1b, 8b")
    p.add_argument("--contexts", default="16k,32k,64k,128k")
    p.add_argument("--configs", default="a,b,c,d,a*",
                   help="comma list of a, b, c, d, dg (d as one CUDA graph a step, our kernel), a* (a with every block "
                        "hit), a+ / b+ (one H2D stream per micro-batch), "
                        "ac (max view: a, and the requests spare HBM holds fully resident beside it, one step for "
                        "both), ad (the same, each stepping in its own loop)")
    p.add_argument("--ac-host-batches", default="",
                   help="config ac: comma list of host-homed batches (each capped at (a)'s largest; default: the "
                        "largest): fewer host-homed requests make the PCIe-bound part as short as the HBM-homed one")
    p.add_argument("--views", default="common,max")
    p.add_argument("--query-models", default="iid,drift")
    p.add_argument("--drift-rho", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--gpu-slots", type=int, default=80)
    p.add_argument("--transfer-mode", default="zero_copy", choices=["zero_copy", "copy_engine"])
    p.add_argument("--victim-policy", default="lru", choices=["eviction_score", "lru"])
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="capture each layer's runtime work in CUDA graphs (configs a, b, c, a*)")
    p.add_argument("--step-graphs", action="store_true",
                   help="each decode step as one CUDA graph (StepGraphs; implies --cuda-graphs; copy times are "
                        "then not measured). Warm-up runs >= 2 blocks of steps so that every kind of step is "
                        "captured before timing")
    p.add_argument("--inline-gather", action="store_true",
                   help="decode() gathers misses on the compute stream inside the layer's one graph (no timings)")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="cut each batch into N parts on N CUDA streams, interleaved per layer, so that one part's "
                        "copies overlap another's compute (configs a, b: the offloading ones that miss)")
    p.add_argument("--split-append", action="store_true",
                   help="append() then attend() per layer (results before 2026-11-28 evening) instead of decode()")
    p.add_argument("--ck-bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="store K~ in bf16 (half the memory and selection reads)")
    p.add_argument("--topk-search", choices=["radix", "binary"], default="radix",
                   help="how the top-k kernel finds its cuts: radix select (the default, kernels/topk.py "
                        "RADIX_SELECT) or the 32-step binary search")
    p.add_argument("--pdl", action="store_true",
                   help="the decode chain's kernels as programmatic dependent launches (kernels/pdl.py)")
    p.add_argument("--emulate-host-gib", type=float, default=0.0,
                   help="size (a)/(b)'s batches for a host of this many GiB (x 0.85, as the 256 GiB line), "
                        "running the requests the pinned store cannot hold on prompt blocks shared with the "
                        "ones it does: the copies move the same bytes, from shared host addresses")
    p.add_argument("--alias-prompts", action="store_true",
                   help="every (a)/(b) request shares the first one's prompt blocks: run beside a plain run of "
                        "the same batch, it bounds what --emulate-host-gib's sharing changes")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--host-gib", type=float, default=0.0, help="pinned host store (0: 85%% of available RAM)")
    p.add_argument("--gpu-reserve-gib", type=float, default=6.0)
    p.add_argument("--simulate", action="store_true", help="CPU hit-rate simulation instead of the GPU benchmark")
    p.add_argument("--sim-context", type=int, default=16384)
    p.add_argument("--sim-steps", type=int, default=400)
    p.add_argument("--sim-warmup", type=int, default=50)
    p.add_argument("--sim-slots", default="64,80,128", help="comma list of GPU slots per head to simulate")
    p.add_argument("--sim-victims", default="eviction_score,lru")
    p.add_argument("--out", default="")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke run of the plumbing (tiny --contexts 4k, --host-gib / --gpu-gib small)")
    p.add_argument("--gpu-gib", type=float, default=0.0, help="device memory budget (0: all but the reserve)")
    args = p.parse_args(argv)
    args.configs = args.configs.split(",")
    try:
        args.ac_host_batches = [int(b) for b in args.ac_host_batches.split(",") if b]
    except ValueError:
        p.error(f"--ac-host-batches={args.ac_host_batches!r}: a comma list of positive ints")
    if any(b < 1 for b in args.ac_host_batches):
        p.error(f"--ac-host-batches={args.ac_host_batches}: allowed range is >= 1")
    topk_module.RADIX_SELECT = args.topk_search == "radix"
    pdl_module.ENABLED = args.pdl or pdl_module.ENABLED  # NOTE: NOSA_PDL=1 counts too
    unknown = [c for c in args.configs if c not in ("a", "b", "c", "d", "dg", "a*", "a+", "b+", "ac", "ad")]
    if unknown:
        p.error(f"--configs: {unknown} not in a, b, c, d, dg, a*, a+, b+, ac, ad")
    if args.emulate_host_gib < 0:
        p.error(f"--emulate-host-gib={args.emulate_host_gib}: allowed range is >= 0 (0: off)")
    if args.micro_batches < 2 and any(c.endswith("+") for c in args.configs):
        p.error("--configs a+ / b+: one H2D stream per micro-batch needs --micro-batches >= 2")
    args.views = args.views.split(",")
    args.query_models = args.query_models.split(",")
    if args.step_graphs:
        if args.split_append:
            p.error("--step-graphs: steps through decode() (not with --split-append)")
        args.cuda_graphs = True
        args.warmup = max(args.warmup, 2 * NosaConfig().block_size + 2)  # NOTE: each kind of step seen twice
    if args.simulate:
        simulate(args)
        return 0
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("decode_throughput: needs a CUDA GPU (or --simulate / --device cpu on CPU)", file=sys.stderr)
        return 2
    import psutil

    from nosa_sglang.kernels.pinned import alloc_pinned

    host_gib = args.host_gib or 0.85 * psutil.virtual_memory().available / GiB
    t0 = time.perf_counter()
    while True:  # the driver may refuse to pin that much (it did at 90 GiB of 125 on an H200 host)
        try:
            host_buffer = alloc_pinned((int(host_gib * GiB),), torch.uint8)
            break
        except Exception as err:  # noqa: BLE001 - CuPy raises CUDARuntimeError, torch RuntimeError
            if host_gib < 2 or "memory" not in str(err).lower():
                raise
            print(f"pinning {host_gib:.1f} GiB failed ({type(err).__name__}); trying {0.8 * host_gib:.1f} GiB")
            host_gib *= 0.8
    host_buffer.zero_()  # finite K/V for every block the synthetic requests fetch
    device_name = torch.cuda.get_device_name() if cuda else "cpu (smoke run)"
    md = [f"# decode throughput ({device_name}, torch {torch.__version__})", "",
          f"pinned host store {host_gib:.1f} GiB (allocated + zeroed in {time.perf_counter() - t0:.1f} s); "
          f"steps {args.steps} after {args.warmup} warm-up; gpu_slots {args.gpu_slots}; transfer {args.transfer_mode}; "
          f"prefetch {args.prefetch}; victims {args.victim_policy}; K~ {'bf16' if args.ck_bf16 else 'fp32'}; "
          f"CUDA graphs {'whole steps' if args.step_graphs else args.cuda_graphs}; inline gather {args.inline_gather}; micro-batches {args.micro_batches}; "
          f"top-k search {args.topk_search}; launches {'pdl' if args.pdl else 'plain'}; "
          f"drift rho {args.drift_rho}"
          + (f"; host store {args.emulate_host_gib:g} GiB emulated (requests the pinned store cannot hold share "
             f"prompt blocks with those it does)" if args.emulate_host_gib else ""), ""]
    ceil = measure_ceilings(host_buffer) if cuda else {"h2d_copy_gbs": 1.0, "gather_zero_copy_gbs": 0.0,
                                                       "gather_copy_engine_gbs": 0.0}
    md += [f"ceilings: pinned H2D copy {ceil['h2d_copy_gbs']:.1f} GB/s; gather of random 16 KiB runs: zero_copy "
           f"{ceil['gather_zero_copy_gbs']:.1f} GB/s, copy_engine {ceil['gather_copy_engine_gbs']:.1f} GB/s", ""]
    print("\n".join(md), flush=True)
    total = torch.cuda.mem_get_info()[1] if cuda else 0
    gpu_cap = int(args.gpu_gib * GiB) if args.gpu_gib else int(total - args.gpu_reserve_gib * GiB)
    host_cap = host_buffer.numel()
    for name in args.model.split(","):
        for ctx in args.contexts.split(","):
            bench_one(args, name, CONTEXTS[ctx], host_buffer, host_cap, gpu_cap, ceil, md)
            if args.out:
                write_markdown(args.out, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
