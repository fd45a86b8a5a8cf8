"""NOSA inside SGLang's scheduler process (TP rank 0 owns the runtime): the control API and the hooks.

`maybe_start_control_server` runs when the NOSA backend is created (in that process) and starts the
gRPC server on its own threads over the backend's runtime; it stops when the process exits. The
scheduler thread stays the only one that steps the runtime: knob changes wait for the next decode
step's boundary, or for `on_scheduler_idle`, which the plugin hooks after `Scheduler.on_idle` so that
an idle server still applies them (and releases requests that finished since the last decode step).
`add_internal_state` (hooked after `Scheduler.get_internal_state`) puts the counters into
`/server_info` under `internal_states[i]["nosa"]`.
"""

from __future__ import annotations

import atexit
import logging

logger = logging.getLogger(__name__)

_server = None  # the process's ControlServer (one per scheduler process at most)


def maybe_start_control_server(backend, model_runner):
    """Start the control API when --nosa-grpc-port is set and this is TP rank 0; return it (or None)."""
    global _server
    flags = backend.flags
    if flags.grpc_port is None or model_runner.ps.tp_rank != 0 or _server is not None:
        return _server
    from nosa_sglang.control.runtime_provider import RuntimeProvider
    from nosa_sglang.control.server import start_control_server

    _server = start_control_server(RuntimeProvider(backend.runtime), flags.grpc_host, flags.grpc_port,
                                   token=flags.grpc_token)
    atexit.register(_server.stop, 0.5)
    logger.info("NOSA control API on %s%s", _server.address, " (token required)" if flags.grpc_token else "")
    return _server


def nosa_backend_of(scheduler):
    """The scheduler's NOSA backend, or None (another backend, or no model runner yet)."""
    from nosa_sglang.backend import NosaAttnBackend

    runner = getattr(getattr(scheduler, "tp_worker", None), "model_runner", None)
    backend = getattr(runner, "attn_backend", None)
    return backend if isinstance(backend, NosaAttnBackend) else None


def on_scheduler_idle(result, scheduler, *args, **kwargs):
    """AFTER hook of Scheduler.on_idle: no batch is running, so no step is open."""
    backend = nosa_backend_of(scheduler)
    if backend is not None:
        running = getattr(scheduler, "running_batch", None)
        backend.on_idle({r.rid for r in getattr(running, "reqs", None) or []})
    return result


def stats_dict(runtime) -> dict:
    """The runtime's counters as plain JSON-able numbers (as of the last step boundary, no GPU sync)."""
    snap, knobs = runtime.snapshot(), runtime.knobs()
    t = snap.totals
    return {
        "mode": snap.mode, "steps": snap.steps, "running_requests": snap.running_requests,
        "hits": t.hits, "misses": t.misses, "hit_rate": round(t.hit_rate, 6), "bytes_h2d": t.bytes_h2d,
        "bytes_d2h": t.bytes_d2h, "transfer_time_s": t.transfer_time_s, "stall_time_s": t.stall_time_s,
        "resident_blocks": snap.resident_blocks, "gpu_slot_capacity": snap.gpu_slot_capacity,
        "host_blocks_used": snap.host_blocks_used, "host_blocks_total": snap.host_blocks_total,
        "host_capacity_bytes": snap.host_capacity_bytes, "knobs": knobs.to_dict(),
        "segment_graphs": runtime.graph_counts(),
    }


def add_internal_state(result, scheduler, *args, **kwargs):
    """AFTER hook of Scheduler.get_internal_state: the counters, and where the KV pool lives and its size."""
    backend = nosa_backend_of(scheduler)
    state = getattr(result, "internal_state", None)
    if backend is not None and isinstance(state, dict):
        pages = backend.kv_pool.pages
        state["nosa"] = {**stats_dict(backend.runtime), "kv_pool": {
            "memory": "host" if pages.host else "gpu", "pages": pages.num_pages, "kv_bytes": pages.kv_bytes}}
    return result
