"""NosaControlService: the nosa.v1.NosaControl servicer, on top of a ControlProvider.

Reads go through the SnapshotCache (one provider snapshot per interval, whatever the number of
clients) and the ReplyMemo (one protobuf conversion per snapshot); knob changes are validated here,
on arrival, and only then queued with the provider for its next step boundary. Each WatchStats
stream holds one worker thread while open; their number is capped (`max_watchers`) so unary
calls always find a free worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
from grpc import ServicerContext as Ctx

from nosa_sglang.control import convert
from nosa_sglang.control.knob_mask import apply_mask
from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.pb import control_pb2_grpc as pb_grpc
from nosa_sglang.control.provider import ControlProvider, ProviderUnavailable
from nosa_sglang.control.reply_memo import ReplyMemo
from nosa_sglang.control.snapshot_cache import CachedSnapshot, SnapshotCache
from nosa_sglang.runtime.knobs import KnobError

MIN_WATCH_INTERVAL_S = 0.1
MAX_WATCH_INTERVAL_S = 3600.0
DEFAULT_WATCH_INTERVAL_S = 1.0
DEFAULT_APPLY_TIMEOUT_S = 2.0
MAX_APPLY_TIMEOUT_S = 30.0
#: reply this long before the client's deadline rather than let the call fail on it
_DEADLINE_MARGIN_S = 0.2
#: trailing-metadata key naming the field an INVALID_ARGUMENT is about
INVALID_FIELD_KEY = "nosa-invalid-field"


def _invalid(context: Ctx, field: str, message: str) -> None:
    context.set_trailing_metadata(((INVALID_FIELD_KEY, field),))
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


class _Watchers:
    """The open WatchStats streams: each one's wake-up event, so a server stop can end them all."""

    def __init__(self, limit: int) -> None:
        self._lock = threading.Lock()
        self._events: set[threading.Event] = set()
        self._limit = limit
        self._closed = False

    def add(self, event: threading.Event) -> bool:
        with self._lock:
            if self._closed or len(self._events) >= self._limit:
                return False
            self._events.add(event)
            return True

    def remove(self, event: threading.Event) -> None:
        with self._lock:
            self._events.discard(event)

    def close(self) -> None:
        """Refuse new streams and wake every open one (each then ends with OK)."""
        with self._lock:
            self._closed = True
            for event in self._events:
                event.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)


class NosaControlService(pb_grpc.NosaControlServicer):
    """Servicer; `close()` ends the open streams (the server calls it when stopping).

    RPC methods carry the proto's CamelCase names: grpc dispatches to them by name.
    """

    def __init__(self, provider: ControlProvider, cache: SnapshotCache, max_watchers: int) -> None:
        self._provider = provider
        self._cache = cache
        self._memo = ReplyMemo()
        self._watchers = _Watchers(max_watchers)
        self._max_watchers = max_watchers
        self._update_lock = threading.Lock()

    @property
    def active_watchers(self) -> int:
        return len(self._watchers)

    def close(self) -> None:
        self._watchers.close()

    # -- stats -----------------------------------------------------------------------------------
    def GetStats(self, request: pb.GetStatsRequest, context: Ctx) -> pb.GetStatsResponse:
        return pb.GetStatsResponse(stats=self._memo.stats(self._cache.get()))

    def ListRequests(self, request: pb.ListRequestsRequest, context: Ctx) -> pb.ListRequestsResponse:
        return self._memo.requests(self._cache.get())

    def ResetStats(self, request: pb.ResetStatsRequest, context: Ctx) -> pb.ResetStatsResponse:
        try:
            return pb.ResetStatsResponse(stats_epoch=self._cache.reset(self._provider.reset_stats))
        except ProviderUnavailable as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))

    def WatchStats(
        self, request: pb.WatchStatsRequest, context: Ctx
    ) -> Iterator[pb.WatchStatsResponse]:
        interval_s = DEFAULT_WATCH_INTERVAL_S
        if request.HasField("interval"):
            interval_s = request.interval.ToNanoseconds() / 1e9
        if not MIN_WATCH_INTERVAL_S <= interval_s <= MAX_WATCH_INTERVAL_S:
            _invalid(context, "interval", f"interval={interval_s:g}s: allowed range is "
                     f"[{MIN_WATCH_INTERVAL_S:g}s, {MAX_WATCH_INTERVAL_S:g}s]")
        wake = threading.Event()
        if not self._watchers.add(wake):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many WatchStats streams open (limit {self._max_watchers}) or server stopping")
        try:
            if not context.add_callback(wake.set):  # fires on cancel, deadline or completion
                return
            yield from self._watch(request, context, interval_s, wake)
        finally:
            self._watchers.remove(wake)

    def _watch(self, request: pb.WatchStatsRequest, context: Ctx,
               interval_s: float, wake: threading.Event) -> Iterator[pb.WatchStatsResponse]:
        prev: CachedSnapshot | None = None
        sent = 0
        next_at = time.monotonic()
        while not wake.is_set() and context.is_active():
            cur = self._cache.get(max_age_s=interval_s / 2)
            reply = pb.WatchStatsResponse(stats=self._memo.stats(cur))
            if prev is not None:
                reply.delta.CopyFrom(self._memo.delta(prev, cur))
            yield reply
            sent += 1
            if request.max_updates and sent >= request.max_updates:
                return
            prev = cur
            # NOTE: a late wake-up skips ahead instead of bursting to catch up.
            next_at = max(next_at + interval_s, time.monotonic())
            wake.wait(next_at - time.monotonic())

    # -- config ----------------------------------------------------------------------------------
    def GetConfig(self, request: pb.GetConfigRequest, context: Ctx) -> pb.GetConfigResponse:
        # NOTE: requested first: a boundary in between then shows the new knobs, not a stale pair.
        requested = self._provider.requested_knobs()
        in_force = self._provider.knobs()
        reply = pb.GetConfigResponse(
            config=convert.config_to_proto(in_force, self._provider.nosa_config(), self._provider.max_gpu_slots()))
        if requested != in_force:
            reply.pending.CopyFrom(convert.knobs_to_proto(requested))
        return reply

    def UpdateConfig(self, request: pb.UpdateConfigRequest, context: Ctx) -> pb.UpdateConfigResponse:
        timeout_s = DEFAULT_APPLY_TIMEOUT_S
        if request.HasField("apply_timeout"):
            timeout_s = request.apply_timeout.ToNanoseconds() / 1e9
        if not 0 <= timeout_s <= MAX_APPLY_TIMEOUT_S:
            _invalid(context, "apply_timeout", f"apply_timeout={timeout_s:g}s: allowed range is "
                     f"[0s, {MAX_APPLY_TIMEOUT_S:g}s]")
        remaining = context.time_remaining()
        if remaining is not None:
            timeout_s = max(0.0, min(timeout_s, remaining - _DEADLINE_MARGIN_S))
        # NOTE: one update at a time, built on the latest requested knobs, so two concurrent
        # updates of different knobs both survive (the later one includes the earlier one).
        with self._update_lock:
            try:
                new = apply_mask(self._provider.requested_knobs(), request.knobs,
                                 list(request.update_mask.paths), self._provider.nosa_config())
                # NOTE: the provider may reject what the model allows (gpu_slots above the slots
                # a runtime allocated); it raises before queueing, so nothing changes either.
                update = self._provider.request_knobs(new, timeout_s)
            except KnobError as err:
                _invalid(context, err.field, str(err))
            except ProviderUnavailable as err:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        reply = pb.UpdateConfigResponse(
            config=convert.config_to_proto(update.in_force, self._provider.nosa_config(),
                                           self._provider.max_gpu_slots()),
            applied=update.pending is None,
        )
        if update.pending is not None:
            reply.pending.CopyFrom(convert.knobs_to_proto(update.pending))
        return reply
