"""Offloading changes nothing: the runtime selects the same blocks as the reference at every step and its
attention equals `nosa_decode_attention` (fp32, 1e-4), for >= 500 decode steps, every slot count, both
victim policies, with and without prefetch, and in gpu_only mode.

Small NOSA config (block 16, stride 4, kernel 8, init 1, local 2, query 5, topk 8) so that selection is
sparse after a few hundred tokens; slot counts topk / topk * 1.25 / 2 * topk mirror 64 / 80 / 128.
"""

from __future__ import annotations

import contextlib


import os
from dataclasses import replace

import pytest
import torch

from kernel_checks import SMALL

from nosa_sglang.config import NosaConfig
from nosa_sglang.reference import nosa_decode_attention, select_blocks_decode
from nosa_sglang.reference.selection import block_scores_for_positions, select_from_block_scores
from nosa_sglang.runtime import MicroBatches, ModelShape, NosaRuntime, OffloadKnobs, RuntimeUsageError, StepGraphs
from nosa_sglang.runtime.slot_cache import GpuSlotCache

ATOL = RTOL = 1e-4
#: relative score gap under which fp32 kernels may order two blocks differently from the fp64 reference
#: (measured on an H200: a swap of adjacent blocks 22/23 after 362 steps); CPU runs allow no swap at all
NEAR_TIE = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def fresh_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return seed


class ReferenceMirror:
    """The full K/V/c of every request and layer, to recompute the reference each step."""

    def __init__(self, n_req: int, shape: ModelShape, capacity: int, device: torch.device) -> None:
        L, H, d = shape.num_layers, shape.num_kv_heads, shape.head_dim
        self.k = torch.zeros(L, n_req, capacity, H, d, dtype=shape.dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.c = torch.zeros(L, n_req, capacity, H, dtype=torch.float32, device=device)
        self.lens = [0] * n_req

    def set_prompt(self, i: int, ks, vs, cs) -> None:
        T = ks[0].shape[0]
        for layer, (k, v, c) in enumerate(zip(ks, vs, cs)):
            self.k[layer, i, :T], self.v[layer, i, :T], self.c[layer, i, :T] = k, v, c
        self.lens[i] = T

    def append(self, layer: int, idx: list[int], k, v, c) -> None:
        for j, i in enumerate(idx):
            self.k[layer, i, self.lens[i]] = k[j]
            self.v[layer, i, self.lens[i]] = v[j]
            self.c[layer, i, self.lens[i]] = c[j]

    def attend(self, layer: int, idx: list[int], q, config: NosaConfig):
        seq = torch.tensor([self.lens[i] + 1 for i in idx], device=q.device)
        n = int(seq.max())
        kc, vc, cc = (t[layer, idx, :n].double() for t in (self.k, self.v, self.c))
        sel = select_blocks_decode(q.double(), kc, cc, seq, config)
        return sel, nosa_decode_attention(q.double(), kc, vc, cc, seq, config, blocks=sel)

    def attention(self, layer: int, idx: list[int], q, config: NosaConfig, blocks):
        """Reference attention over a given selection (the runtime's, after a near tie)."""
        seq = torch.tensor([self.lens[i] + 1 for i in idx], device=q.device)
        n = int(seq.max())
        kc, vc, cc = (t[layer, idx, :n].double() for t in (self.k, self.v, self.c))
        return nosa_decode_attention(q.double(), kc, vc, cc, seq, config, blocks=blocks)

    def near_tie(self, layer: int, idx: list[int], q, config: NosaConfig, mine, sel, tol: float = NEAR_TIE) -> bool:
        """Whether the runtime's selection is the reference rule's on scores within `tol` (relative) of
        the float64 ones: its blocks' S and E raised by tol, the others' lowered, must select exactly
        `mine`. This admits fp32 near ties and what they cascade into (a query pick lost at a tie
        frees a slot that the eviction score fills), and nothing else."""
        for b, i in enumerate(idx):
            if bool((mine[b] == sel[b]).all()):
                continue
            n = self.lens[i] + 1
            pos = torch.tensor([n - 1], device=q.device)
            S, E = block_scores_for_positions(q[b : b + 1].double(), self.k[layer, i, :n].double(),
                                              self.c[layer, i, :n].double(), pos, config)
            chosen = torch.zeros(S.shape, dtype=torch.bool, device=S.device)
            chosen[0].scatter_(-1, mine[b].clamp(min=0).long(), mine[b] >= 0)
            sign = chosen.double() * 2 - 1
            S2, E2 = (x + sign * tol * x.abs().clamp(min=1.0) for x in (S, E))
            qb = torch.full(S.shape[:2], (n - 1) // config.block_size, device=S.device)
            if not torch.equal(select_from_block_scores(S2, E2, qb, config)[0], mine[b].long()):
                return False
        return True

    def step(self, idx: list[int]) -> None:
        for i in idx:
            self.lens[i] += 1


def random_prompt(shape: ModelShape, T: int, g: torch.Generator, device):
    L, H, d = shape.num_layers, shape.num_kv_heads, shape.head_dim
    ks = [torch.randn(T, H, d, generator=g).to(device, shape.dtype) for _ in range(L)]
    vs = [torch.randn(T, H, d, generator=g).to(device, shape.dtype) for _ in range(L)]
    cs = [(0.1 + 2 * torch.rand(T, H, generator=g)).to(device) for _ in range(L)]  # nonzero bias: no ties
    return ks, vs, cs


def drive(rt: NosaRuntime, prompt_lens: list[int], steps: int, seed: int, check: bool = True,
          order: list[int] | None = None, collect: bool = False, allow_near_ties: bool = False,
          on_attend=None, fused: bool = False, micro_batches: int = 1, step_graphs: bool = False,
          unordered_delay: int | None = None, rotate_streams: bool = False) -> dict:
    """Run `steps` decode steps of random tokens/queries; compare every layer with the reference
    (`collect`: also return every output, on the host).

    `allow_near_ties` (fp32 GPU kernels against the fp64 reference): a selection that differs only by
    near ties (`ReferenceMirror.near_tie`) counts in "near_ties", not "selection_mismatches", and the
    output is then checked against the reference attention over the runtime's own selection.
    `fused`: each layer through `decode(q, k, v, c)` instead of `append` then `attend`.
    `micro_batches`: the batch cut into that many contiguous parts (`MicroBatches`: on CUDA each on its
    own stream), each decoded separately per layer.
    `step_graphs`: every step through `StepGraphs` (on CUDA one graph per step), its layers reading
    inputs from fixed buffers; the checks follow the step.
    `unordered_delay` (with step_graphs): a body that orders none of its part streams (`unordered_body`),
    and on CUDA sleep kernels of that many cycles before each step (the caller's stream: late inputs
    and plan uploads) and before each part's last output copy (late part streams).
    `rotate_streams` (micro-batches, not step graphs): after every step the parts pass their streams on,
    so each request runs on another stream than in the step before."""
    shape, cfg, dev = rt.shape, rt.config, rt.device
    g = torch.Generator().manual_seed(seed)
    mirror = ReferenceMirror(len(prompt_lens), shape, max(prompt_lens) + steps + 1, dev)
    ids = [f"req{i}" for i in range(len(prompt_lens))]
    for i, T in enumerate(prompt_lens):
        ks, vs, cs = random_prompt(shape, T, g, dev)
        rt.begin_request(ids[i], ks, vs, cs)
        mirror.set_prompt(i, ks, vs, cs)
    idx = order or list(range(len(ids)))
    batch = [ids[i] for i in idx]
    H, Hq, d = shape.num_kv_heads, shape.num_q_heads, shape.head_dim
    worst, mismatches, near_ties, outputs = 0.0, 0, 0, []
    parts = MicroBatches(rt, batch, micro_batches)
    inputs = [[torch.empty(0)] * 4 for _ in range(shape.num_layers)]  # q, k, v, c per layer
    runner = None
    if step_graphs:
        for layer in range(shape.num_layers):
            inputs[layer] = [torch.empty((len(idx), n, d), dtype=shape.dtype, device=dev) for n in (Hq, H, H)]
            inputs[layer].append(torch.empty((len(idx), H), device=dev))
        body = (lambda: [decode_parts(parts, layer, *inputs[layer], fused=True)
                         for layer in range(shape.num_layers)])
        if unordered_delay is not None:
            body = unordered_body(parts, inputs, shape, unordered_delay)
        runner = StepGraphs(rt, [part.request_ids for part in parts.parts], body)
    for _ in range(steps):
        for layer in range(shape.num_layers):
            k = torch.randn(len(idx), H, d, generator=g).to(dev, shape.dtype)
            v = torch.randn(len(idx), H, d, generator=g).to(dev, shape.dtype)
            c = (0.1 + 2 * torch.rand(len(idx), H, generator=g)).to(dev)
            q = torch.randn(len(idx), Hq, d, generator=g).to(dev, shape.dtype)
            if runner is None:
                inputs[layer] = [q, k, v, c]
            else:
                for buf, x in zip(inputs[layer], (q, k, v, c)):
                    buf.copy_(x)
        if unordered_delay and dev.type == "cuda":
            torch.cuda._sleep(unordered_delay)
        step_out = runner.step() if runner is not None else None
        for layer in range(shape.num_layers):
            q, k, v, c = inputs[layer]
            if runner is None:
                o, mine = decode_parts(parts, layer, q, k, v, c, fused)
            else:
                o, mine = step_out[layer]
            if collect:
                outputs.append(o.to("cpu", copy=True))  # NOTE: a CPU .cpu() would alias a reused buffer
            if on_attend is not None:
                on_attend(layer)
            if check:
                mirror.append(layer, idx, k, v, c)
                sel, ref = mirror.attend(layer, idx, q, cfg)
                if bool((mine != sel).any()):
                    if allow_near_ties and mirror.near_tie(layer, idx, q, cfg, mine, sel):
                        near_ties += 1
                        ref = mirror.attention(layer, idx, q, cfg, mine)
                    else:
                        mismatches += 1
                worst = max(worst, float((o.double() - ref).abs().max()))
                torch.testing.assert_close(o.double(), ref, atol=ATOL, rtol=RTOL)
        if runner is None:
            rt.step_boundary()
        if rotate_streams:
            streams = [part.stream for part in parts.parts]
            parts.parts = [part._replace(stream=s) for part, s in zip(parts.parts, streams[1:] + streams[:1])]
        mirror.step(idx)
    return {"worst": worst, "selection_mismatches": mismatches, "near_ties": near_ties, "snapshot": rt.snapshot(),
            "ids": ids, "outputs": outputs, "runner": runner}


def unordered_body(parts: MicroBatches, inputs: list, shape: ModelShape, delay: int):
    """A StepGraphs body that, like an attention backend's forward, runs each part's layers on the part's
    stream and neither orders those streams after the caller's nor joins them: the runtime must (its
    plan's upload, PlanStreams). Each part writes its outputs and selections into fixed buffers, the
    last layer's after a sleep (a part stream that finishes late)."""
    B, L, dev = inputs[0][0].shape[0], shape.num_layers, inputs[0][0].device
    outs = [(torch.empty((B, shape.num_q_heads, shape.head_dim), dtype=shape.dtype, device=dev),
             torch.empty((B, shape.num_kv_heads, parts.rt.config.topk_blocks), dtype=torch.long, device=dev))
            for _ in range(L)]

    def body():
        for layer in range(L):
            q, k, v, c = inputs[layer]
            for part in parts.parts:
                sl = part.rows
                with torch.cuda.stream(part.stream) if part.stream is not None else contextlib.nullcontext():
                    o = parts.rt.decode(layer, part.request_ids, q[sl], k[sl], v[sl], c[sl])
                    if layer == L - 1 and delay and part.stream is not None:
                        torch.cuda._sleep(delay)
                    outs[layer][0][sl].copy_(o)
                    outs[layer][1][sl].copy_(parts.rt.last_selection(layer))
        return outs
    return body


def decode_parts(parts: MicroBatches, layer: int, q, k, v, c, fused: bool):
    """One layer of every micro-batch: (output, selection) of the whole batch, on the current stream."""
    main = torch.cuda.current_stream() if parts.parts[0].stream is not None else None
    outs, sels = [], []
    for part, (o, sel) in zip(parts.parts, parts.decode(layer, q, k, v, c, split_append=not fused)):
        if main is not None:
            main.wait_stream(part.stream)
            for t in (o, sel):
                t.record_stream(main)
        outs.append(o)
        sels.append(sel.long())
    return torch.cat(outs), torch.cat(sels)


COUNTS = ("hits", "misses", "prefetched", "bytes_h2d", "bytes_d2h")


def force_prefetches(monkeypatch) -> None:
    """Prefetch that moves blocks. The real candidates (the best eviction scores the next step may
    select) are resident already in these runs, so prefetch copies nothing; here every existing
    candidate scores far above any resident block, in an order that changes every step (computed on the
    device from the step counter: the same under graphs), so each step prefetches into the slots it did
    not select."""
    real = GpuSlotCache.plan_prefetch

    def plan_prefetch(self, layer, view, cand_score, n_cand, E, policy, step, base):
        blocks = torch.arange(cand_score.shape[-1], device=cand_score.device)
        order = ((blocks * 7919 + step.long() * 104729) % 997).float()
        forced = torch.where(cand_score > float("-inf"), 1e30 - order * 1e26, float("-inf"))
        return real(self, layer, view, forced, n_cand, E, policy, step, base)

    monkeypatch.setattr(GpuSlotCache, "plan_prefetch", plan_prefetch)


def counts(run: dict) -> tuple:
    """The exact counters of a drive() (times are clocks, and differ run to run)."""
    return tuple(getattr(run["snapshot"].totals, f) for f in COUNTS)


def small_runtime(slots: int = 8, victim: str = "eviction_score", prefetch: bool = True, layers: int = 2,
                  gpu_only: bool = False, device: str = "cpu", mode: str = "copy_engine", **kw) -> NosaRuntime:
    shape = ModelShape(layers, 4, 2, 16, torch.float32)
    knobs = OffloadKnobs(gpu_slots=slots, victim_policy=victim, prefetch=prefetch, transfer_mode=mode)
    kw.setdefault("host_capacity_bytes", 1 << 22)
    kw.setdefault("max_requests", 4)
    return NosaRuntime(shape, SMALL, knobs, device=device, max_seq_len=1024, gpu_only=gpu_only, **kw)


def test_near_tie_admits_only_swaps_within_the_tolerance(gen):
    """The GPU tests' near-tie rule: swapping a selected block for one the scores rank clearly lower is
    a mismatch at 1e-5, and passes only when the tolerance exceeds the score gap."""
    shape = ModelShape(1, 4, 2, 16, torch.float32)
    T = 600
    mirror = ReferenceMirror(1, shape, T + 100, torch.device("cpu"))
    ks, vs, cs = random_prompt(shape, T, gen, "cpu")
    mirror.set_prompt(0, ks, vs, cs)
    mirror.lens[0] -= 1  # attend as the token at position T - 1
    qb = (T - 1) // SMALL.block_size
    # NOTE: a clearly lower swap uses only blocks whose S and E equal no other selected block's:
    # max-pooled neighbours share a boundary chunk, so their scores can be exactly equal, and a swap
    # through such a tie (or the cascade it starts) is a true near tie (2 % of seeds failed here when the
    # test took the first blocks it found). A query whose every pick is tied so is drawn again.
    for _ in range(20):
        q = torch.randn(1, 4, 16, generator=gen)
        sel, _ = mirror.attend(0, [0], q, SMALL)
        S, E = block_scores_for_positions(q.double(), mirror.k[0, 0, :T].double(), mirror.c[0, 0, :T].double(),
                                          torch.tensor([T - 1]), SMALL)
        chosen = sel[0, 0].tolist()

        def untied(b: int) -> bool:
            return not any(float(x[0, 0, b]) == float(x[0, 0, o]) for x in (S, E) for o in chosen if o != b)

        free = [b for b in range(SMALL.init_blocks, qb - SMALL.local_blocks) if b not in chosen and untied(b)]
        picked = [b for b in chosen if SMALL.init_blocks <= b < qb - SMALL.local_blocks and untied(b)]
        if free and picked:
            break
    assert free and picked, "no query in 20 had a selected and a free block without exact ties"
    assert mirror.near_tie(0, [0], q, SMALL, sel, sel)
    mine = sel.clone()
    mine[0, 0] = torch.tensor(sorted(set(chosen) - {picked[0]} | {free[0]}))
    assert not mine.equal(sel)
    assert not mirror.near_tie(0, [0], q, SMALL, mine, sel)
    assert mirror.near_tie(0, [0], q, SMALL, mine, sel, tol=10.0)


@pytest.mark.parametrize("slots", [8, 10, 16])
def test_offload_equals_reference_for_500_steps(slots):
    seed = fresh_seed()
    rt = small_runtime(slots=slots)
    out = drive(rt, [150, 161, 40], steps=500, seed=seed)
    assert out["selection_mismatches"] == 0
    snap = out["snapshot"]
    assert snap.totals.misses > 0, "the run must exercise the host tier"
    print(f"slots={slots} hit_rate={snap.totals.hit_rate:.3f} worst={out['worst']:.2e}")


@pytest.mark.parametrize("victim", ["eviction_score", "lru"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_both_victim_policies_equal_reference(victim, prefetch):
    seed = fresh_seed()
    rt = small_runtime(slots=10, victim=victim, prefetch=prefetch, layers=1)
    out = drive(rt, [120, 75], steps=300, seed=seed)
    assert out["selection_mismatches"] == 0


def test_prefetches_that_move_blocks_change_no_output(monkeypatch):
    """Prefetched blocks are later hits: their K/V and biases must be those of the block (CPU; the CUDA
    twin checks the stream ordering: test_requests_that_change_stream_see_their_prefetches)."""
    force_prefetches(monkeypatch)
    rt = small_runtime(slots=10, victim="eviction_score", prefetch=True, layers=2)
    out = drive(rt, [600, 520, 410], steps=120, seed=fresh_seed(), fused=True, micro_batches=2, rotate_streams=True)
    totals = out["snapshot"].totals
    assert out["selection_mismatches"] == 0 and totals.prefetched > 500 and totals.misses > 0


def test_gpu_only_mode_equals_reference():
    seed = fresh_seed()
    rt = small_runtime(gpu_only=True, layers=1)
    out = drive(rt, [130, 50], steps=200, seed=seed)
    assert out["snapshot"].totals.misses == 0 and out["snapshot"].mode == "gpu_only"


def assert_offload_equals_gpu_only(device: str, mode: str, steps: int, seed: int) -> None:
    """The same kernels with the KV cache offloaded (8 slots per head, most blocks on the host) and
    fully resident select the same blocks and produce the same outputs, bit for bit."""
    runs = []
    for gpu_only in (False, True):
        rt = small_runtime(slots=8, device=device, mode=mode, gpu_only=gpu_only)
        selections: list[torch.Tensor] = []
        out = drive(rt, [150, 161, 40], steps=steps, seed=seed, check=False, collect=True,
                    on_attend=lambda layer, rt=rt, acc=selections: acc.append(rt.last_selection(layer).cpu()))
        runs.append((out["outputs"], selections, out["snapshot"].totals.misses))
    (o_off, s_off, misses), (o_gpu, s_gpu, _) = runs
    assert misses > 0, "the offloaded run must miss"
    assert all(torch.equal(a, b) for a, b in zip(s_off, s_gpu)), "selections differ"
    assert all(torch.equal(a, b) for a, b in zip(o_off, o_gpu)), "outputs differ"


def test_offload_equals_gpu_only_bit_for_bit():
    assert_offload_equals_gpu_only("cpu", "copy_engine", steps=300, seed=fresh_seed())


def test_batch_order_differs_from_row_order():
    seed = fresh_seed()
    rt = small_runtime(layers=1)
    out = drive(rt, [100, 140, 60], steps=120, seed=seed, order=[2, 0, 1])
    assert out["selection_mismatches"] == 0


def test_default_nosa_config_equals_reference():
    """The real constants (block 64, kernel 32/16, 1 + 16 local, 33 query, top-64) on a shorter run."""
    seed = fresh_seed()
    shape = ModelShape(1, 4, 2, 16, torch.float32)
    rt = NosaRuntime(shape, NosaConfig(), OffloadKnobs(gpu_slots=64), host_capacity_bytes=1 << 23,
                     max_requests=2, max_seq_len=8192)
    out = drive(rt, [64 * 70 + 5, 64 * 66], steps=100, seed=seed)
    assert out["selection_mismatches"] == 0 and out["snapshot"].totals.misses > 0


def test_zero_copy_kernels_under_interpreter():
    """The Triton paths (selection, attention, zero-copy gather) through the runtime, on CPU tensors."""
    from nosa_sglang.kernels._dispatch import interpret_mode

    if not interpret_mode():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)")
    seed = fresh_seed()
    rt = small_runtime(slots=8, layers=1, mode="zero_copy", kernel_impl="triton")
    rt.transfer.set_mode("zero_copy", allow_interpreter=True)
    out = drive(rt, [230, 270], steps=12, seed=seed)
    assert out["selection_mismatches"] == 0 and out["snapshot"].totals.misses > 0


@pytest.mark.parametrize("victim", ["lru", "eviction_score"])
def test_decode_equals_append_then_attend_bit_for_bit(victim):
    """One call per layer (the backend's shape) changes nothing: same outputs, same counters, and the
    reference's selection at every step (blocks fill and are written back in between)."""
    seed = fresh_seed()
    runs = [drive(small_runtime(slots=10, victim=victim), [150, 161, 40], steps=120, seed=seed, collect=True,
                  fused=fused) for fused in (False, True)]
    assert all(r["selection_mismatches"] == 0 for r in runs)
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["outputs"], runs[1]["outputs"]))
    assert counts(runs[0]) == counts(runs[1]) and runs[1]["snapshot"].totals.misses > 0


@pytest.mark.parametrize("slots", [8, 10])  # few enough that blocks miss whatever the seed
def test_inline_gather_equals_the_copy_stream_path(slots):
    """decode() with the gather inside the layer's one segment: the reference's selections, the same
    outputs bit for bit and the same hit/miss/byte counts as the side-stream path."""
    seed = fresh_seed()
    runs = [drive(small_runtime(slots=slots, victim="lru", inline_gather=inline), [150, 161, 40], steps=120,
                  seed=seed, collect=True, fused=True) for inline in (False, True)]
    assert all(r["selection_mismatches"] == 0 for r in runs)
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["outputs"], runs[1]["outputs"]))
    assert counts(runs[0]) == counts(runs[1]) and runs[1]["snapshot"].totals.misses > 0


def test_inline_gather_steps_aside_for_prefetch():
    """Prefetch needs the copy stream: with eviction-score victims and prefetch on, decode() keeps the
    side-stream path, and takes the inline one once the prefetch knob is off; both equal the reference."""
    seed = fresh_seed()
    rt = small_runtime(slots=12, victim="eviction_score", prefetch=True, inline_gather=True)
    assert not rt._decoder._inline(nosa=True)
    assert drive(rt, [150, 161, 40], steps=40, seed=seed, fused=True)["selection_mismatches"] == 0
    rt.request_knobs(replace(rt.knobs(), prefetch=False))
    rt.step_boundary()
    assert rt._decoder._inline(nosa=True)


def test_inline_gather_segments_read_only_static_buffers():
    seed = fresh_seed()
    rt = small_runtime(slots=10, victim="lru", layers=2, inline_gather=True)
    rt._decoder.graphs = ReplayClosures()
    out = drive(rt, [150, 161, 40], steps=150, seed=seed, order=[1, 2, 0], fused=True)
    assert out["selection_mismatches"] == 0 and rt._decoder.graphs.replays > 250
    assert out["snapshot"].totals.misses > 0


class ReplayClosures:
    """CUDA-graph semantics on CPU: a segment seen twice is 'captured' (its closure and first outputs
    kept) and every later call re-runs *that* closure and writes into *those* outputs, so a segment that
    read a per-step tensor instead of a static buffer would compute from stale data."""

    def __init__(self) -> None:
        from nosa_sglang.runtime.graph_cache import SegmentGraphs

        self._base = SegmentGraphs()
        self.replays = 0

    def run(self, shape, key, fn):
        g = self._base
        key = (shape, key)
        if key in g._graphs:
            fn0, out = g._graphs[key]
            new = fn0()
            for a, b in zip(_flat(out), _flat(new)):
                a.copy_(b)
            self.replays += 1
            return out
        if key not in g._seen:
            g._seen.add(key)
            return fn()
        out = fn()
        g._graphs[key] = (fn, out)
        return out

    def drop_shape(self, shape):
        self._base.drop_shape(shape)


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _flat(y)]
    return []


@pytest.mark.parametrize("fused", [False, True], ids=["append-attend", "decode"])
@pytest.mark.parametrize("victim", ["lru", "eviction_score"])
def test_graph_mode_segments_read_only_static_buffers(victim, fused):
    seed = fresh_seed()
    rt = small_runtime(slots=10, victim=victim, layers=2)
    rt._decoder.graphs = ReplayClosures()  # what cuda_graphs=True does, minus the GPU
    out = drive(rt, [150, 161, 40], steps=150, seed=seed, order=[1, 2, 0], fused=fused)
    assert out["selection_mismatches"] == 0 and rt._decoder.graphs.replays > 500


@pytest.mark.parametrize("parts, victim", [(2, "lru"), (3, "lru"), (2, "eviction_score")])
@pytest.mark.parametrize("fused", [False, True], ids=["append-attend", "decode"])
def test_micro_batches_equal_one_batch_bit_for_bit(fused, parts, victim):
    """A step cut into micro-batches (decoded one after another, layer by layer) gives the reference's
    selections and the one-batch outputs and counters bit for bit (also with rows out of batch order;
    eviction-score victims: with prefetch, planned per micro-batch)."""
    seed = fresh_seed()
    runs = [drive(small_runtime(slots=10, victim=victim), [150, 161, 40, 99], steps=100, seed=seed, collect=True,
                  fused=fused, micro_batches=n, order=[1, 0, 2, 3]) for n in (1, parts)]
    assert all(r["selection_mismatches"] == 0 for r in runs)
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["outputs"], runs[1]["outputs"]))
    assert counts(runs[0]) == counts(runs[1]) and runs[1]["snapshot"].totals.misses > 0


@pytest.mark.parametrize("inline", [False, True])
def test_micro_batch_segments_have_their_own_static_buffers(inline):
    """Two micro-batches of one size are in flight at once (two streams): under captured-closure
    replay, a plan or input buffer shared between them would feed one the other's rows."""
    seed = fresh_seed()
    rt = small_runtime(slots=10, victim="lru", layers=2, inline_gather=inline)
    rt._decoder.graphs = ReplayClosures()
    out = drive(rt, [150, 161, 40, 120], steps=100, seed=seed, fused=True, micro_batches=2)
    assert out["selection_mismatches"] == 0 and rt._decoder.graphs.replays > 300


@pytest.mark.parametrize("inline", [False, True])
@pytest.mark.parametrize("victim, order, parts, unordered", [
    ("lru", None, 1, False), ("eviction_score", [2, 0, 1], 1, False), ("lru", [1, 0, 2], 2, False),
    ("lru", [1, 0, 2], 2, True)])
def test_step_graph_path_equals_per_layer_decode_bit_for_bit(victim, order, parts, unordered, inline):
    """The path a captured step takes (StepGraphs: plans before the layers, inputs read in place,
    write-backs from the padded device lists; one batch or two micro-batches, through the usual body
    or one that writes fixed output buffers and orders no stream: on CPU only its output path, there
    are no streams), run eagerly on CPU: the reference's selections, and the per-layer decode's outputs
    and counters (write-back bytes included) bit for bit."""
    seed = fresh_seed()
    runs = [drive(small_runtime(slots=10, victim=victim, inline_gather=inline), [150, 161, 40], steps=120,
                  seed=seed, collect=True, fused=True, order=order, step_graphs=graphs,
                  micro_batches=parts if graphs else 1, unordered_delay=0 if graphs and unordered else None)
            for graphs in (False, True)]
    assert all(r["selection_mismatches"] == 0 for r in runs)
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["outputs"], runs[1]["outputs"]))
    assert counts(runs[0]) == counts(runs[1])
    assert runs[1]["snapshot"].totals.misses > 0 and runs[1]["snapshot"].totals.bytes_d2h > 0
    assert runs[1]["runner"].eager_steps == 120 and len(runs[1]["runner"].batches) == parts


def test_write_back_hands_device_id_lists_to_the_copy_stream_only_inside_a_capture(monkeypatch):
    """The step plan's device id lists are overwritten by the next step's upload. On CUDA only a captured
    step (its graph ends after its write-backs) may give them to the write-back stream; an eager step
    gives its CPU lists: a delayed write-back once read the next step's lists (-1) and a block never
    reached the host (docs/runtime.md, GPU status). On CPU copies are synchronous: the device lists stay
    (the twin above covers them)."""
    rt = small_runtime(slots=10)
    ids = drive(rt, [47, 40], steps=0, seed=fresh_seed())["ids"]  # req0's next token (position 47) fills a block
    p = rt.begin_step(ids)
    assert p.wb_src is not None and p.wb_src.numel() == rt.shape.num_kv_heads
    taken = []
    monkeypatch.setattr(rt.transfer, "write_back", lambda layer, src, dst, runs=None: taken.append(src))
    rt.in_step_graph = True
    for cuda, capturing, device_lists in ((False, False, True), (True, False, False), (True, True, True)):
        monkeypatch.setattr(rt.transfer, "cuda", cuda)
        monkeypatch.setattr(rt.transfer, "capturing", lambda capturing=capturing: capturing)
        rt._decoder._write_back(0, p)
        assert (taken[-1].data_ptr() == p.wb_padded[0].data_ptr()) == device_lists
        assert (taken[-1] is p.wb_src) != device_lists
    rt.in_step_graph = False
    rt._decoder._write_back(0, p)
    assert taken[-1] is p.wb_src  # outside StepGraphs: always the CPU lists


def test_step_graphs_refuse_a_bad_batch_list():
    rt = small_runtime()
    for bad in ([], ["req0", "req1"], [[]]):
        with pytest.raises(ValueError, match="batches must be"):
            StepGraphs(rt, bad, list)


def test_begin_step_opens_the_step_once():
    """begin_step is idempotent until a layer runs; after some layers it refuses; after all of them it
    closes the step and opens the next."""
    rt = small_runtime(layers=2)
    ids = drive(rt, [40, 50], steps=1, seed=fresh_seed())["ids"]
    H, Hq, d = 2, 4, 16
    q, k, v = torch.randn(2, Hq, d), torch.randn(2, H, d), torch.randn(2, H, d)
    c = 0.5 + torch.rand(2, H)
    p = rt.begin_step(ids)
    assert rt.begin_step(ids) is p
    rt.decode(0, ids, q, k, v, c)
    with pytest.raises(RuntimeUsageError, match="begin_step: layers \\[0\\]"):
        rt.begin_step(ids)
    rt.decode(1, ids, q, k, v, c)
    step = rt._step
    assert rt.begin_step(ids) is not p and rt._step == step + 1
