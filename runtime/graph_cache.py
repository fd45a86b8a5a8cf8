"""SegmentGraphs: CUDA graphs of the runtime's per-layer tensor work (opt-in: `cuda_graphs=True`).

Why: the residency diff, map updates, compressed-key appends and counters are ~100 small tensor ops per
layer; launched one by one from Python they cost a few microseconds each, a per-step floor of tens of
milliseconds at 28-32 layers. Between host-side points (the miss-list read-back, copies on other
streams, write-backs), each layer's work is a *segment* with fixed shapes that reads only buffers at
fixed addresses (the static step plan, static q/k/v/c inputs, the persistent state), so it can be
captured once and replayed.

Protocol per key (segment name, layer, batch shape, flags): the first call runs eagerly (it is that
step's real work, and it compiles/initialises every kernel), the second call captures and then replays,
later calls replay. Capture does not execute, so nothing runs twice. The graphs of one batch shape
(one micro-batch: its rows) share a memory pool: they replay one at a time on that micro-batch's stream,
and tensors a segment returns stay referenced (so their memory is never handed to another capture) and
are rewritten by every replay. Two micro-batches replay at the same time on two streams, so their
graphs must not share temporaries: one pool per shape.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch

from nosa_sglang.runtime.graph_capture import capture


#: batch shapes whose graphs are kept; a new one beyond this drops them all (a serving batch that keeps
#: changing size would otherwise capture without bound)
MAX_SHAPES = 4


class SegmentGraphs:
    """Captured segments of one runtime, keyed by (batch shape, segment key)."""

    def __init__(self) -> None:
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, object]] = {}
        self._seen: set[Hashable] = set()
        self._shapes: set[Hashable] = set()
        self._pools: dict[Hashable, object] = {}
        self.captures = 0
        self.replays = 0
        self.eager = 0  # first runs of a key (eager by design; after a clear, every key runs eagerly again)
        self.clears = 0  # every graph dropped (a 5th batch shape, rows moved, slot knobs changed)

    def run(self, shape: Hashable, key: Hashable, fn: Callable[[], object]) -> object:
        """fn() for this step: eagerly the first time, then captured and replayed."""
        if shape not in self._shapes:
            if len(self._shapes) >= MAX_SHAPES:
                self.clear()
            self._shapes.add(shape)
        key = (shape, key)
        entry = self._graphs.get(key)
        if entry is not None:
            entry[0].replay()
            self.replays += 1
            return entry[1]
        if key not in self._seen:
            self._seen.add(key)
            self.eager += 1
            return fn()
        pool = self._pools.get(shape)
        if pool is None:
            pool = self._pools[shape] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # NOTE: capture on a side stream ordered after everything queued so far (torch.cuda.graph does
        # the stream switch); the outputs are placeholders that every replay rewrites.
        with capture(graph, pool):
            out = fn()
        self._graphs[key] = (graph, out)
        self.captures += 1
        graph.replay()
        self.replays += 1
        return out

    def drop_shape(self, shape: Hashable) -> None:
        """Drop the graphs of one batch shape (before the buffers they were captured against go)."""
        for key in [k for k in self._graphs if k[0] == shape]:
            del self._graphs[key]
        self._seen = {k for k in self._seen if k[0] != shape}
        self._shapes.discard(shape)
        self._pools.pop(shape, None)

    def clear(self) -> None:
        """Drop every graph (after a change that the keys do not capture, e.g. reallocated buffers)."""
        self.clears += bool(self._graphs or self._seen)
        self._graphs.clear()
        self._seen.clear()
        self._shapes.clear()
        self._pools.clear()
