"""StepGraphs: a whole decode step (every layer) of one batch as one CUDA graph.

Why: with segment graphs each layer still costs the host two graph launches, input copies, event
records and the gather launch (~0.2-0.5 ms a layer on an H200 host); at batches of <= ~20 that, not
the GPU, set the step time (benchmarks/results/runtime.md). SGLang captures its decode forward the
same way, so this is also the runtime's half of SGLang's CUDA-graph decode.

What changes inside a captured step (NosaRuntime.in_step_graph):
- the step plan is built and uploaded before the replay (`begin_step`), at the fixed address of the
  batch's static buffer, with the write-back lists padded to every (row, head);
- the per-layer segments are plain parts of the capture, and read the caller's inputs in place (the
  caller's body must read them from fixed addresses, as a captured model does);
- copies on the H2D and write-back streams are fork/join branches of the graph: a miss copy forks
  after the layer's selection and joins before its attention; prefetches and write-backs join at the
  end of the step. A step therefore starts with no copy in flight;
- copy times are not measured (a graph cannot time its nodes for the host); hits, misses and bytes are.

A key (rows, caller order, which of open/complete/fill happen, knobs) is run eagerly the first time
(kernels compile, launchers are made), captured the second, replayed after. Steps the graph cannot
hold (copy-engine mode reads the miss list back; rows not contiguous) run eagerly with segment graphs.
"""

from __future__ import annotations

from typing import Callable, Generic, Hashable, Sequence, TypeVar

import torch

from nosa_sglang.runtime import graph_capture
from nosa_sglang.runtime.nosa_runtime import NosaRuntime
from nosa_sglang.runtime.step_plan import StepPlan
from nosa_sglang.runtime.transfer import ZERO_COPY_SKIPS_PADDING

T = TypeVar("T")


class StepGraphs(Generic[T]):
    """Decode steps of `batches` through `body`, captured per key.

    batches: the step's micro-batches, each a sequence of request ids (usually one: `[ids]`).
    body: every layer's `rt.decode` of every micro-batch, on any streams: the runtime orders each
    stream after its plan (or forks it into the capture) and joins them all (PlanStreams); the body
    orders only its own data, e.g. inputs it makes on one stream and reads on another."""

    def __init__(self, rt: NosaRuntime, batches: Sequence[Sequence[str]], body: Callable[[], T]) -> None:
        if rt.device.type == "cuda" and not rt.cuda_graphs:
            raise ValueError("StepGraphs: the runtime needs cuda_graphs=True (static step-plan buffers)")
        if not batches or any(isinstance(b, str) or not b for b in batches):
            raise ValueError(f"StepGraphs: batches must be a non-empty list of non-empty request-id lists, got {batches!r}")
        self.rt, self.batches, self.body = rt, [tuple(b) for b in batches], body
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, T]] = {}
        self._seen: set[Hashable] = set()
        self._pool = None
        self._generation = rt.graph_generation
        self.eager_steps = self.captures = self.replays = 0

    def step(self) -> T:
        """One decode step, closed with `step_boundary()`. Returns what body returned; after a replay,
        the graph's buffers: consume them before the next step."""
        rt = self.rt
        plans = [rt.begin_step(ids) for ids in self.batches]  # NOTE: uploads on this stream, before the replay
        if rt.graph_generation != self._generation:
            self._clear()
        keys = [self._key(p) for p in plans]
        key = None if None in keys else tuple(keys)
        if key is None:
            self.eager_steps += 1
            out = self.body()
        elif key in self._graphs:
            out = self._replay(plans, key)
        elif key not in self._seen or rt.device.type != "cuda":  # NOTE: CPU runs the path eagerly (the test twin)
            self._seen.add(key)
            self.eager_steps += 1
            out = self._in_step_graph(self.body)
        else:
            out = self._capture(plans, key)
        rt.step_boundary()
        return out

    @property
    def unreplayed_steps(self) -> int:
        """Steps that did not replay a graph (run eagerly, or captured)."""
        return self.eager_steps + self.captures

    def _key(self, p: StepPlan) -> Hashable | None:
        """What a captured step depends on beyond the fixed addresses; None: not capturable now."""
        rt = self.rt
        if p.row_range is None:
            return None
        if not rt.gpu_only and rt.transfer.mode != "cpu" and not (rt.transfer.mode == "zero_copy"
                                                                 and ZERO_COPY_SKIPS_PADDING):
            return None  # NOTE: the copy-engine path reads the miss list back on the host
        mode = None if rt.gpu_only else rt.transfer.mode
        return (p.row_range, p.perm is None, p.any_open, p.any_complete, p.wb_src is not None, mode,
                rt.knobs().prefetch)

    def _in_step_graph(self, fn: Callable[[], T]) -> T:
        rt = self.rt
        if rt.transfer is not None:
            rt.transfer.quiesce()  # NOTE: a graph step starts with no copy in flight (it waits on none)
        rt.in_step_graph = True
        try:
            return fn()
        finally:
            rt.in_step_graph = False

    def _capture(self, plans: list[StepPlan], key: Hashable) -> T:
        rt = self.rt
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()

        def capture() -> T:
            try:
                with graph_capture.capture(graph, self._pool):
                    rt.capture_stream = torch.cuda.current_stream()
                    out = self.body()
                    rt.join_captured_plan_streams()
                    if rt.transfer is not None:
                        rt.transfer.join_forked()
            except BaseException:
                if rt.transfer is not None:
                    rt.transfer.abandon_capture()
                rt.abandon_captured_plan_streams()
                for p in plans:  # NOTE: nothing ran; the step may be repeated
                    p.appended.clear()
                    p.attended.clear()
                raise
            finally:
                rt.capture_stream = None
            return out

        out = self._in_step_graph(capture)
        self._graphs[key] = (graph, out)
        self.captures += 1
        return self._replay(plans, key, counted=True)

    def _replay(self, plans: list[StepPlan], key: Hashable, counted: bool = False) -> T:
        """Replay the step's graph and do the host bookkeeping its layers would have done."""
        rt = self.rt
        graph, out = self._graphs[key]
        if rt.transfer is not None:
            rt.transfer.quiesce()
        graph.replay()
        self.replays += 1
        L = rt.shape.num_layers
        for p in plans:
            if not counted:  # NOTE: a capture ran the body's host side already
                p.appended.update(range(L))
                p.attended.update(range(L))
            if p.wb_src is not None:
                for layer in range(L):
                    rt.counters.add_write_back(layer, p.wb_src.numel())
        return out

    def _clear(self) -> None:
        """Drop every graph: the runtime's rows, slots, knobs or static buffers changed under them."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None
        self._generation = self.rt.graph_generation
