"""Conversions between the runtime's Python types (stats, knobs, NosaConfig) and the nosa.v1 messages.

One place for the mapping, so the proto can grow without touching the service logic. Deltas and
rates for WatchStats are computed here too: they are pure functions of two snapshots.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from nosa_sglang.config import NosaConfig
from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.snapshot_cache import CachedSnapshot
from nosa_sglang.runtime.knobs import MAX_GPU_SLOTS, MAX_HOST_CAPACITY_BYTES, OffloadKnobs
from nosa_sglang.runtime.stats import LayerStats, StatsSnapshot

#: counters of LayerStats, in the order of TransferCounters (hit_rate is derived)
_COUNTS = ("hits", "misses", "prefetched", "bytes_h2d", "bytes_d2h")
_TIMES = {"transfer_time_s": "transfer_seconds", "stall_time_s": "stall_seconds",
          "host_wait_time_s": "host_wait_seconds"}


def enum_value(enum: object, prefix: str, name: str) -> int:
    """"zero_copy" -> TRANSFER_MODE_ZERO_COPY's number (0 = UNSPECIFIED when unknown)."""
    try:
        return enum.Value(f"{prefix}_{name.upper()}")  # type: ignore[attr-defined]
    except ValueError:
        return 0


def enum_name(enum: object, prefix: str, number: int) -> str | None:
    """TRANSFER_MODE_ZERO_COPY's number -> "zero_copy"; None for UNSPECIFIED or an unknown number."""
    try:
        full = enum.Name(number)  # type: ignore[attr-defined]
    except ValueError:
        return None
    name = full.removeprefix(prefix + "_").lower()
    return None if name == "unspecified" else name


def timestamp(wall_s: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(wall_s * 1e9))
    return ts


def counters_to_proto(c: LayerStats) -> pb.TransferCounters:
    return pb.TransferCounters(
        **{k: getattr(c, k) for k in _COUNTS},
        **{p: getattr(c, k) for k, p in _TIMES.items()},
        hit_rate=c.hit_rate,
    )


def stats_to_proto(cached: CachedSnapshot) -> pb.Stats:
    s = cached.snapshot
    return pb.Stats(
        taken_at=timestamp(cached.taken_at_wall_s),
        steps=s.steps,
        running_requests=s.running_requests,
        totals=counters_to_proto(s.totals),
        layers=[pb.LayerStats(layer=lyr.layer, counters=counters_to_proto(lyr)) for lyr in s.layers],
        resident_blocks=s.resident_blocks,
        gpu_slot_capacity=s.gpu_slot_capacity,
        host_blocks_used=s.host_blocks_used,
        host_blocks_total=s.host_blocks_total,
        host_bytes_used=s.host_bytes_used,
        host_capacity_bytes=s.host_capacity_bytes,
        device=s.device,
        mode=enum_value(pb.RuntimeMode, "RUNTIME_MODE", s.mode),
        stats_epoch=cached.epoch,
    )


def requests_to_proto(cached: CachedSnapshot) -> pb.ListRequestsResponse:
    return pb.ListRequestsResponse(
        taken_at=timestamp(cached.taken_at_wall_s),
        requests=[
            pb.RequestStats(
                request_id=r.request_id,
                seq_len_tokens=r.seq_len_tokens,
                host_blocks=r.host_blocks,
                resident_blocks=r.resident_blocks,
                hits=r.hits,
                misses=r.misses,
                hit_rate=r.hit_rate,
            )
            for r in cached.snapshot.requests
        ],
    )


def _diff(cur: LayerStats, prev: LayerStats | None) -> LayerStats:
    if prev is None:
        return cur
    values = {k: getattr(cur, k) - getattr(prev, k) for k in (*_COUNTS, *_TIMES)}
    return LayerStats(layer=cur.layer, **values)


def _went_back(cur: StatsSnapshot, prev: StatsSnapshot) -> bool:
    return cur.steps < prev.steps or any(
        getattr(cur.totals, k) < getattr(prev.totals, k) for k in _COUNTS
    )


def delta_to_proto(prev: CachedSnapshot, cur: CachedSnapshot) -> pb.StatsDelta:
    """The change from `prev` to `cur`; after a reset, the counts since the reset."""
    reset = cur.epoch != prev.epoch or _went_back(cur.snapshot, prev.snapshot)
    old = None if reset else prev.snapshot
    interval_s = max(0.0, cur.snapshot.taken_at_s - prev.snapshot.taken_at_s)
    totals = _diff(cur.snapshot.totals, old.totals if old else None)
    prev_layers = {lyr.layer: lyr for lyr in old.layers} if old else {}
    steps = cur.snapshot.steps - (old.steps if old else 0)

    def per_s(x: float) -> float:
        return x / interval_s if interval_s > 0 else 0.0

    return pb.StatsDelta(
        interval_seconds=interval_s,
        steps=steps,
        totals=counters_to_proto(totals),
        layers=[
            pb.LayerStats(layer=lyr.layer, counters=counters_to_proto(_diff(lyr, prev_layers.get(lyr.layer))))
            for lyr in cur.snapshot.layers
        ],
        rates=pb.Rates(
            steps_per_second=per_s(steps),
            hits_per_second=per_s(totals.hits),
            misses_per_second=per_s(totals.misses),
            h2d_bytes_per_second=per_s(totals.bytes_h2d),
            d2h_bytes_per_second=per_s(totals.bytes_d2h),
            stall_fraction=per_s(totals.stall_time_s),
        ),
        counters_reset=reset,
    )


def knobs_to_proto(k: OffloadKnobs) -> pb.OffloadKnobs:
    return pb.OffloadKnobs(
        gpu_slots=k.gpu_slots,
        transfer_mode=enum_value(pb.TransferMode, "TRANSFER_MODE", k.transfer_mode),
        prefetch=k.prefetch,
        host_capacity_bytes=k.host_capacity_bytes,
        victim_policy=enum_value(pb.VictimPolicy, "VICTIM_POLICY", k.victim_policy),
    )


def config_to_proto(knobs: OffloadKnobs, nosa: NosaConfig, max_gpu_slots: int = MAX_GPU_SLOTS) -> pb.Config:
    """`max_gpu_slots`: the provider's own bound (a runtime accepts at most the slots it allocated)."""
    return pb.Config(
        knobs=knobs_to_proto(knobs),
        nosa=pb.NosaConstants(**nosa.to_dict()),
        limits=pb.KnobLimits(
            min_gpu_slots=nosa.topk_blocks,
            max_gpu_slots=max_gpu_slots,
            max_host_capacity_bytes=MAX_HOST_CAPACITY_BYTES,
        ),
    )
