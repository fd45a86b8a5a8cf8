"""PlanStreams on CPU: which stream waits for what (the CUDA twin:
test_runtime_gpu.py::test_step_graphs_order_and_join_the_body_streams_themselves)."""

from __future__ import annotations

from nosa_sglang.runtime.plan_streams import PlanStreams


class FakeStream:
    """Records the waits a torch.cuda.Stream would enqueue."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_event(self, event) -> None:
        self.log.append((self.name, "event", event))

    def wait_stream(self, stream) -> None:
        self.log.append((self.name, "stream", stream.name))


def streams(*names):
    log: list = []
    return log, [FakeStream(n, log) for n in names]


def test_a_streams_first_layer_waits_for_the_upload_and_the_plans_other_streams():
    log, (caller, part0, part1) = streams("caller", "part0", "part1")
    ps = PlanStreams(caller, "uploaded")
    ps.enter(part0)
    ps.enter(part0)  # only its first layer waits
    assert log == [("part0", "event", "uploaded")]
    log.clear()
    ps.enter(part1)  # e.g. this layer's attend after part0's append: it must see what part0 wrote
    assert log == [("part1", "event", "uploaded"), ("part1", "stream", "part0")]
    log.clear()
    ps.enter(caller)  # the stream that built the plan needs no event, but the others' layers
    assert log == [("caller", "stream", "part0"), ("caller", "stream", "part1")]
    log.clear()
    ps.join_into(caller)  # the step boundary
    assert log == [("caller", "stream", "part0"), ("caller", "stream", "part1")]


def test_the_boundary_joins_the_plans_stream_even_when_no_layer_ran_on_it():
    log, (builder, boundary) = streams("builder", "boundary")
    PlanStreams(builder, "uploaded").join_into(boundary)
    assert log == [("boundary", "stream", "builder")]


def test_inside_a_capture_streams_fork_from_the_capture_stream_and_the_capture_joins_them():
    log, (caller, capture, part0, part1) = streams("caller", "capture", "part0", "part1")
    ps = PlanStreams(caller, "uploaded")
    ps.enter(part0)  # outside the capture (an eager step of the same plan): does not count inside it
    log.clear()
    ps.enter(capture, capture_stream=capture)  # the capture stream itself neither forks nor waits
    ps.enter(part0, capture_stream=capture)
    ps.enter(part0, capture_stream=capture)
    ps.enter(caller, capture_stream=capture)  # a stream used before the capture still forks into it
    assert log == [("part0", "stream", "capture"), ("caller", "stream", "capture"), ("caller", "stream", "part0")]
    log.clear()
    ps.join_captured(capture)  # inside the capture: never an event or stream from outside it
    assert log == [("capture", "stream", "part0"), ("capture", "stream", "caller")]
    log.clear()
    ps.enter(part1, capture_stream=capture)  # a new capture of the plan starts from nothing
    assert log == [("part1", "stream", "capture")]
    log.clear()
    ps.abandon_capture()  # a failed capture: its streams fork again when the step is repeated
    ps.enter(part1, capture_stream=capture)
    assert log == [("part1", "stream", "capture")]


def test_is_new_counts_only_layers_run_outside_a_capture():
    _, (caller, capture, part0) = streams("caller", "capture", "part0")
    ps = PlanStreams(caller, "uploaded")
    ps.enter(part0, capture_stream=capture)
    assert ps.is_new(part0) and ps.is_new(caller)
    ps.enter(part0)
    assert not ps.is_new(part0)


def test_the_boundary_waits_once_for_a_plan_built_on_the_stream_that_ran_it():
    log, (part, main) = streams("part", "main")
    ps = PlanStreams(part, "uploaded")  # MicroBatches without begin_step: the first decode builds the plan
    ps.enter(part)
    ps.join_into(main)
    assert log == [("main", "stream", "part")]


def test_a_capture_other_than_step_graphs_is_refused_with_a_reason(monkeypatch):
    """Inside a foreign CUDA-graph capture the plan's upload event cannot be waited on (CUDA would fail
    the capture with an isolation error): the runtime says why instead. The CPU half of the check; on
    CUDA it runs at a stream's first layer of a plan and when a plan is built."""
    import pytest
    import torch
    from test_runtime_equivalence import small_runtime

    from nosa_sglang.runtime import RuntimeUsageError

    rt = small_runtime()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeUsageError, match="capture other than StepGraphs"):
        rt._refuse_foreign_capture("batch ('req0',)")
    rt.capture_stream = object()  # StepGraphs' own capture
    rt._refuse_foreign_capture("batch ('req0',)")
