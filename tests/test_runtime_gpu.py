"""On CUDA, with real streams and pinned memory, offloading still changes nothing (marked gpu).

The same reference comparison as test_runtime_equivalence.py, through the Triton kernels, in both
transfer modes, with prefetch; a sleep kernel on the copy streams (a deliberately late copy) must not
change a single output bit; and a snapshot never waits for the GPU.
"""

from __future__ import annotations

import os
from dataclasses import replace
import time

import pytest
import torch
from test_runtime_equivalence import (SMALL, assert_offload_equals_gpu_only, counts, drive, force_prefetches,
                                      small_runtime)

from nosa_sglang.config import NosaConfig
from nosa_sglang.runtime import ModelShape, NosaRuntime, OffloadKnobs, StepGraphs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)"),
]
SLEEP_CYCLES = 20_000_000  # ~10 ms at 2 GHz: far longer than any copy here


def seed() -> int:
    """A fresh seed, printed (NOSA_TEST_SEED=s replays one)."""
    s = int(os.environ.get("NOSA_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={s}")
    return s


@pytest.mark.parametrize("mode", ["zero_copy", "copy_engine"])
@pytest.mark.parametrize("slots", [8, 10, 16])
def test_cuda_offload_equals_reference(mode, slots):
    rt = small_runtime(slots=slots, device="cuda", mode=mode)
    assert rt.host.mode in ("cupy", "torch") and rt.host.layer_k(0).is_pinned()
    out = drive(rt, [150, 161, 40], steps=500, seed=seed(), allow_near_ties=True)
    assert out["selection_mismatches"] == 0 and out["snapshot"].totals.misses > 0
    assert out["near_ties"] <= 10, out["near_ties"]  # of 1,000 attends


@pytest.mark.parametrize("mode", ["zero_copy", "copy_engine"])
def test_delayed_copies_give_identical_outputs(mode):
    s = seed()
    outs = []
    for delay in (0, SLEEP_CYCLES):
        rt = small_runtime(slots=10, device="cuda", mode=mode)
        rt.transfer.debug_delay_cycles = delay
        rt.transfer.debug_writeback_delay_cycles = delay
        out = drive(rt, [150, 161, 40], steps=60, seed=s, collect=True, allow_near_ties=True)  # and the reference
        assert out["selection_mismatches"] == 0
        outs.append(out["outputs"])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("mode", ["zero_copy", "copy_engine"])
@pytest.mark.parametrize("victim", ["lru", "eviction_score"])
def test_cuda_graphs_equal_reference_and_eager(mode, victim):
    """Captured segments replay the eager path exactly: same outputs as a run without graphs."""
    s = seed()
    outs = []
    for graphs in (False, True):
        rt = small_runtime(slots=10, victim=victim, device="cuda", mode=mode, cuda_graphs=graphs)
        out = drive(rt, [150, 161, 40], steps=120, seed=s, collect=True, allow_near_ties=True)
        assert out["selection_mismatches"] == 0
        outs.append(out["outputs"])
        if graphs:
            g = rt._decoder.graphs
            assert g.captures > 0 and g.replays > 100, (g.captures, g.replays)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("mode", ["zero_copy", "copy_engine"])
def test_decode_with_cuda_graphs_equals_append_then_attend(mode):
    """decode() (append + select captured as one segment) against the eager two-call path, bit for bit."""
    s = seed()
    outs = []
    for fused, graphs in ((False, False), (True, True)):
        rt = small_runtime(slots=10, victim="lru", device="cuda", mode=mode, cuda_graphs=graphs)
        out = drive(rt, [150, 161, 40], steps=120, seed=s, collect=True, allow_near_ties=True, fused=fused)
        assert out["selection_mismatches"] == 0
        outs.append(out["outputs"])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("graphs", [False, True])
def test_inline_gather_equals_the_copy_stream_path_on_cuda(graphs):
    """decode() with the zero-copy gather inside the layer's segment (one graph per layer) against the
    side-stream path, bit for bit; a delayed write-back must not change it either."""
    s = seed()
    outs = []
    for inline in (False, True):
        rt = small_runtime(slots=10, victim="lru", device="cuda", mode="zero_copy", cuda_graphs=graphs and inline,
                           inline_gather=inline)
        rt.transfer.debug_writeback_delay_cycles = SLEEP_CYCLES if inline else 0
        out = drive(rt, [150, 161, 40], steps=120, seed=s, collect=True, allow_near_ties=True, fused=True)
        assert out["selection_mismatches"] == 0 and out["snapshot"].totals.misses > 0
        outs.append(out["outputs"])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("inline, per_stream", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("graphs", [False, True])
def test_micro_batches_on_two_streams_equal_one_batch(graphs, inline, per_stream):
    """Two micro-batches decoded on two CUDA streams, interleaved per layer (their copies and compute
    overlap), against one batch on one stream: bit for bit, same counters, under graphs too (each
    micro-batch has its own static buffers and graph pool), with a delayed write-back; with one H2D
    stream or one per micro-batch (`per_stream_copies`, each copy delayed too)."""
    s = seed()
    runs, layer_counts = [], []
    for parts in (1, 2):
        rt = small_runtime(slots=10, victim="lru", device="cuda", mode="zero_copy", cuda_graphs=graphs,
                           inline_gather=inline, per_stream_copies=per_stream)
        rt.transfer.debug_writeback_delay_cycles = SLEEP_CYCLES if parts == 2 else 0
        rt.transfer.debug_delay_cycles = SLEEP_CYCLES // 4 if parts == 2 and per_stream else 0
        runs.append(drive(rt, [150, 161, 40, 99], steps=120, seed=s, collect=True, allow_near_ties=True,
                          fused=True, micro_batches=parts))
        assert runs[-1]["selection_mismatches"] == 0 and runs[-1]["snapshot"].totals.misses > 0
        torch.cuda.synchronize()
        layer_counts.append(rt.counters.layer_counts.cpu())  # both streams add to them: no lost update
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["outputs"], runs[1]["outputs"]))
    assert torch.equal(*layer_counts)


@pytest.mark.parametrize("graphs", [False, True])
def test_row_moves_block_openings_and_knob_changes_on_cuda(graphs):
    """End a middle request (rows move, the batch shape changes), grow and shrink slots: still exact."""
    from test_runtime_lifecycle import Session

    rt = small_runtime(slots=8, device="cuda", cuda_graphs=graphs, max_gpu_slots=16)
    s = Session(rt)
    for i, T in enumerate([150, 90, 200]):
        s.begin(i, T)
    for _ in range(40):
        s.step([0, 1, 2])
    rt.end_request("r1")
    rt.request_knobs(rt.knobs().with_changes({"gpu_slots": 16}, 8))
    for _ in range(40):
        s.step([2, 0])
    rt.request_knobs(rt.knobs().with_changes({"gpu_slots": 9, "victim_policy": "eviction_score"}, 8))
    for _ in range(40):
        s.step([0, 2])


@pytest.mark.parametrize("inline, victim, order, delay, parts, per_stream", [
    (False, "lru", None, 0, 1, False), (False, "eviction_score", [1, 2, 0], 0, 1, False), (True, "lru", None, 0, 1, False),
    (False, "lru", [2, 0, 1], SLEEP_CYCLES, 1, False), (False, "lru", None, 0, 2, False),
    (True, "lru", [1, 0, 2], SLEEP_CYCLES, 2, False), (False, "lru", [1, 0, 2], SLEEP_CYCLES, 2, True),
    (False, "eviction_score", None, SLEEP_CYCLES, 2, True)])
def test_step_graphs_equal_reference_and_segment_graphs(inline, victim, order, delay, parts, per_stream):
    """Whole steps captured as one graph (copies as fork/join branches, write-backs from padded lists,
    the plans uploaded before the replay; one batch, or two micro-batches on two streams inside the
    graph) against one batch under segment graphs: the reference's selections, the same outputs and
    counters bit for bit; late copies on the copy streams (one H2D stream, or one per micro-batch:
    `per_stream_copies`) change nothing."""
    s = seed()
    runs = []
    for step_graphs in (False, True):
        rt = small_runtime(slots=10, victim=victim, device="cuda", mode="zero_copy", cuda_graphs=True,
                           inline_gather=inline, per_stream_copies=per_stream and step_graphs)
        if step_graphs:
            rt.transfer.debug_delay_cycles = rt.transfer.debug_writeback_delay_cycles = delay
        print(f"run: step_graphs={step_graphs}")
        runs.append(drive(rt, [150, 161, 40], steps=150, seed=s, collect=True, allow_near_ties=True, fused=True,
                          order=order, step_graphs=step_graphs, micro_batches=parts if step_graphs else 1))
        assert runs[-1]["selection_mismatches"] == 0
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["outputs"], runs[1]["outputs"]))
    assert counts(runs[0]) == counts(runs[1]) and runs[1]["snapshot"].totals.bytes_d2h > 0
    runner = runs[1]["runner"]
    assert runner.captures >= 3 and runner.replays >= 140 - runner.eager_steps, vars(runner)


@pytest.mark.parametrize("inline, per_stream", [(False, False), (True, False), (False, True)])
def test_step_graphs_order_and_join_the_body_streams_themselves(inline, per_stream):
    """A StepGraphs body that runs two micro-batches on their own streams and orders none of them (an
    attention backend's forward does not know about the runtime's plans): the runtime makes each
    stream wait for its plan's upload (or forks it into the capture) and joins them at the boundary.
    A sleep on the caller's stream before every step makes the inputs and the plan upload late, and
    one on each part stream before its last output copy makes the parts late: the outputs still equal
    one batch's under segment graphs bit for bit. CPU twin of the ordering logic:
    test_plan_streams_wait_for_the_upload_fork_in_captures_and_join_at_the_boundary."""
    s = seed()
    runs = []
    for unordered in (False, True):
        rt = small_runtime(slots=10, victim="lru", device="cuda", mode="zero_copy", cuda_graphs=True,
                           inline_gather=inline, per_stream_copies=per_stream and unordered)
        runs.append(drive(rt, [150, 161, 40], steps=80, seed=s, collect=True, allow_near_ties=True, fused=True,
                          step_graphs=unordered, micro_batches=2 if unordered else 1,
                          unordered_delay=SLEEP_CYCLES if unordered else None))
        assert runs[-1]["selection_mismatches"] == 0
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["outputs"], runs[1]["outputs"]))
    assert counts(runs[0]) == counts(runs[1])
    assert runs[1]["runner"].captures >= 1 and runs[1]["runner"].replays >= 1, vars(runs[1]["runner"])


@pytest.mark.parametrize("graphs", [False, True])
def test_requests_that_change_stream_see_their_prefetches(graphs, monkeypatch):
    """per_stream_copies: after every step each request moves to the other micro-batch's stream, and
    every copy is late, prefetches included (forced to move blocks). A prefetch is waited by no attention
    of its own step, so it must land before the next step reads it from another stream and its H2D
    stream: the step boundary joins every copy stream. Against one batch on one stream: bit for bit,
    same counts. CPU twin of the outputs: test_prefetches_that_move_blocks_change_no_output."""
    force_prefetches(monkeypatch)
    s = seed()
    runs = []
    for parts in (1, 2):
        rt = small_runtime(slots=10, victim="eviction_score", prefetch=True, device="cuda", mode="zero_copy",
                           cuda_graphs=graphs, per_stream_copies=parts == 2)
        rt.transfer.debug_delay_cycles = SLEEP_CYCLES // 4 if parts == 2 else 0
        runs.append(drive(rt, [600, 520, 410, 300], steps=60, seed=s, collect=True, allow_near_ties=True,
                          fused=True, micro_batches=parts, rotate_streams=parts == 2))
        assert runs[-1]["selection_mismatches"] == 0 and runs[-1]["snapshot"].totals.prefetched > 500
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["outputs"], runs[1]["outputs"]))
    assert counts(runs[0]) == counts(runs[1])


def test_inline_gathers_wait_for_prefetches_from_before_a_knob_change(monkeypatch):
    """Eviction-score victims with prefetch on keep the copy-stream path; once the knob turns prefetch
    off, decode() gathers inline on the compute stream, which issues no copy of its own on the H2D
    stream: the last prefetches (late, forced to move blocks) must still land before the next step reads
    them. CPU twin of the path switch: test_inline_gather_steps_aside_for_prefetch."""
    force_prefetches(monkeypatch)
    rt = small_runtime(slots=10, victim="eviction_score", prefetch=True, device="cuda", mode="zero_copy",
                       inline_gather=True)
    rt.transfer.debug_delay_cycles = SLEEP_CYCLES
    layers_run = []

    def turn_prefetch_off(layer: int) -> None:
        layers_run.append(layer)
        if len(layers_run) == 20 * rt.shape.num_layers:  # after step 20; applied at its boundary
            rt.request_knobs(replace(rt.knobs(), prefetch=False))

    out = drive(rt, [600, 520, 410], steps=40, seed=seed(), allow_near_ties=True, fused=True,
                on_attend=turn_prefetch_off)
    assert out["selection_mismatches"] == 0 and out["snapshot"].totals.prefetched > 100
    assert rt._decoder._inline(nosa=True)


@pytest.mark.parametrize("step_graphs", [False, True])
def test_programmatic_dependent_launches_change_nothing(step_graphs, monkeypatch):
    """The decode chain's kernels as programmatic dependent launches (kernels/pdl.py), in segment graphs
    and in whole-step graphs with two micro-batches: the same outputs and counts bit for bit as plain
    launches, and the reference's selections."""
    from nosa_sglang.kernels import pdl

    s = seed()
    runs = []
    for enabled in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", enabled)
        rt = small_runtime(slots=10, victim="lru", device="cuda", mode="zero_copy", cuda_graphs=True)
        runs.append(drive(rt, [600, 520, 410], steps=60, seed=s, collect=True, allow_near_ties=True, fused=True,
                          step_graphs=step_graphs, micro_batches=2 if step_graphs else 1))
        assert runs[-1]["selection_mismatches"] == 0
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["outputs"], runs[1]["outputs"]))
    assert counts(runs[0]) == counts(runs[1])


def written_back_blocks(rt: NosaRuntime, request_ids: list[str]) -> dict[tuple, torch.Tensor]:
    """K and V of every host block but each request's last (its open tail), per (request, layer, block, head)."""
    H = rt.shape.num_kv_heads
    return {(rid, layer, b, h): torch.cat((rt.host.layer_k(layer)[b * H + h], rt.host.layer_v(layer)[b * H + h]))
            for rid in request_ids for b in list(rt.host_blocks(rid))[:-1]
            for layer in range(rt.shape.num_layers) for h in range(H)}


@pytest.mark.gpu
def test_eager_step_graph_write_backs_reach_the_host():
    """StepGraphs runs each new kind of step eagerly once. Its write-backs, delayed here, must not read
    the step plan's device lists, which the next step's upload overwrites before the write-back stream
    gets to them (once seen as a wrong output after an evicted block was re-fetched): every block
    written back equals the segment-graph path's, compared in the host store itself. CPU twin of the
    logic (CPU copies are synchronous): test_write_back_hands_device_id_lists_to_the_copy_stream_only_inside_a_capture."""
    s = seed()
    stores = []
    for step_graphs in (False, True):
        rt = small_runtime(slots=10, victim="lru", device="cuda", mode="zero_copy", cuda_graphs=True)
        if step_graphs:
            rt.transfer.debug_writeback_delay_cycles = SLEEP_CYCLES
        out = drive(rt, [150, 161, 40], steps=60, seed=s, check=False, fused=True, step_graphs=step_graphs)
        torch.cuda.synchronize()
        stores.append(written_back_blocks(rt, out["ids"]))
    assert stores[0].keys() == stores[1].keys() and len(stores[0]) > 0
    wrong = [key for key in stores[0] if not torch.equal(stores[0][key], stores[1][key])]
    assert not wrong, f"{len(wrong)} of {len(stores[0])} host runs differ, e.g. {wrong[:4]}"


def test_step_graphs_gpu_only_and_copy_engine_fallback():
    """NOSA fully on the GPU captures too; the copy-engine mode (host read-back) runs its steps eagerly;
    a runtime without static plan buffers is refused."""
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        StepGraphs(small_runtime(device="cuda"), [["req0"]], list)
    s = seed()
    for kw, captured in ((dict(gpu_only=True), True), (dict(mode="copy_engine"), False)):
        rt = small_runtime(slots=10, device="cuda", cuda_graphs=True, **kw)
        out = drive(rt, [150, 60], steps=120, seed=s, allow_near_ties=True, fused=True, step_graphs=True)
        assert out["selection_mismatches"] == 0
        runner = out["runner"]
        assert (runner.captures > 0 and runner.replays > 100) if captured else runner.eager_steps == 120, vars(runner)


def test_step_graphs_recapture_after_knob_changes_and_row_moves():
    """A slot-count change drops the graphs (generation): later steps capture again and stay exact."""
    rt = small_runtime(slots=8, device="cuda", mode="zero_copy", cuda_graphs=True, max_gpu_slots=16)
    calls = [0]

    def on_attend(layer):
        calls[0] += 1
        if calls[0] == 2 * 50:  # after step 50's last layer
            rt.request_knobs(rt.knobs().with_changes({"gpu_slots": 16}, 8))

    out = drive(rt, [150, 161, 40], steps=120, seed=seed(), allow_near_ties=True, fused=True, step_graphs=True,
                on_attend=on_attend)
    assert out["selection_mismatches"] == 0 and rt.slots.active == 16
    runner = out["runner"]
    assert runner.captures >= 2 and runner._generation == rt.graph_generation, vars(runner)


def test_default_config_at_real_head_dim_equals_reference():
    shape = ModelShape(1, 8, 2, 128, torch.float32)
    rt = NosaRuntime(shape, NosaConfig(), OffloadKnobs(gpu_slots=80), device="cuda", host_capacity_bytes=1 << 28,
                     max_requests=2, max_seq_len=16384)
    out = drive(rt, [64 * 100 + 7, 64 * 90], steps=200, seed=seed(), allow_near_ties=True)
    assert out["selection_mismatches"] == 0 and out["snapshot"].totals.misses > 0
    assert out["near_ties"] <= 4, out["near_ties"]  # of 200 attends


def test_gpu_only_on_cuda_equals_reference():
    rt = small_runtime(device="cuda", gpu_only=True)
    out = drive(rt, [150, 60], steps=200, seed=seed(), allow_near_ties=True)
    assert out["selection_mismatches"] == 0


@pytest.mark.parametrize("mode", ["zero_copy", "copy_engine"])
def test_offload_equals_gpu_only_bit_for_bit(mode):
    """The promise itself, free of fp32-vs-fp64 near ties (CPU twin in test_runtime_equivalence.py)."""
    assert_offload_equals_gpu_only("cuda", mode, steps=400, seed=seed())


def test_snapshot_never_waits_for_the_gpu():
    rt = small_runtime(device="cuda")
    drive(rt, [150], steps=3, seed=seed())
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU work queued on the compute stream
    rt.step_boundary()  # publishes counters behind the sleep
    t0 = time.perf_counter()
    snap = rt.snapshot()
    assert time.perf_counter() - t0 < 0.05
    assert snap.steps >= 2  # an earlier, completed publication
    torch.cuda.synchronize()


def test_infllmv2_policy_runs_on_the_same_runtime():
    rt = NosaRuntime(ModelShape(1, 4, 2, 16, torch.float32), SMALL, OffloadKnobs(gpu_slots=8, victim_policy="lru"),
                     device="cuda", host_capacity_bytes=1 << 22, max_requests=2, max_seq_len=1024,
                     selection_policy="infllmv2")
    out = drive(rt, [300], steps=20, seed=seed(), check=False)
    assert out["snapshot"].totals.misses > 0
