"""Diagnostic (GPU): rows per program of the decode top-k kernel (`topk.ROW_ELEMS`).

benchmarks/kernels.py measured the top-k at 61 us for 256 blocks (16K tokens, B 16) but 29 us for 2048
blocks (128K): with 256 blocks eight rows shared a program (ROW_ELEMS 2048 is sized for prefill's many
short rows), so a decode batch got few programs, each with eight rows' sequential searches. One row per
program won everywhere measured (2026-11-29); rows are now packed only beyond PACK_ROWS_PER_SM.

    python scripts/sweep_topk_rows.py            # rows per program
    python scripts/sweep_topk_rows.py --search   # one row per program: binary search against radix select
                                                 # at every batch (for topk.RADIX_ROWS_PER_SM)

Times `select_topk` (CUDA graph replay, L2 flushed: benchmarks/kernels.py's bench_graph) for each
variant, checks every variant selects the same blocks, and prints one table.
"""
import sys

import torch

sys.path.insert(0, "benchmarks")
from kernels import bench_graph  # noqa: E402
from report import table  # noqa: E402

from nosa_sglang.config import NosaConfig  # noqa: E402
from nosa_sglang.kernels import topk  # noqa: E402


def search() -> int:
    """The k-th-value search of the one-row-per-program kernel: 32 binary passes or 4 radix passes."""
    cfg, dev = NosaConfig(), torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows_out, md = [], []
    default, bound = topk.RADIX_SELECT, topk.RADIX_ROWS_PER_SM
    topk.RADIX_ROWS_PER_SM = 1 << 20  # NOTE: "radix" at every batch here, past the runtime's bound too
    for tokens in (16384, 65536, 131072):
        nb = cfg.num_blocks(tokens)
        for hkv, B in ((2, 1), (2, 16), (2, 64), (2, 128), (8, 3), (8, 16), (8, 64)):
            S = torch.randn((B, hkv, nb), generator=g, device=dev)
            E = torch.randn((B, hkv, nb), generator=g, device=dev)
            seq = torch.full((B,), tokens, dtype=torch.long, device=dev)
            times, ref = [], {}
            for radix in (False, True):
                topk.RADIX_SELECT = radix
                for policy in ("nosa", "infllmv2"):
                    out = topk.select_topk(S, E, seq, cfg, policy, impl="triton")
                    want = ref.setdefault(policy, out)
                    assert torch.equal(out, want), (tokens, B, policy, "radix" if radix else "binary")
                    times.append(round(1e3 * bench_graph(
                        lambda: topk.select_topk(S, E, seq, cfg, policy, impl="triton")), 1))
            topk.RADIX_SELECT = default
            rows_out.append([tokens // 1024, hkv, B, *times, f"{times[0] / times[2]:.2f}x"])
            print(rows_out[-1], flush=True)
    topk.RADIX_ROWS_PER_SM = bound
    table("top-k us, one row per program (CUDA graph replay, L2 flushed)",
          ["ctx K", "Hkv", "batch", "binary nosa", "binary infllmv2", "radix nosa", "radix infllmv2",
           "radix speed-up (nosa)"], rows_out, md)
    return 0


def main() -> int:
    if "--search" in sys.argv[1:]:
        return search()
    cfg, dev = NosaConfig(), torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows_out, md = [], []
    default, pack, radix = topk.ROW_ELEMS, topk.PACK_ROWS_PER_SM, topk.RADIX_SELECT
    topk.PACK_ROWS_PER_SM = 0  # NOTE: always pack, ROW_ELEMS // blocks rows per program
    topk.RADIX_SELECT = False  # NOTE: packing alone (radix select runs only at one row per program)
    for tokens in (16384, 65536, 131072):
        nb = cfg.num_blocks(tokens)
        block_nb = max(16, 1 << (nb - 1).bit_length())
        for hkv, B in ((2, 1), (2, 16), (2, 64), (2, 145), (8, 16), (8, 64)):
            S = torch.randn((B, hkv, nb), generator=g, device=dev)
            E = torch.randn((B, hkv, nb), generator=g, device=dev)
            seq = torch.full((B,), tokens, dtype=torch.long, device=dev)
            times, ref = [], None
            for rows in (1, 2, 4, 8, 16):
                if rows * block_nb > max(default, block_nb):
                    times.append("")
                    continue
                topk.ROW_ELEMS = rows * block_nb
                out = topk.select_topk(S, E, seq, cfg, "nosa", impl="triton")
                ref = out if ref is None else ref
                assert torch.equal(out, ref), (tokens, B, rows)
                times.append(round(1e3 * bench_graph(lambda: topk.select_topk(S, E, seq, cfg, "nosa", impl="triton")), 1))
            topk.ROW_ELEMS = default
            rows_out.append([tokens // 1024, hkv, B, *times])
            print(rows_out[-1], flush=True)
    topk.PACK_ROWS_PER_SM, topk.RADIX_SELECT = pack, radix
    table("top-k us by rows per program (CUDA graph replay, L2 flushed)",
          ["ctx K", "Hkv", "batch", "1 row", "2 rows", "4 rows", "8 rows", "16 rows"], rows_out, md)

    return 0


if __name__ == "__main__":
    sys.exit(main())
