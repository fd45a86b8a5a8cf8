"""ControlProvider: what the gRPC control service needs from whoever owns the offload runtime.

The service never touches the runtime directly: it reads snapshots and asks for knob changes through
this small interface, so it can be tested against a synthetic provider and later wired to
`nosa_sglang.runtime.NosaRuntime` (or its SGLang glue) without changing the service.

Threading contract: every method is called from gRPC worker threads, concurrently with the thread
that steps the runtime. None of them may sync the GPU or hold a lock the stepping thread needs for
longer than a copy of some counters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from nosa_sglang.config import NosaConfig
from nosa_sglang.runtime.knob_queue import KnobRequest
from nosa_sglang.runtime.knobs import MAX_GPU_SLOTS, OffloadKnobs
from nosa_sglang.runtime.stats import StatsSnapshot


#: what `request_knobs` reports: `in_force` (the knobs in force when the call returned) and
#: `pending` (the requested knobs if they still wait for a step boundary, else None)
KnobUpdate = KnobRequest


class ProviderUnavailable(RuntimeError):
    """The runtime side cannot answer now (e.g. its process stopped); the service answers UNAVAILABLE."""


class ControlProvider(ABC):
    """The runtime side of the control service.

    Knob changes follow one protocol: the service validates them on arrival (so a bad value never
    reaches the runtime), the provider queues the new `OffloadKnobs` and swaps it in whole at its
    next step boundary. `nosa_sglang.runtime.knob_queue.KnobQueue` implements that queue; a provider
    normally owns one and calls `KnobQueue.take()` at each step boundary (and from its idle
    path, so updates do not wait for traffic).
    """

    @abstractmethod
    def snapshot(self) -> StatsSnapshot | None:
        """Counters and occupancy now. Cheap (a copy of host-side counters); never syncs the GPU.
        None while nothing has been published yet (served as all zeros).

        The service caches the result (one build per `snapshot_interval_s` at most), so this is
        called a few tens of times per second at most, whatever the number of clients.
        """

    @abstractmethod
    def nosa_config(self) -> NosaConfig:
        """The model's NOSA constants (read-only; they bound `gpu_slots` from below)."""

    @abstractmethod
    def knobs(self) -> OffloadKnobs:
        """The knobs in force now."""

    @abstractmethod
    def request_knobs(self, knobs: OffloadKnobs, timeout_s: float) -> KnobUpdate:
        """Queue `knobs` (already validated against `nosa_config()`) for the next step boundary.

        Blocks until the boundary applies them or `timeout_s` runs out (0: do not wait). A request
        made while another is queued replaces it (the service builds each request on top of
        `requested_knobs()`, so no accepted change is lost).

        Returns:
            KnobUpdate: the knobs in force after the wait, and the still-queued knobs if any.

        Raises:
            KnobError: the provider cannot take knobs the model allows (e.g. `gpu_slots` above
                the slots a runtime allocated); nothing is queued, the service answers
                INVALID_ARGUMENT naming `KnobError.field`.
        """

    @abstractmethod
    def reset_stats(self) -> None:
        """Zero every counter (hits, misses, bytes, times, steps); occupancy is kept.

        Takes effect before it returns: the next `snapshot()` counts from the reset (the service
        labels it with a new stats epoch).
        """

    def max_gpu_slots(self) -> int:
        """The largest `gpu_slots` this provider accepts (GetConfig's limit). Optional hook: a runtime
        accepts at most the slots it allocated; the default is the model-independent bound."""
        return MAX_GPU_SLOTS

    def requested_knobs(self) -> OffloadKnobs:
        """The knobs that will be in force after the next boundary: the queued ones, else `knobs()`.

        Optional hook: the default suits a provider that applies updates at once.
        """
        return self.knobs()
