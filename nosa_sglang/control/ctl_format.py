"""Plain-text tables for `nosa-ctl`: stats (with interval rates when watching), requests, config.

Kept apart from the command logic so the layout can change without touching exit codes and RPCs.
"""

from __future__ import annotations

from collections.abc import Sequence

from nosa_sglang.control.convert import enum_name
from nosa_sglang.control.pb import control_pb2 as pb

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned columns, except the first (labels)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    ]
    return "\n".join(lines)


def _counter_row(label: str, c: pb.TransferCounters) -> list[object]:
    return [label, c.hits, c.misses, f"{c.hit_rate:.1%}", c.prefetched, human_bytes(c.bytes_h2d),
            human_bytes(c.bytes_d2h), human_seconds(c.transfer_seconds), human_seconds(c.stall_seconds),
            human_seconds(c.host_wait_seconds)]


_COUNTER_HEADER = ("layer", "hits", "misses", "hit rate", "prefetched", "H2D", "D2H", "transfer", "stall",
                   "host wait")


def format_stats(s: pb.Stats, delta: pb.StatsDelta | None = None, layers: bool = True) -> str:
    mode = enum_name(pb.RuntimeMode, "RUNTIME_MODE", s.mode) or "unknown"
    slots_pct = s.resident_blocks / s.gpu_slot_capacity if s.gpu_slot_capacity else 0.0
    lines = [
        f"steps {s.steps}   running requests {s.running_requests}   device {s.device}   mode {mode}"
        f"   stats epoch {s.stats_epoch}   at {s.taken_at.ToJsonString()}",
        f"GPU slots   resident {s.resident_blocks} / {s.gpu_slot_capacity} blocks ({slots_pct:.1%})",
        f"host store  {s.host_blocks_used} / {s.host_blocks_total} blocks, "
        f"{human_bytes(s.host_bytes_used)} of {human_bytes(s.host_capacity_bytes)} capacity",
    ]
    if delta is not None:
        r = delta.rates
        reset = "  (stats were reset)" if delta.counters_reset else ""
        lines.append(
            f"last {delta.interval_seconds:.2f} s: {r.steps_per_second:.1f} steps/s, "
            f"hit rate {delta.totals.hit_rate:.1%}, {r.misses_per_second:.0f} misses/s, "
            f"H2D {human_bytes(r.h2d_bytes_per_second)}/s, D2H {human_bytes(r.d2h_bytes_per_second)}/s, "
            f"stall {r.stall_fraction:.1%}{reset}"
        )
    rows = [_counter_row(str(lyr.layer), lyr.counters) for lyr in s.layers] if layers else []
    rows.append(_counter_row("total", s.totals))
    lines += ["", table(_COUNTER_HEADER, rows)]
    return "\n".join(lines)


def format_requests(reply: pb.ListRequestsResponse) -> str:
    if not reply.requests:
        return "no running requests"
    rows = [[r.request_id, r.seq_len_tokens, r.host_blocks, r.resident_blocks, r.hits, r.misses,
             f"{r.hit_rate:.1%}"] for r in reply.requests]
    return table(("request", "tokens", "host blocks", "resident", "hits", "misses", "hit rate"), rows)


def format_knobs(k: pb.OffloadKnobs, limits: pb.KnobLimits | None = None) -> list[list[object]]:
    lim = limits or pb.KnobLimits()
    capacity = str(k.host_capacity_bytes) + (" (as allocated)" if k.host_capacity_bytes == 0 else "")
    return [
        ["gpu_slots", k.gpu_slots, f"[{lim.min_gpu_slots}, {lim.max_gpu_slots}]"],
        ["transfer_mode", enum_name(pb.TransferMode, "TRANSFER_MODE", k.transfer_mode),
         "zero_copy | copy_engine"],
        ["prefetch", str(k.prefetch).lower(), "true | false"],
        ["host_capacity_bytes", capacity, f"[0, {lim.max_host_capacity_bytes}]"],
        ["victim_policy", enum_name(pb.VictimPolicy, "VICTIM_POLICY", k.victim_policy),
         "eviction_score | lru"],
    ]


def format_config(config: pb.Config, pending: pb.OffloadKnobs | None = None) -> str:
    parts = ["knobs in force", table(("knob", "value", "allowed"), format_knobs(config.knobs, config.limits))]
    if pending is not None:
        parts += ["", "queued for the next step boundary",
                  table(("knob", "value", "allowed"), format_knobs(pending, config.limits))]
    nosa = [[f.name, getattr(config.nosa, f.name)] for f in pb.NosaConstants.DESCRIPTOR.fields]
    parts += ["", "NOSA constants (read-only: part of the model)", table(("constant", "value"), nosa)]
    return "\n".join(parts)
