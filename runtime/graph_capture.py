"""capture(): a CUDA graph capture with Python's garbage collector paused.

Why: torch no longer collects garbage before a capture (`torch.compiler.config.force_cudagraph_gc` is
off by default), so a dead reference cycle that holds a CUDA graph (a discarded runtime, an earlier
test's) may be collected automatically in the middle of a capture. Destroying a graph is not
permitted while this thread captures: CUDA invalidates the capture, and it fails at a later launch with
"operation failed due to a previous error during capture" (seen at random on the H200 in a segment
capture). With the collector paused the garbage waits until the capture ends; nothing else changes.
The collector is one per process, so overlapping pauses (captures on two threads, or nested) count:
the last one to end restores it.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

import torch


_lock = threading.Lock()
_pauses = 0
_was_enabled = False


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No automatic garbage collection inside; once the last overlapping pause ends, the collector's
    state from before the first."""
    global _pauses, _was_enabled
    with _lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()


@contextlib.contextmanager
def capture(graph: torch.cuda.CUDAGraph, pool) -> Iterator[None]:
    """`torch.cuda.graph(graph, pool)` on torch's side stream, thread-local error mode (control threads
    keep querying events meanwhile), with the collector paused."""
    with paused_gc(), torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        yield
