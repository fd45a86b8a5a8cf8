"""Diagnostic (GPU): launch parameters of the stage-1 selection kernel (`_chunk_logits_kernel`) against
the time to read K~ once, to find why it runs far below HBM bandwidth.

    python scripts/sweep_chunk_logits.py [--quick]
    python scripts/sweep_chunk_logits.py --fp32    # fp32 K~: the product's variants and their error

For each shape it times the kernel alone (triton.testing.do_bench, L2 flushed) under BLOCK_C, warps,
stages and the number of chunk splits, checks every variant writes the same logits and row max/sum as
the default launch, and prints the time beside the K~ byte floor at the copy bandwidth measured here.
"""
import argparse
import itertools
import math

import torch
import triton

from nosa_sglang.kernels import selection as sel
from nosa_sglang.kernels._dispatch import num_sms

SHAPES = {"1b": (16, 2), "8b": (32, 8)}


def launch(q, ck, n_chunks, block_c, warps, stages, split_factor, dot="native"):
    B, hq, d = q.shape
    cmax, hkv = ck.shape[1], ck.shape[2]
    G = hq // hkv
    splits, per_split = sel.chunk_splits(cmax, B * hkv, q.device, block_c, split_factor)
    w = torch.empty((B, hkv, G, cmax), dtype=torch.float32, device=q.device)
    m = torch.empty((B, hkv, G, splits), dtype=torch.float32, device=q.device)
    s = torch.empty_like(m)

    def run():
        sel._chunk_logits_kernel[(B * hkv, splits)](
            q, ck, n_chunks, n_chunks, w, m, s, sel.LOG2E / math.sqrt(d), hkv, cmax, per_split,
            q.stride(0), q.stride(1), ck.stride(0), ck.stride(1), ck.stride(2),
            G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), HEAD_DIM=d, BLOCK_C=block_c, DOT=dot, HAS_ROWS=False,
            WAIT=False,
            num_warps=warps, num_stages=stages,
        )
    return run, w, m, s


def lse(m, s):
    mu = torch.where(m.isinf(), 0.0, m)
    mm = mu.amax(-1, keepdim=True)
    return mm.squeeze(-1) + torch.log2((s * torch.exp2(mu - mm)).sum(-1))


def fp32_sweep(hbm: float) -> None:
    """fp32 K~ (the server's default, the reference's scores): the product's variants side by side, each
    one's worst logit error against float64, and bf16 K~'s tensor-core dot beside them."""
    dev = torch.device("cuda")
    print("\n| heads q/kv, d | ctx | B | K~ fp32 MB | floor us | variant (dot, BLOCK_C, warps, split x) | us | "
          "GB/s | max logit error vs fp64 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (hq, hkv, d), ctx, B in (((32, 8, 64), 32768, 32), ((32, 8, 64), 131072, 16), ((32, 8, 128), 32768, 16)):
        cmax = (ctx - 32) // 16 + 1
        torch.manual_seed(0)
        q = torch.randn(B, hq, d, device=dev, dtype=torch.bfloat16)
        ck = torch.randn(B, cmax, hkv, d, device=dev, dtype=torch.float32)
        n_chunks = torch.full((B,), cmax, dtype=torch.int32, device=dev)
        want = torch.einsum("bhgd,bchd->bhgc", q.double().view(B, hkv, hq // hkv, d), ck.double())
        want = want * (sel.LOG2E / math.sqrt(d))
        mb = ck.numel() * 4 / 1e6
        floor = ck.numel() * 4 / (hbm / 2 * 1e9) * 1e6
        variants = ([("ieee", 64, 4, 2), ("ieee", 32, 4, 8)]
                    + [("tf32x3", bc, 4, f) for bc in (32, 64) for f in (2, 8)]
                    + [("native", 64, 4, 2)])
        for dot, bc, warps, f in variants:
            x = ck.to(torch.bfloat16) if dot == "native" else ck
            try:
                run, w, _, _ = launch(q, x, n_chunks, bc, warps, 3, f, dot)
                run()
                us = triton.testing.do_bench(run, warmup=5, rep=30) * 1e3
            except Exception as e:  # noqa: BLE001 - a variant Triton cannot compile (registers) is reported
                print(f"| {hq}/{hkv}, {d} | {ctx} | {B} | {mb:.1f} | {floor:.1f} | {(dot, bc, warps, f)} | "
                      f"failed: {type(e).__name__} | - | - |", flush=True)
                continue
            err = (w.double() - want).abs().max().item()
            print(f"| {hq}/{hkv}, {d} | {ctx} | {B} | {mb:.1f} | {floor:.1f} | {(dot, bc, warps, f)} | {us:.1f} | "
                  f"{mb * 1e3 / us:.0f} | {err:.2e} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--fp32", action="store_true", help="only the fp32-K~ variants (ieee / tf32x3 products)")
    a = p.parse_args()
    dev = torch.device("cuda")
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    t = triton.testing.do_bench(lambda: x[: 1 << 29].copy_(x[1 << 29:]), warmup=10, rep=50)
    hbm = 2 * (1 << 29) / (t * 1e-3) / 1e9
    print(f"device copy (read+write) {hbm:.0f} GB/s; SMs {num_sms(dev)}")
    if a.fp32:
        fp32_sweep(hbm)
        return 0
    cases = [("1b", 16384, 16), ("1b", 131072, 1), ("1b", 131072, 16), ("1b", 131072, 64), ("8b", 131072, 16),
             ("8b", 131072, 64), ("8b", 16384, 64)]
    # split factor 1: at most one wave of programs (at B 1 the default's two waves of one tile each
    # looked like the cost: BLOCK_C 128, i.e. half the programs, took 7.6 instead of 17.5 us)
    grid = list(itertools.product((64, 128), (4, 8), (2, 3, 4), (1, 2, 4, 8)))
    if a.quick:
        cases, grid = cases[:2], grid[:4]
    print("| shape | ctx | B | K~ MB | floor us | default us | best us | best (BLOCK_C, warps, stages, split x) | "
          "best GB/s | variants ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ctx, B in cases:
        hq, hkv = SHAPES[name]
        cmax = (ctx - 32) // 16 + 1
        torch.manual_seed(0)
        q = torch.randn(B, hq, 128, device=dev, dtype=torch.bfloat16)
        ck = torch.randn(B, cmax, hkv, 128, device=dev, dtype=torch.bfloat16)
        n_chunks = torch.full((B,), cmax, dtype=torch.int32, device=dev)
        mb = ck.numel() * 2 / 1e6
        floor = ck.numel() * 2 / (hbm / 2 * 1e9) * 1e6
        run, w0, m0, s0 = launch(q, ck, n_chunks, sel.CHUNK_TILE, 4, 3, 2)
        run()
        ref_lse = lse(m0, s0)
        default = triton.testing.do_bench(run, warmup=5, rep=30) * 1e3
        best, ok = (default, "default"), True
        for bc, warps, stages, f in grid:
            r, w, m, s = launch(q, ck, n_chunks, bc, warps, stages, f)
            r()
            ok &= torch.allclose(w, w0, rtol=1e-4, atol=1e-4)
            ok &= torch.allclose(lse(m, s), ref_lse, rtol=1e-4, atol=1e-4)
            us = triton.testing.do_bench(r, warmup=5, rep=30) * 1e3
            best = min(best, (us, (bc, warps, stages, f)))
            if (name, ctx, B) in (("1b", 131072, 1), ("1b", 131072, 16)):
                print(f"    {name} {ctx} B{B} variant {(bc, warps, stages, f)}: {us:.1f} us", flush=True)
        print(f"| {name} | {ctx} | {B} | {mb:.1f} | {floor:.1f} | {default:.1f} | {best[0]:.1f} | {best[1]} | "
              f"{mb * 1e3 / best[0]:.0f} | {ok} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
