"""Diagnostic (GPU): sparse decode launch variants against the byte roofline.

benchmarks/kernels.py found the 1B-like layer at B 16 at 52 % of its roofline (30 us for 16 us of
bytes) while every other B >= 16 shape ran at 75-95 %: 256 short programs plus a second launch that
merges their splits. This sweeps, in one process on the same inputs, slot-list entries per loop step
(`ENTRIES_PER_STEP`: more K/V rows in flight), split counts and warps/stages;
every variant is checked equal to the default first.

Measured 2026-11-29 (H200, kernels.md): two entries a step moved every B >= 64 shape to 88-101 % and
the 8B-like B 16 to 81 %; the 1B-like B 16 stayed latency-bound (29.5 us, 54.5 %, with the shipped
merge launch). Merging the splits in the decode
kernel instead (the last split of a group, found by an atomic count, merging in a loop) was measured
too and lost: equal at B 16, 2.7x slower at B 1 (64 splits merged serially: 26 vs 9.7 us). Loading a
short split's whole slot list before the loop (so no list load sits between a step and its K/V loads)
was measured and removed too: 1B-like B 16 29.5 -> 30.8 us with two entries, 46 us with four.

    python scripts/sweep_decode_variants.py
    python scripts/sweep_decode_variants.py --pdl   # the shipped launch, plain or as programmatic
                                                    # dependent launches (kernels/pdl.py)
"""
import sys

import torch

sys.path.insert(0, "benchmarks")
from kernels import CFG, SHAPES, bench_graph, d2d_bandwidth, decode_bytes, decode_inputs, rotating  # noqa: E402
from report import table  # noqa: E402

from nosa_sglang.kernels import pdl as pdl_module  # noqa: E402
from nosa_sglang.kernels import sparse_decode  # noqa: E402

VARIANTS = [(1, 4, 2), (2, 4, 2), (2, 4, 3), (2, 8, 2), (4, 4, 2), (4, 8, 2)]  # entries a step, warps, stages


def set_variant(entries, warps, stages) -> None:
    sparse_decode.ENTRIES_PER_STEP = entries
    sparse_decode.DECODE_LAUNCH.update(num_warps=warps, num_stages=stages)


def main() -> int:
    default = (sparse_decode.ENTRIES_PER_STEP, sparse_decode.DECODE_LAUNCH["num_warps"],
               sparse_decode.DECODE_LAUNCH["num_stages"])
    pdl_sweep = "--pdl" in sys.argv[1:]
    variants = [(*default, False), (*default, True)] if pdl_sweep else [(*v, False) for v in VARIANTS]
    bw = d2d_bandwidth()
    print(f"device-to-device copy bandwidth (read + write) {bw:.0f} GB/s", flush=True)
    rows, md = [], []
    for shape, (hq, hkv, d) in SHAPES.items():
        for B in (1, 16, 64, 128):
            q, ks, vs, cs, sl, lists = decode_inputs(B, hq, hkv, d, 16384)
            floor_us = decode_bytes(B, hq, hkv, d, CFG.topk_blocks) / (bw * 1e9) * 1e6
            auto = sparse_decode.auto_num_splits(B, hkv, CFG.topk_blocks, q.device)
            split_set = sorted({auto, *((4, 8, 16) if B == 16 else ())})
            set_variant(*default)
            pdl_module.ENABLED = False
            want = {ns: sparse_decode.sparse_decode_attention(q, ks, vs, cs, *lists[0], sl, num_splits=ns)
                    for ns in split_set}
            for *variant, pdl in variants:
                set_variant(*variant)
                pdl_module.ENABLED = pdl
                for ns in split_set:
                    out = sparse_decode.sparse_decode_attention(q, ks, vs, cs, *lists[0], sl, num_splits=ns)
                    if pdl_sweep:  # NOTE: the same kernels, launched differently: bit for bit
                        assert torch.equal(out, want[ns]), (shape, B, "pdl" if pdl else "plain", ns)
                    err = ((out.float() - want[ns].float()).abs().max() / want[ns].float().abs().max()).item()
                    assert err < 1e-2, (shape, B, variant, ns, err)
                    us = 1e3 * bench_graph(rotating([
                        lambda s=s, b=b, ns=ns: sparse_decode.sparse_decode_attention(q, ks, vs, cs, s, b, sl, num_splits=ns)
                        for s, b in lists]))
                    entries, warps, stages = variant
                    rows.append([shape, B, ns, entries, f"w{warps} s{stages}", "pdl" if pdl else "plain",
                                 round(us, 1), round(floor_us, 1), round(100 * floor_us / us, 1)])
                    print(rows[-1], flush=True)
            del q, ks, vs, cs, lists
            torch.cuda.empty_cache()
    set_variant(*default)
    pdl_module.ENABLED = False
    table("Sparse decode launch variants (context 16K, CUDA graph replay, L2 flushed)",
          ["shape", "batch", "splits", "entries/step", "warps/stages", "launch", "us", "roofline us",
           "% roofline"],
          rows, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
