"""Diagnostic (GPU): the zero-copy gather on the runtime's padded miss lists, per live items a loop step.

The runtime's per-layer miss copies are small (1B-like 128K drift, 3 micro-batches: ~90 live runs of
16 KiB in a list of 768; 8B-like 128K B 3: ~180 in 1536) and moved at ~38 GB/s over a step against
~49 GB/s for large gathers; kernels_transfer.md had random gathers of 256 runs at 61 % of the pinned
ceiling. A copy program keeps 2 x CHUNK words in flight per live item; `LIVE_ITEMS_PER_STEP` items a
loop step keep that many times more. This times, in one process on the same host store, padded lists
like the runtime's and dense lists, for items 1/2/4 and grid bounds 32/64 (`MAX_PROGRAMS`: more
programs cost concurrent compute SMs, kernels_transfer.md table e); every variant's copy is checked.

    python scripts/sweep_copy_items.py [--host-gib 4]
"""
import argparse
import sys

import torch

sys.path.insert(0, "benchmarks")
from kernels_transfer import GiB, time_calls  # noqa: E402
from report import table  # noqa: E402

from nosa_sglang.kernels import block_copy  # noqa: E402
from nosa_sglang.kernels.pinned import alloc_pinned  # noqa: E402

RUN_ELEMS = 64 * 128  # one (block, KV head) run of K: 64 tokens x head_dim 128, bf16 = 16 KiB
CASES = [  # (name, list length, live runs): padded like the runtime's miss lists, then dense
    ("1B 128K drift, 3 micro-batches", 768, 90),
    ("1B 128K iid, 3 micro-batches", 768, 180),
    ("8B 128K drift, B 3", 1536, 180),
    ("8B 64K iid, B 7, 2 micro-batches", 1792, 400),
    ("dense 256", 256, 256),
    ("dense 4096", 4096, 4096),
]
VARIANTS = [(1, 32), (2, 32), (4, 32), (1, 64), (2, 64)]  # live items a step, MAX_PROGRAMS


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host-gib", type=float, default=4.0, help="pinned host store, K+V together")
    args = p.parse_args()
    n_host = int(args.host_gib * GiB / 2) // (2 * RUN_ELEMS)
    hk, hv = (alloc_pinned((n_host, RUN_ELEMS), torch.bfloat16) for _ in range(2))
    for h in (hk, hv):  # random data, a slice at a time from the GPU
        for lo in range(0, n_host, 1 << 14):
            h[lo : lo + (1 << 14)].copy_(torch.randn(min(1 << 14, n_host - lo), RUN_ELEMS, dtype=torch.bfloat16,
                                                     device="cuda"))
    torch.cuda.synchronize()
    h2d = torch.empty(GiB // 2, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(h2d, device="cuda")
    stream = torch.cuda.Stream()
    ms, _ = time_calls(lambda i: dev.copy_(h2d, non_blocking=True), torch.cuda.current_stream(), 5)
    ceiling = h2d.numel() / ms / 1e6
    print(f"pinned H2D copy {ceiling:.1f} GB/s", flush=True)
    default = (block_copy.LIVE_ITEMS_PER_STEP, block_copy.MAX_PROGRAMS)
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, n, live in CASES:
        gk, gv = (torch.empty(n, RUN_ELEMS, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        sets = []
        for _ in range(4):
            src = torch.full((n,), -1, dtype=torch.long)
            where = torch.randperm(n, generator=g)[:live]
            src[where] = torch.randperm(n_host, generator=g)[:live]
            sets.append((src.cuda(), torch.randperm(n, generator=g).cuda(), where))
        for items, programs in VARIANTS:
            block_copy.LIVE_ITEMS_PER_STEP, block_copy.MAX_PROGRAMS = items, programs
            with torch.cuda.stream(stream):
                dev_ms, _ = time_calls(lambda i: block_copy.launch_zero_copy(hk, hv, gk, gv, *sets[i % 4][:2]),
                                       stream, 20, warmup=3)
            src, dst, where = sets[0]
            with torch.cuda.stream(stream):
                block_copy.launch_zero_copy(hk, hv, gk, gv, src, dst)
            stream.synchronize()
            ok = torch.equal(gk[dst[where.cuda()]].cpu(), hk[src[where.cuda()].cpu()])
            gbs = 2 * live * RUN_ELEMS * 2 / dev_ms / 1e6
            rows.append([name, n, live, items, programs, round(1e3 * dev_ms, 1), round(gbs, 1),
                         round(100 * gbs / ceiling, 1), ok])
            print(rows[-1], flush=True)
        del gk, gv
    block_copy.LIVE_ITEMS_PER_STEP, block_copy.MAX_PROGRAMS = default
    table(f"Zero-copy gather of 16 KiB runs (K+V), padded and dense lists (pinned H2D ceiling {ceiling:.1f} GB/s)",
          ["case", "list", "live runs", "items/step", "programs", "us", "GB/s", "% ceiling", "ok"], rows, [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
