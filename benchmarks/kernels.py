"""Attention and selection kernels on one GPU, against ceilings measured in the same run.

    python benchmarks/kernels.py --out benchmarks/results/kernels.md [--quick]

Tables: (a) device-to-device copy bandwidth (read + write), the decode roofline's denominator;
(b) sparse decode (64 selected blocks of 64 tokens per KV head) vs its byte roofline and vs dense
decode over the whole context (flash-attn if importable, else torch SDPA, on a contiguous cache);
(c) a split-K sweep at batch 1 and 16; (d) decode selection (stage-1 scores + eviction pooling + top-k,
Triton vs torch top-k) vs the sparse attention it feeds; (e) sparse prefill (selection + attention) vs
dense causal prefill. Shapes: 1B-like (Hq 16, Hkv 2, d 128) and 8B-like (Hq 32, Hkv 8, d 128), bf16.
Timing (--timing): `graph` (default) is the GPU time of each call replayed in a CUDA graph, as the
runtime and SGLang run decode, with L2 flushed before every call; `launch` is triton.testing.do_bench of
eager calls (tables before 2026-11-29 evening), which for sub-100 us kernels mostly measures the Python
wrappers and launches. Warm-up first, slot lists rotated among several random draws over a pool larger
than L2. A call that cannot be captured falls back to `launch` and is named under the tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--dry-run" in sys.argv:  # CPU check of this script: Triton interpreter, tiny shapes
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F
import triton

from report import table, write_markdown
from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels import sparse_decode as decode_module
from nosa_sglang.kernels import sparse_prefill as prefill_module
from nosa_sglang.kernels import topk as topk_module
from nosa_sglang.kernels.selection import decode_block_scores, eviction_block_scores, select_topk
from nosa_sglang.kernels.sparse_decode import auto_num_splits, sparse_decode_attention
from nosa_sglang.kernels.sparse_prefill import select_blocks_prefill, sparse_prefill_attention
from nosa_sglang.runtime.graph_capture import capture

try:
    from flash_attn import flash_attn_func, flash_attn_with_kvcache  # type: ignore
except ImportError:  # the lent GPU machine has no flash-attn wheel
    flash_attn_func = flash_attn_with_kvcache = None

GiB = 1 << 30
DEVICE = "cuda"
CFG = NosaConfig()
SHAPES = {"1B-like": (16, 2, 128), "8B-like": (32, 8, 128)}
DTYPE = torch.bfloat16
ROTATE = 4
DENSE_CACHE_LIMIT = 36 * GiB  # skip a dense baseline whose K+V cache would not fit beside the rest
LAUNCH_SWEEP = [(4, 2), (4, 3), (8, 2), (8, 3)]  # (num_warps, num_stages)
DEADLINE = [float("inf")]  # time.time() after which remaining configs are skipped (--budget-s)


def out_of_time() -> bool:
    return time.time() > DEADLINE[0]


TIMING = ["graph"]  # "graph": GPU time of CUDA-graph replays; "launch": do_bench of eager calls (--timing)
FLUSH_BYTES = 128 << 20  # beyond the H100/H200 L2 (50-60 MiB)
FELL_BACK: list[str] = []  # calls timed eagerly because their capture failed


def bench(fn, rep: int = 200, timing: str | None = None) -> float:
    """Median ms of fn() on a cold L2 (both timings write a buffer larger than L2 before every call);
    `timing` overrides --timing for one call."""
    if DEVICE == "cpu":  # --dry-run: one call, wall clock
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    if (timing or TIMING[0]) == "graph":
        try:
            return bench_graph(fn)
        except torch.OutOfMemoryError:
            raise  # the callers report it as the configuration's result
        except RuntimeError as e:  # not capturable (a host sync inside): time it eagerly, say so
            FELL_BACK.append(f"{getattr(fn, '__name__', 'call')}: {str(e).splitlines()[0][:120]}")
            torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def bench_graph(fn, calls: int = 8, reps: int = 15) -> float:
    """GPU ms of one fn() without its host launch cost, as under the runtime's and SGLang's CUDA graphs:
    a graph of `calls` x (L2 flush, fn) minus a graph of the flushes alone, replayed `reps` times (median).
    Eager timing (do_bench) of a sub-100 us kernel measures the Python wrapper and the launches instead."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, fills the allocator) off the default stream
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for with_fn in (True, False):
        g = torch.cuda.CUDAGraph()
        with capture(g, None):  # NOTE: the collector paused (runtime/graph_capture.py)
            for _ in range(calls):
                flush.zero_()
                if with_fn:
                    fn()
        graphs.append(g)

    def replay_ms(g) -> float:
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[reps // 2]

    both, flushes = (replay_ms(g) for g in graphs)
    return max(both - flushes, 0.0) / calls


def pool_bytes() -> int:
    """Bytes that rotated inputs span: far beyond the 50 MiB L2 (tiny in a dry run)."""
    return 256 << 20 if DEVICE == "cuda" else 1 << 20


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def rotating(fns):
    state = {"i": 0}

    def call():
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    return call


def d2d_bandwidth() -> float:
    """GB/s of a 1 GiB device copy, counting bytes read plus bytes written."""
    size = GiB if DEVICE == "cuda" else 1 << 24
    x = torch.randn(size // 2, device=DEVICE, dtype=DTYPE)
    y = torch.empty_like(x)
    # NOTE: eagerly: a captured device copy becomes a copy-engine node (2.7 vs 4.2 TB/s)
    ms = bench(lambda: y.copy_(x), timing="launch")
    return 2 * size / (ms * 1e-3) / 1e9


def decode_inputs(B, hq, hkv, d, ctx):
    """Slot pool with B*Hkv*64 live slots (plus spare) and ROTATE random slot lists over it."""
    bs, topk = CFG.block_size, CFG.topk_blocks
    n_blocks = ctx // bs
    n_slots = max(B * hkv * topk, pool_bytes() // (bs * d * 2)) + 64
    k_slots = torch.randn(n_slots, bs, d, device=DEVICE, dtype=DTYPE)
    v_slots = torch.randn(n_slots, bs, d, device=DEVICE, dtype=DTYPE)
    c_slots = torch.randn(n_slots, bs, device=DEVICE) * 0.5
    q = torch.randn(B, hq, d, device=DEVICE, dtype=DTYPE)
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=DEVICE)
    lists = []
    for _ in range(ROTATE):
        # the sink, the 16 local blocks and the current one, plus random older blocks: 64 distinct
        rand = torch.rand(B, hkv, n_blocks, device=DEVICE).argsort(-1)[..., :topk]
        blk = torch.sort(rand, -1).values.to(torch.int32)
        slots = torch.randperm(n_slots, device=DEVICE)[: B * hkv * topk].view(B, hkv, topk).to(torch.int32)
        lists.append((slots, blk))
    return q, k_slots, v_slots, c_slots, seq_lens, lists


def decode_bytes(B, hq, hkv, d, n_entries) -> int:
    per_entry = CFG.block_size * (2 * d * 2 + 4) + 8  # K + V rows, c, slot and block id
    return B * hkv * n_entries * per_entry + 2 * B * hq * d * 2 + B * 4


def dense_decode_ms(B, hq, hkv, d, ctx) -> tuple[str, float | str]:
    cache_bytes = 2 * B * hkv * ctx * d * 2
    if cache_bytes > DENSE_CACHE_LIMIT:
        return "-", "skipped (memory)"
    try:
        if flash_attn_with_kvcache is not None:
            k = torch.randn(B, ctx, hkv, d, device=DEVICE, dtype=DTYPE)
            v = torch.randn_like(k)
            q = torch.randn(B, 1, hq, d, device=DEVICE, dtype=DTYPE)
            ms = bench(lambda: flash_attn_with_kvcache(q, k, v))
            name = "flash-attn"
        else:
            k = torch.randn(B, hkv, ctx, d, device=DEVICE, dtype=DTYPE)
            v = torch.randn_like(k)
            q = torch.randn(B, hq, 1, d, device=DEVICE, dtype=DTYPE)
            ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            name = "sdpa"
        return name, ms
    except torch.OutOfMemoryError:
        return "-", "OOM"


def dense_own_kernel_ms(B, hq, hkv, d, ctx) -> float | str:
    """Dense decode through our own kernel: every block of the context listed, K/V contiguous per head."""
    if 2 * B * hkv * ctx * d * 2 > DENSE_CACHE_LIMIT:
        return "skipped (memory)"
    nb = ctx // CFG.block_size
    try:
        k = torch.randn(B * hkv * nb, CFG.block_size, d, device=DEVICE, dtype=DTYPE)
        v = torch.randn_like(k)
        c = torch.zeros(B * hkv * nb, CFG.block_size, device=DEVICE)
        slots = torch.arange(B * hkv * nb, device=DEVICE, dtype=torch.int32).view(B, hkv, nb)
        blk = torch.arange(nb, device=DEVICE, dtype=torch.int32).expand(B, hkv, nb).contiguous()
        q = torch.randn(B, hq, d, device=DEVICE, dtype=DTYPE)
        sl = torch.full((B,), ctx, dtype=torch.int32, device=DEVICE)
        return bench(lambda: sparse_decode_attention(q, k, v, c, slots, blk, sl))
    except torch.OutOfMemoryError:
        return "OOM"


def decode_config(shape, hq, hkv, d, B, ctx, bw, sweep: bool):
    """(row, sweep rows, selection row) of one shape / context / batch; its tensors die on return."""
    q, ks, vs, cs, sl, lists = decode_inputs(B, hq, hkv, d, ctx)
    call = rotating([lambda s=s, b=b: sparse_decode_attention(q, ks, vs, cs, s, b, sl) for s, b in lists])
    ms = bench(call)
    floor_ms = decode_bytes(B, hq, hkv, d, CFG.topk_blocks) / (bw * 1e9) * 1e3
    name, dense = dense_decode_ms(B, hq, hkv, d, ctx)
    empty_cache()  # the dense caches are gone with those calls' locals
    own = dense_own_kernel_ms(B, hq, hkv, d, ctx)
    empty_cache()
    dense_floor = 2 * B * hkv * ctx * d * 2 / (bw * 1e9) * 1e3
    splits = auto_num_splits(B, hkv, CFG.topk_blocks, q.device)
    row = [shape, ctx // 1024, B, splits, ms * 1e3, floor_ms * 1e3, 100 * floor_ms / ms,
           name, dense if isinstance(dense, str) else dense * 1e3, own if isinstance(own, str) else own * 1e3,
           dense_floor * 1e3, "-" if isinstance(dense, str) else dense / ms, "-" if isinstance(own, str) else own / ms]
    sweep_rows = []
    if sweep and B in (1, 16):
        for ns in (1, 2, 4, 8, 16, 32):
            t = bench(rotating([lambda s=s, b=b, ns=ns: sparse_decode_attention(q, ks, vs, cs, s, b, sl, num_splits=ns)
                                for s, b in lists]), rep=100)
            sweep_rows.append([shape, B, ns, "default", t * 1e3, 100 * floor_ms / t])
    if sweep and B in (16, 64):
        default = dict(decode_module.DECODE_LAUNCH)
        for warps, stages in LAUNCH_SWEEP:
            decode_module.DECODE_LAUNCH.update(num_warps=warps, num_stages=stages)
            t = bench(call, rep=100)
            sweep_rows.append([shape, B, splits, f"w{warps} s{stages}", t * 1e3, 100 * floor_ms / t])
        decode_module.DECODE_LAUNCH.update(default)
    return row, sweep_rows, run_selection(shape, hq, hkv, d, B, ctx, ms, bw)


def run_decode(md, bw, batches, contexts):
    rows, sel_rows, sweep_rows = [], [], []
    for shape, (hq, hkv, d) in SHAPES.items():
        for ctx in contexts:
            for B in batches:
                if out_of_time():
                    rows.append([shape, ctx // 1024, B, "skipped (time budget)"])
                    continue
                row, sweep, sel = decode_config(shape, hq, hkv, d, B, ctx, bw, sweep=ctx == contexts[0])
                rows.append(row)
                sweep_rows += sweep
                sel_rows.append(sel)
                empty_cache()
    table("Sparse decode (64 blocks x 64 tokens per KV head, bf16) vs byte roofline and dense decode",
          ["shape", "ctx K", "batch", "splits", "sparse us", "roofline us", "% roofline", "dense impl", "dense us",
           "dense (our kernel, all blocks) us", "dense roofline us", "dense / sparse", "dense ours / sparse"],
          rows, md)
    table("Split-K and launch sweep (context %dK)" % (contexts[0] // 1024),
          ["shape", "batch", "num_splits", "warps/stages", "us", "% roofline"], sweep_rows, md)
    table("Decode selection (stage-1 + eviction pool + top-k) vs the sparse attention it feeds",
          ["shape", "ctx K", "batch", "scores us", "E pool us", "topk triton us", "topk triton binary search us",
           "topk torch (stable sort) us",
           "bare torch.topk x2 us", "selection us",
           "attention us", "selection / attention %", "K~ byte floor / attention %"], sel_rows, md)


def run_selection(shape, hq, hkv, d, B, ctx, attn_ms, bw):
    cmax = CFG.num_chunks(ctx)
    sets = max(1, min(ROTATE, pool_bytes() // max(1, B * cmax * hkv * d * 2)))
    ck = [torch.randn(B, cmax, hkv, d, device=DEVICE, dtype=DTYPE) for _ in range(sets)]
    ce = torch.randn(B, cmax, hkv, device=DEVICE)
    q = torch.randn(B, hq, d, device=DEVICE, dtype=DTYPE)
    sl = torch.full((B,), ctx, dtype=torch.int32, device=DEVICE)
    n = torch.full((B,), cmax, dtype=torch.int32, device=DEVICE)
    nb = CFG.num_blocks(ctx)
    t_s = bench(rotating([lambda x=x: decode_block_scores(q, x, n, sl, CFG, num_blocks=nb) for x in ck]))
    t_e = bench(lambda: eviction_block_scores(ce, n, sl, CFG, num_blocks=nb))
    S = decode_block_scores(q, ck[0], n, sl, CFG, num_blocks=nb)
    E = eviction_block_scores(ce, n, sl, CFG, num_blocks=nb)
    t_kt = bench(lambda: select_topk(S, E, sl, CFG, impl="triton"))
    radix = topk_module.RADIX_SELECT
    topk_module.RADIX_SELECT = False  # the 32-step binary search the radix select replaced (packed rows use it)
    t_kb = bench(lambda: select_topk(S, E, sl, CFG, impl="triton"))
    topk_module.RADIX_SELECT = radix
    t_kp = bench(lambda: select_topk(S, E, sl, CFG, impl="torch"))
    # bare torch.topk twice: a lower bound for any torch glue (it has no tie rule and no masking)
    t_raw = bench(lambda: (torch.topk(S, CFG.query_blocks, dim=-1), torch.topk(E, CFG.topk_blocks, dim=-1)))
    total = t_s + t_e + min(t_kt, t_kp)
    floor = B * cmax * hkv * d * 2 / (bw * 1e9) * 1e3
    return [shape, ctx // 1024, B, t_s * 1e3, t_e * 1e3, t_kt * 1e3, t_kb * 1e3, t_kp * 1e3, t_raw * 1e3, total * 1e3,
            attn_ms * 1e3,
            100 * total / attn_ms, 100 * floor / attn_ms]


def residency_ms(hkv: int, B: int, slots: int, n_blocks: int, fused: bool) -> float:
    """Median ms of one layer's residency diff (GpuSlotCache.resolve with the misses' bias copy) for B
    requests, `slots` regular slots per head and NOSA-sized selections over `n_blocks` blocks, the slot
    maps warmed up by the same random selections it is timed on (misses every call)."""
    from nosa_sglang.runtime.slot_cache import GpuSlotCache
    from nosa_sglang.runtime.victim import make_victim_policy

    K, bs = CFG.topk_blocks, CFG.block_size
    cache = GpuSlotCache(1, B, hkv, slots, bs, 8, DTYPE, n_blocks, torch.device(DEVICE))
    cache.fused_diff = fused
    rows = torch.arange(B, device=DEVICE)
    base = cache.slot_base(rows)
    c = torch.rand(B, hkv, n_blocks * bs, device=DEVICE)
    policy = make_victim_policy("lru")
    sels = [torch.rand(B, hkv, n_blocks, device=DEVICE).topk(K, dim=-1).indices.sort(dim=-1).values
            for _ in range(8)]
    step = torch.zeros((), dtype=torch.int32, device=DEVICE)

    def one(sel):
        view = cache.rows_view(0, rows, (0, B))
        cache.resolve(0, view, sel, None, policy, step.add_(1), base, bias=(c, rows))

    for sel in sels:  # fill the slots
        one(sel)
    return bench(rotating([lambda x=x: one(x) for x in sels]))


def run_residency(md, batches, configs=((80, 16384), (257, 16384), (80, 131072))):
    """The slot cache's residency diff: the fused kernel against the torch statement it replaced.
    configs: (slots per head, context) pairs."""
    rows = []
    for shape, (_, hkv, _) in SHAPES.items():
        for B in batches:
            for slots, ctx in configs:
                if out_of_time():
                    rows.append([shape, B, slots, ctx // 1024, "skipped (time budget)"])
                    continue
                nb = CFG.num_blocks(ctx)
                t_torch, t_fused = (residency_ms(hkv, B, slots, nb, fused) for fused in (False, True))
                rows.append([shape, B, slots, ctx // 1024, t_torch * 1e3, t_fused * 1e3, t_torch / t_fused])
                empty_cache()
    table("Residency diff per layer (hits, misses, victims, map updates, the misses' biases; LRU)",
          ["shape", "batch", "slots/head", "ctx K", "torch ops us", "fused kernel us", "speedup"], rows, md)


def dense_prefill_ms(q, k, v, G) -> tuple[str, float | str]:
    try:
        if flash_attn_func is not None:
            return "flash-attn", bench(lambda: flash_attn_func(q[None], k[None], v[None], causal=True), rep=300)
        qh = q.transpose(0, 1)[None]
        kh = k.transpose(0, 1).repeat_interleave(G, 0)[None]
        vh = v.transpose(0, 1).repeat_interleave(G, 0)[None]
        return "sdpa", bench(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True), rep=300)
    except torch.OutOfMemoryError:
        return "-", "OOM"


def prefill_config(shape, hq, hkv, d, T, sweep: bool):
    """(row, sweep rows) of one shape / prompt length; its tensors die on return."""
    q = torch.randn(T, hq, d, device=DEVICE, dtype=DTYPE)
    k = torch.randn(T, hkv, d, device=DEVICE, dtype=DTYPE)
    v = torch.randn(T, hkv, d, device=DEVICE, dtype=DTYPE)
    c = torch.randn(T, hkv, device=DEVICE) * 0.5
    blocks = select_blocks_prefill(q, k, c, CFG)
    t_sel = bench(lambda: select_blocks_prefill(q, k, c, CFG), rep=300)
    t_att = bench(lambda: sparse_prefill_attention(q, k, v, c, blocks, CFG.block_size), rep=300)
    sweep_rows = []
    if sweep:
        default = dict(prefill_module.PREFILL_LAUNCH)
        for warps, stages in LAUNCH_SWEEP:
            prefill_module.PREFILL_LAUNCH.update(num_warps=warps, num_stages=stages)
            t = bench(lambda: sparse_prefill_attention(q, k, v, c, blocks, CFG.block_size), rep=200)
            sweep_rows.append([shape, T // 1024, f"w{warps} s{stages}", t])
        prefill_module.PREFILL_LAUNCH.update(default)
    name, dense = dense_prefill_ms(q, k, v, hq // hkv)
    sparse = t_sel + t_att
    flops = 4 * T * min(T, CFG.topk_blocks * CFG.block_size) * d * hq
    row = [shape, T // 1024, t_sel, t_att, sparse, flops / (t_att * 1e-3) / 1e12, name, dense,
           "-" if isinstance(dense, str) else dense / sparse]
    return row, sweep_rows


def run_prefill(md, lengths):
    rows, sweep = [], []
    for shape, (hq, hkv, d) in SHAPES.items():
        for T in lengths:
            if out_of_time():
                rows.append([shape, T // 1024, "skipped (time budget)"])
                continue
            row, sweep_rows = prefill_config(shape, hq, hkv, d, T, sweep=T == lengths[0])
            rows.append(row)
            sweep += sweep_rows
            empty_cache()
    table("Sparse prefill (selection + attention, bf16) vs dense causal prefill",
          ["shape", "T K", "selection ms", "attention ms", "sparse ms", "attention TFLOP/s (useful)", "dense impl",
           "dense ms", "dense / sparse"], rows, md)
    table("Sparse prefill attention launch sweep", ["shape", "T K", "warps/stages", "attention ms"], sweep, md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the tables as markdown to this file")
    ap.add_argument("--quick", action="store_true", help="one context, batches 1/16, prefill 16K only")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU check of the script (interpreter, tiny shapes)")
    ap.add_argument("--timing", choices=("graph", "launch"), default="graph",
                    help="graph: GPU time under CUDA-graph replay (default); launch: do_bench of eager calls "
                         "(results before 2026-11-29 evening), which includes the wrappers' host time")
    ap.add_argument("--budget-s", type=float, default=320.0,
                    help="skip the configs that would start after this many seconds (default 320)")
    args = ap.parse_args(argv)
    global DEVICE, CFG, SHAPES
    TIMING[0] = args.timing
    if args.dry_run:
        DEVICE, SHAPES = "cpu", {"tiny": (4, 2, 64)}
        CFG = NosaConfig(block_size=16, kernel_stride=4, kernel_size=8, init_blocks=1, local_blocks=2,
                         query_blocks=5, topk_blocks=8)
    elif not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    t0 = time.time()
    DEADLINE[0] = t0 + args.budget_s
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu dry run"
    md = [f"## Kernel benchmarks ({device_name}, torch {torch.__version__}, triton {triton.__version__}; "
          f"timing: {args.timing})", ""]
    bw = d2d_bandwidth()
    table("Ceiling", ["measure", "GB/s"], [["device-to-device copy, read + write", bw]], md)
    batches = [1, 16] if args.quick else [1, 16, 64, 128]
    contexts = [131072] if args.quick else [16384, 65536, 131072]
    lengths = [16384] if args.quick else [16384, 65536]
    if args.dry_run:
        batches, contexts, lengths = [1, 16], [256, 512], [200]
    run_decode(md, bw, batches, contexts)
    if args.dry_run:
        run_residency(md, [2], ((12, 256),))
    else:
        run_residency(md, [16, 64])
    if not args.skip_prefill:
        run_prefill(md, lengths)
    if FELL_BACK:
        md += ["", "Timed eagerly (capture failed): " + "; ".join(FELL_BACK), ""]
    md.append(f"total wall time {time.time() - t0:.0f} s")
    print(md[-1])
    if args.out:
        write_markdown(args.out, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
