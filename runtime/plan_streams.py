"""PlanStreams: the CUDA streams that run layers of one step plan, ordered by the runtime, not the caller.

A step plan is built and uploaded on one stream (the first decode call's, or `begin_step`'s). A
micro-batched caller then runs the plan's layers on other streams. Before this, the caller had to order
those streams after the upload and join them before the step boundary itself (`MicroBatches` did; a
StepGraphs body had to). An SGLang backend runs its layers wherever its forward runs, so the runtime
owns the contract: a stream's first layer of a plan waits for the plan's upload, and the boundary joins
every stream that ran one.

Inside a CUDA-graph capture the upload (made before the capture) cannot be waited on: a stream that
is not yet part of the capture forks from the capture stream instead (the capture itself follows the
upload), and the capture joins every such stream before it ends (`join_into`).

The caller's own data (the layer's q/k/v/c made on its stream) stays the caller's to order: the runtime
cannot see where those tensors were written.
"""

from __future__ import annotations

from typing import Protocol


class Stream(Protocol):  # torch.cuda.Stream; a Protocol so the ordering logic is tested on CPU
    def wait_event(self, event) -> None: ...
    def wait_stream(self, stream) -> None: ...


class PlanStreams:
    """The streams one plan's layers ran on, first = the stream that built (and uploaded) the plan."""

    def __init__(self, built_on: Stream, uploaded) -> None:
        """uploaded: an event recorded on `built_on` after the plan's upload."""
        self.streams: list[Stream] = [built_on]
        self.forked: list[Stream] = []  # entered inside a capture: the capture must join them
        self.uploaded = uploaded

    def enter(self, stream: Stream, capture_stream: Stream | None = None) -> None:
        """`stream` is about to run a layer of the plan: on its first layer it waits for the upload
        (outside a capture) or forks from `capture_stream` (inside one)."""
        if any(stream == s for s in self.streams):
            return
        if capture_stream is None:
            stream.wait_event(self.uploaded)
        elif stream != capture_stream:
            stream.wait_stream(capture_stream)
            self.forked.append(stream)
        self.streams.append(stream)

    def join_forked(self, capture_stream: Stream) -> None:
        """End of a capture: the capture stream waits for every stream that forked from it (a capture
        must end joined; a stream outside the capture cannot be waited on there)."""
        for s in self.forked:
            capture_stream.wait_stream(s)
        self.forked.clear()

    def join_into(self, here: Stream) -> None:
        """`here` waits for the work of every stream that ran a layer of the plan (outside a capture)."""
        for s in self.streams:
            if s != here:
                here.wait_stream(s)
