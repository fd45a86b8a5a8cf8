"""TransferEngine's H2D streams on CPU, with fake CUDA streams and events: which stream each copy runs
on and which copy each wait waits for, for one shared H2D stream and for one per compute stream
(`per_stream_copies`). The CUDA twins run the same steps on a GPU:
test_runtime_gpu.py::test_micro_batches_on_two_streams_equal_one_batch and the step-graph tests with
`per_stream_copies`."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_runtime_equivalence import small_runtime

from nosa_sglang.kernels import block_copy


class FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_event(self, event) -> None:
        self.log.append((self.name, "waits", event.name))

    def wait_stream(self, stream) -> None:
        self.log.append((self.name, "waits stream", stream.name))


class FakeCuda:
    """The torch.cuda calls TransferEngine makes, recorded: events are named by the stream they were
    recorded on and a count."""

    def __init__(self, log: list) -> None:
        self.log, self.current, self.made, self.events = log, None, 0, 0

    def stream_factory(self, *args, **kwargs) -> FakeStream:
        self.made += 1
        return FakeStream(f"h2d{self.made}", self.log)

    def event(self, *args, **kwargs):
        fake = self

        class Event:
            name = "?"

            def record(self, stream=None) -> None:
                fake.events += 1
                self.name = f"{(stream or fake.current).name}#{fake.events}"

        return Event()

    @contextlib.contextmanager
    def stream(self, s):
        before, self.current = self.current, s
        yield
        self.current = before


class Copies:
    """gather_runs stand-in: which stream each copy was issued on."""

    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda, self.on = cuda, []

    def __call__(self, *args, stream=None, **kwargs):
        self.on.append(self.cuda.current.name)


@pytest.fixture
def fake(monkeypatch):
    log: list = []
    cuda = FakeCuda(log)
    copies = Copies(cuda)
    monkeypatch.setattr(torch.cuda, "Stream", cuda.stream_factory)
    monkeypatch.setattr(torch.cuda, "Event", cuda.event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: cuda.current)
    monkeypatch.setattr(torch.cuda, "stream", cuda.stream)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(block_copy, "gather_runs", copies)
    return log, cuda, copies


class Timings:
    def __init__(self) -> None:
        self.waited = []

    def add_timing(self, layer, start, end, ready=None) -> None:
        self.waited.append((layer, end.name))


def engine(per_stream: bool, log: list):
    """The runtime's TransferEngine, switched to the fake CUDA (copy-engine mode: ids stay on the host)."""
    t = small_runtime(slots=10, victim="lru", mode="copy_engine").transfer
    t.cuda, t.mode, t.per_stream_copies = True, "copy_engine", per_stream
    t.h2d_stream, t.writeback_stream = FakeStream("h2d", log), FakeStream("wb", log)
    t.counters = Timings()
    return t


def copy_on(t, cuda, compute, layer: int) -> None:
    cuda.current = compute
    t._issue(layer, torch.tensor([0]), torch.tensor([0]))


def two_micro_batches(fake, per_stream: bool):
    """The engine after micro-batches on compute streams a and b each copied into layer 0."""
    log, cuda, copies = fake
    t = engine(per_stream, log)
    a, b = FakeStream("a", log), FakeStream("b", log)
    copy_on(t, cuda, a, 0)
    copy_on(t, cuda, b, 0)
    return log, cuda, copies, t, a, b


def test_one_shared_h2d_stream_carries_every_micro_batchs_copies(fake):
    log, cuda, copies, t, a, b = two_micro_batches(fake, per_stream=False)
    assert copies.on == ["h2d", "h2d"]
    log.clear()
    cuda.current = a
    t.wait_h2d(0)  # a slot about to be reused: the shared stream's last copy of the layer
    assert log == [("a", "waits", "h2d#6")]
    log.clear()
    cuda.current = b
    t.wait_for_layer(0)  # the shared stream's last copy: b's, behind a's
    assert log == [("b", "waits", "h2d#6")]
    assert [w[1] for w in t.counters.waited] == ["h2d#3", "h2d#6"]
    log.clear()
    cuda.current = a
    t.wait_for_layer(0)  # nothing left unwaited
    assert log == []


def test_per_stream_copies_pair_each_compute_stream_with_its_own_h2d_stream(fake):
    log, cuda, copies, t, a, b = two_micro_batches(fake, per_stream=True)
    copy_on(t, cuda, a, 1)
    assert copies.on == ["h2d1", "h2d2", "h2d1"]  # made once per compute stream, then reused
    assert ("h2d2", "waits", "b#4") in log  # b's copy waits for b's compute (the diff), not a's
    log.clear()
    cuda.current = a
    t.wait_for_layer(0)  # a waits for its own copy only
    assert log == [("a", "waits", "h2d1#3")]
    log.clear()
    cuda.current = b
    t.wait_h2d(0)  # a slot about to be reused: b's rows only take b's copies (earlier ones: the boundary)
    assert log == [("b", "waits", "h2d2#6")]
    log.clear()
    t.wait_for_layer(0)
    assert log == [("b", "waits", "h2d2#6")]
    log.clear()
    t.join_copy_streams()  # the step boundary: a prefetch is waited by no attention of its step
    assert log == [("b", "waits stream", "h2d1"), ("b", "waits stream", "h2d2")]
    log.clear()
    t.quiesce()
    streams = {"h2d", "h2d1", "h2d2", "wb"}
    assert {s for who, _, s in log if who == "b"} == streams
    assert {who for who, _, s in log if s == "b"} == streams
    assert ("b", "waits stream", "h2d1") in log
    assert (1, "h2d1#9") in t.counters.waited  # quiesce resolves the timing nobody waited for


def test_the_shared_stream_is_not_joined_at_the_boundary(fake):
    log, cuda, _ = fake
    t = engine(False, log)
    cuda.current = FakeStream("a", log)
    copy_on(t, cuda, cuda.current, 0)
    log.clear()
    t.join_copy_streams()  # the next step's copies queue behind it anyway
    assert log == []
