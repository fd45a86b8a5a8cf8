"""graph_capture: captures run with the garbage collector paused, so a dead cycle holding a CUDA graph is
never collected mid-capture (CUDA would invalidate the capture). CPU: the collector's state; GPU: the
hazard itself, without and with the pause."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from nosa_sglang.runtime.graph_capture import capture, paused_gc

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")


class Cycle:
    """A reference cycle that records its collection (and may hold a CUDA graph)."""
    collected = 0

    def __init__(self, payload=None) -> None:
        self.me, self.payload = self, payload

    def __del__(self) -> None:
        Cycle.collected += 1


def make_garbage(payload=None) -> None:
    Cycle(payload)  # unreachable at once, but only the collector can free it


@pytest.mark.parametrize("enabled_before", [True, False])
def test_paused_gc_defers_collection_and_restores_the_collector(enabled_before):
    old_threshold, was = gc.get_threshold(), gc.isenabled()
    (gc.enable if enabled_before else gc.disable)()
    gc.collect()
    Cycle.collected = 0
    try:
        gc.set_threshold(1)  # the next container allocation would run a collection
        with paused_gc():
            assert not gc.isenabled()
            make_garbage()
            _ = [[] for _ in range(1000)]
            assert Cycle.collected == 0
        assert gc.isenabled() == enabled_before
        with pytest.raises(KeyError), paused_gc():
            raise KeyError("body failed")
        assert gc.isenabled() == enabled_before
    finally:
        gc.set_threshold(*old_threshold)
        (gc.enable if was else gc.disable)()
    gc.collect()
    assert Cycle.collected == 1


def test_overlapping_pauses_keep_the_collector_off_until_the_last_ends():
    """Captures on two threads overlap: the first to end must not turn the collector back on."""
    was = gc.isenabled()
    gc.enable()
    try:
        first, second = paused_gc(), paused_gc()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert not gc.isenabled()
        second.__exit__(None, None, None)
        assert gc.isenabled()
        started, release = threading.Event(), threading.Event()

        def capture_on_a_thread():
            with paused_gc():
                started.set()
                release.wait(10)

        t = threading.Thread(target=capture_on_a_thread)
        t.start()
        started.wait(10)
        with paused_gc():
            pass
        assert not gc.isenabled()  # the thread's pause is still on
        release.set()
        t.join(10)
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


def captured_graph() -> list[tuple]:
    """[(a captured CUDA graph, its output)]: the caller's list is the only way to them."""
    x = torch.ones(1 << 16, device="cuda")
    g = torch.cuda.CUDAGraph()
    with capture(g, None):
        y = x * 3
    return [(g, y)]


def capture_with_collections(ctx, holder: list[tuple]) -> tuple[torch.Tensor, int]:
    """(the replayed output, cycles collected during the capture)."""
    x = torch.arange(8.0, device="cuda")
    g = torch.cuda.CUDAGraph()
    before = Cycle.collected
    with ctx(g):
        y = x * 2
        make_garbage(holder.pop())  # a young cycle is the graph's only holder: only the collector frees it
        _ = [[] for _ in range(1000)]  # container allocations: with thresholds of 1 the collector runs here
        during = Cycle.collected - before
        y += 1
    g.replay()
    return y, during


@pytest.fixture
def eager_collector():
    old_threshold, was = gc.get_threshold(), gc.isenabled()
    gc.collect()
    gc.enable()
    gc.set_threshold(1, 1, 1)
    yield
    gc.set_threshold(*old_threshold)
    (gc.enable if was else gc.disable)()
    gc.collect()


@pytest.mark.gpu
@needs_cuda
def test_plain_capture_fails_when_a_dead_graph_is_collected_during_it(eager_collector):
    """The hazard that `capture` guards against (if torch stops failing here, the guard is moot)."""
    holder, collected = captured_graph(), Cycle.collected
    stream = torch.cuda.current_stream()
    try:
        with pytest.raises(Exception, match="capture"):
            out = capture_with_collections(lambda g: torch.cuda.graph(g, capture_error_mode="thread_local"), holder)
            print(f"no error; cycles collected during the capture: {out[1]}")
    finally:
        torch.cuda.set_stream(stream)  # NOTE: a failed torch.cuda.graph leaves its capture stream current
    assert Cycle.collected == collected + 1  # collected during the capture, which then failed
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_cuda
def test_capture_defers_the_collection_of_a_dead_graph(eager_collector):
    Cycle.collected = 0
    holder = captured_graph()
    y, during = capture_with_collections(lambda g: capture(g, None), holder)
    torch.testing.assert_close(y, torch.arange(8.0, device="cuda") * 2 + 1)
    assert during == 0
    gc.collect()
    assert Cycle.collected == 1
