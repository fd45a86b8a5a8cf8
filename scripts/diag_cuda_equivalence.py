"""Diagnostic (GPU): where does the CUDA offload path first differ from the reference?

Runs the equivalence drive of tests/test_runtime_equivalence.py step by step; at the first output
mismatch it checks every selected block's slot contents (K, V, c) against the reference mirror and the
host store, and prints what differs. Variants: --sync (synchronize after every runtime call),
--no-prefetch, --slots N, --mode zero_copy|copy_engine, --api split|decode|inline, --graphs.
"""
import argparse
import sys

import torch

sys.path.insert(0, "tests")
from test_runtime_equivalence import ATOL, RTOL, ReferenceMirror, random_prompt, small_runtime  # noqa: E402

from nosa_sglang.kernels.topk import select_topk_torch  # noqa: E402
from nosa_sglang.reference.selection import block_scores_for_positions  # noqa: E402
from nosa_sglang.runtime import NosaRuntime  # noqa: E402
from nosa_sglang.runtime import decode_layer  # noqa: E402

LAST: dict = {}  # the block scores of the runtime's latest selection (fp32, from its kernels)


def _recording(select_topk):
    def wrapped(S, E, seq_lens, config, policy="nosa", impl="auto"):
        LAST.update(S=S.clone(), E=None if E is None else E.clone(), seq_lens=seq_lens.clone(), policy=policy)
        return select_topk(S, E, seq_lens, config, policy, impl=impl)
    return wrapped


decode_layer.select_topk = _recording(decode_layer.select_topk)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="zero_copy")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sync", action="store_true")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--victim", default="eviction_score")
    p.add_argument("--device", default="cuda")
    p.add_argument("--api", default="split", choices=("split", "decode", "inline"),
                   help="append()+attend(), decode(), or decode() with inline_gather")
    p.add_argument("--graphs", action="store_true", help="cuda_graphs=True")
    a = p.parse_args()
    if a.sync:
        for name in ("append", "attend", "decode", "step_boundary"):
            f = getattr(NosaRuntime, name)
            setattr(NosaRuntime, name, lambda self, *x, _f=f, **k: (_r := _f(self, *x, **k), torch.cuda.synchronize())[0])
    rt = small_runtime(slots=a.slots, device=a.device, mode=a.mode, prefetch=not a.no_prefetch, victim=a.victim,
                       inline_gather=a.api == "inline", cuda_graphs=a.graphs)
    shape, cfg, dev = rt.shape, rt.config, rt.device
    g = torch.Generator().manual_seed(a.seed)
    lens = [150, 161, 40]
    mirror = ReferenceMirror(len(lens), shape, max(lens) + a.steps + 1, dev)
    ids = [f"req{i}" for i in range(len(lens))]
    for i, T in enumerate(lens):
        ks, vs, cs = random_prompt(shape, T, g, dev)
        rt.begin_request(ids[i], ks, vs, cs)
        mirror.set_prompt(i, ks, vs, cs)
    idx = list(range(len(ids)))
    H, Hq, d, bs = shape.num_kv_heads, shape.num_q_heads, shape.head_dim, cfg.block_size
    G = Hq // H
    sel_mismatch = 0
    for step in range(a.steps):
        for layer in range(shape.num_layers):
            k = torch.randn(len(idx), H, d, generator=g).to(dev, shape.dtype)
            v = torch.randn(len(idx), H, d, generator=g).to(dev, shape.dtype)
            c = (0.1 + 2 * torch.rand(len(idx), H, generator=g)).to(dev)
            q = torch.randn(len(idx), Hq, d, generator=g).to(dev, shape.dtype)
            if a.api == "split":
                rt.append(layer, ids, k, v, c)
                o = rt.attend(layer, ids, q)
            else:
                o = rt.decode(layer, ids, q, k, v, c)
            mirror.append(layer, idx, k, v, c)
            sel, ref = mirror.attend(layer, idx, q, cfg)
            mine = rt.last_selection(layer).long()
            sel_mismatch += int((mine != sel).any())
            bad = ~torch.isclose(o.double(), ref, atol=ATOL, rtol=RTOL).all(-1)  # [B, Hq]
            if not bad.any():
                continue
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"FIRST MISMATCH step {step} layer {layer}; selection equal: {bool((mine == sel).all())}; "
                  f"selection mismatches so far {sel_mismatch}")
            if LAST:
                again = select_topk_torch(LAST["S"], LAST["E"], LAST["seq_lens"], cfg, LAST["policy"])
                print(f"  runtime's fp32 scores through the torch top-k: equal to its selection "
                      f"{bool((again.long() == mine).all())}")
            for b, h in (mine != sel).any(-1).nonzero().tolist():
                n = mirror.lens[b] + 1
                S64, E64 = block_scores_for_positions(q[b : b + 1].double(), mirror.k[layer, b, :n].double(),
                                                      mirror.c[layer, b, :n].double(), torch.tensor([n - 1], device=dev), cfg)
                diff = sorted(set(mine[b, h].tolist()) ^ set(sel[b, h].tolist()))
                for blk in diff:
                    print(f"  row {b} kv-head {h} block {blk}: S fp64 {float(S64[0, h, blk]):.9g} fp32 "
                          f"{float(LAST['S'][b, h, blk]):.9g} | E fp64 {float(E64[0, h, blk]):.9g} fp32 "
                          f"{float(LAST['E'][b, h, blk]):.9g}")
            for b, hq in bad.nonzero().tolist():
                h = hq // G
                req = rt._requests[ids[b]]
                n = mirror.lens[b] + 1
                print(f"  request {b} row {req.row} q-head {hq} kv-head {h} seq_len {n} (runtime seq_len {req.seq_len})")
                print(f"    runtime sel {mine[b, h].tolist()}\n    ref     sel {sel[b, h].tolist()}")
                for blk in mine[b, h].tolist():
                    if blk < 0:
                        continue
                    local = int(rt.slots.block_slot[layer, req.row, h, blk])
                    if local < 0:
                        print(f"    block {blk}: NOT MAPPED")
                        continue
                    slot = rt.slots.slot_id(req.row, h, local)
                    lo, hi = blk * bs, min((blk + 1) * bs, n)
                    ks_ = rt.slots.k_slots(layer)[slot, : hi - lo].double()
                    vs_ = rt.slots.v_slots(layer)[slot, : hi - lo].double()
                    cs_ = rt.slots.c_slots(layer)[slot, : hi - lo].double()
                    kr = mirror.k[layer, b, lo:hi, h].double()
                    vr = mirror.v[layer, b, lo:hi, h].double()
                    cr = mirror.c[layer, b, lo:hi, h].double()
                    ok = [torch.allclose(x, y) for x, y in ((ks_, kr), (vs_, vr), (cs_, cr))]
                    if not all(ok):
                        hb = int(rt._host_table[req.row, blk]) if hasattr(rt, "_host_table") else -1
                        host_ok = None
                        if hb >= 0:
                            run = hb * H + h
                            hk = rt.host.layer_k(layer)[run].view(bs, d)[: hi - lo].double().to(dev)
                            host_ok = torch.allclose(hk, kr)
                        rows_bad = (~torch.isclose(ks_, kr).all(-1)).nonzero().flatten().tolist()
                        print(f"    block {blk} local slot {local} (tail={local == rt.slots.capacity}) K/V/c ok {ok}; "
                              f"host block {hb} host K ok {host_ok}; bad token rows {rows_bad[:20]}")
            return 1
        rt.step_boundary()
        mirror.step(idx)
    print(f"no output mismatch in {a.steps} steps; selection mismatches {sel_mismatch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
