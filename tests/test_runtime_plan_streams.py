"""PlanStreams on CPU: which stream waits for what (the CUDA twin:
test_runtime_gpu.py::test_step_graphs_order_and_join_the_body_streams_themselves)."""

from __future__ import annotations

from nosa_sglang.runtime.plan_streams import PlanStreams


class FakeStream:
    """Records the waits a torch.cuda.Stream would enqueue."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_event(self, event) -> None:
        self.log.append((self.name, "waits for event", event))

    def wait_stream(self, stream) -> None:
        self.log.append((self.name, "waits for stream", stream.name))


def streams(*names):
    log: list = []
    return log, [FakeStream(n, log) for n in names]


def test_plan_streams_wait_for_the_upload_fork_in_captures_and_join_at_the_boundary():
    log, (caller, part0, part1) = streams("caller", "part0", "part1")
    ps = PlanStreams(caller, "uploaded")
    ps.enter(caller)  # the stream that built the plan is ordered already
    ps.enter(part0)
    ps.enter(part0)  # only its first layer waits
    ps.enter(part1)
    assert log == [("part0", "waits for event", "uploaded"), ("part1", "waits for event", "uploaded")]
    log.clear()
    ps.join_into(caller)
    assert log == [("caller", "waits for stream", "part0"), ("caller", "waits for stream", "part1")]
    assert ps.forked == []


def test_inside_a_capture_streams_fork_from_the_capture_stream_and_the_capture_joins_them():
    log, (caller, capture, part0, part1) = streams("caller", "capture", "part0", "part1")
    ps = PlanStreams(caller, "uploaded")
    ps.enter(capture, capture_stream=capture)  # the capture stream itself neither forks nor waits
    ps.enter(part0, capture_stream=capture)
    ps.enter(part1, capture_stream=capture)
    ps.enter(part1, capture_stream=capture)
    assert log == [("part0", "waits for stream", "capture"), ("part1", "waits for stream", "capture")]
    log.clear()
    ps.join_forked(capture)  # inside the capture: never the caller's stream (outside the capture)
    assert log == [("capture", "waits for stream", "part0"), ("capture", "waits for stream", "part1")]
    assert ps.forked == []
    log.clear()
    ps.join_into(caller)  # the boundary, after the replay
    assert [w[2] for w in log] == ["capture", "part0", "part1"]
