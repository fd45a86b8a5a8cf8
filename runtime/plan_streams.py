"""PlanStreams: the CUDA streams that run layers of one step plan, ordered by the runtime, not the caller.

A step plan is built and uploaded on one stream (the first decode call's, or `begin_step`'s). A
micro-batched caller then runs the plan's layers on other streams. Before this, the caller had to order
those streams after the upload and join them before the step boundary itself (`MicroBatches` did; a
StepGraphs body had to). An SGLang backend runs its layers wherever its forward runs, so the runtime
owns the contract: a stream's first layer of a plan waits for the plan's upload and for every other
stream that already ran a layer of it (a layer's attend reads what its append wrote), and the step
boundary joins every stream that ran one.

Inside a StepGraphs capture the upload (made before the capture) cannot be waited on, and the streams
used before the capture are not part of it: a stream's first layer in the capture forks it from the
capture stream (the replay follows the upload) and from the plan's other streams in this capture, and
the capture joins them before it ends (`join_captured`). Those streams are not joined at the boundary:
their captured work runs in the replay, on the replaying stream.

The caller's own data (the layer's q/k/v/c made on its stream) stays the caller's to order: the runtime
cannot see where those tensors were written.
"""

from __future__ import annotations

from typing import Protocol


class Stream(Protocol):  # torch.cuda.Stream; a Protocol so the ordering logic is tested on CPU
    def wait_event(self, event) -> None: ...
    def wait_stream(self, stream) -> None: ...


def _has(streams: list, stream) -> bool:
    return any(stream == s for s in streams)


class PlanStreams:
    """The streams that ran layers of one plan, outside a capture and inside the current capture."""

    def __init__(self, built_on: Stream, uploaded) -> None:
        """uploaded: an event recorded on `built_on` after the plan's upload."""
        self.built_on, self.uploaded = built_on, uploaded
        self.streams: list[Stream] = []  # ran a layer outside a capture
        self.captured: list[Stream] = []  # ran a layer inside the current capture (the capture stream too)

    def is_new(self, stream: Stream) -> bool:
        """Whether `stream` has yet to run a layer of the plan outside a capture."""
        return not _has(self.streams, stream)

    def enter(self, stream: Stream, capture_stream: Stream | None = None) -> None:
        """`stream` is about to run a layer of the plan: on its first layer it is ordered after the upload
        (outside a capture) or the capture stream (inside one), and after the plan's other streams."""
        ran = self.streams if capture_stream is None else self.captured
        if _has(ran, stream):
            return
        if capture_stream is None:
            if stream != self.built_on:
                stream.wait_event(self.uploaded)
        elif stream != capture_stream:
            stream.wait_stream(capture_stream)
        for s in ran:
            if s != capture_stream:  # NOTE: waited for above
                stream.wait_stream(s)
        ran.append(stream)

    def join_captured(self, capture_stream: Stream) -> None:
        """End of a capture: the capture stream waits for every stream that ran a layer in it (a capture
        must end joined)."""
        for s in self.captured:
            if s != capture_stream:
                capture_stream.wait_stream(s)
        self.captured.clear()

    def abandon_capture(self) -> None:
        """A capture failed: the streams it entered ran nothing; a repeated step enters them again."""
        self.captured.clear()

    def join_into(self, here: Stream) -> None:
        """`here` waits for the plan's stream and every stream that ran a layer of it (outside a capture)."""
        for s in (self.built_on, *(s for s in self.streams if s != self.built_on)):
            if s != here:
                here.wait_stream(s)
