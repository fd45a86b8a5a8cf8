"""NosaMetrics: the offload counters as Prometheus gauges (`nosa_*`) on SGLang's `/metrics`.

With `--enable-metrics` SGLang runs prometheus_client in multiprocess mode and serves every process's
metrics from `/metrics`; the NOSA backend (scheduler process of TP rank 0) adds these. They are gauges,
not counters: `ResetStats` over gRPC sets the totals back to zero. Values come from the runtime's last
published snapshot (no GPU sync) and are refreshed at most every `interval_s`, from the decode step
boundary and from the idle hook.
"""

from __future__ import annotations

import time

from nosa_sglang.scheduler_control import stats_dict

#: stats_dict key -> (metric name, help)
GAUGES = {
    "steps": ("nosa_decode_steps", "NOSA decode steps since the last stats reset."),
    "running_requests": ("nosa_running_requests", "Requests the NOSA runtime is decoding."),
    "hits": ("nosa_slot_hits", "Selected (request, layer, KV head, block) triples already in a GPU slot."),
    "misses": ("nosa_slot_misses", "Selected triples fetched from the host store."),
    "hit_rate": ("nosa_slot_hit_rate", "hits / (hits + misses) since the last stats reset."),
    "bytes_h2d": ("nosa_h2d_bytes", "Bytes copied host to GPU."),
    "bytes_d2h": ("nosa_d2h_bytes", "Bytes written back GPU to host."),
    "transfer_time_s": ("nosa_transfer_seconds", "Time host-to-GPU copies were in flight."),
    "stall_time_s": ("nosa_stall_seconds", "Time the compute stream waited for copies."),
    "resident_blocks": ("nosa_resident_blocks", "(layer, KV head, block) triples in GPU slots."),
    "gpu_slot_capacity": ("nosa_gpu_slot_capacity_blocks", "GPU slots allocated, in the same unit."),
    "host_blocks_used": ("nosa_host_blocks_used", "Blocks of the pinned host store in use."),
    "host_blocks_total": ("nosa_host_blocks_total", "Blocks of the pinned host store."),
}


class NosaMetrics:
    def __init__(self, labels: dict[str, str], interval_s: float = 1.0) -> None:
        from prometheus_client import Gauge

        self.labels, self.interval_s = labels, interval_s
        # registry=None: SGLang's /metrics reads every process's values from the multiprocess files, and a
        # second backend in one process (tests) must not clash in the default registry
        self._gauges = {key: Gauge(name, doc, labelnames=list(labels), multiprocess_mode="mostrecent", registry=None)
                        for key, (name, doc) in GAUGES.items()}
        self._last = float("-inf")

    def update(self, runtime, force: bool = False) -> bool:
        """Publish the runtime's counters if `interval_s` has passed (or `force`); True if published."""
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return False
        self._last = now
        stats = stats_dict(runtime)
        for key, gauge in self._gauges.items():
            gauge.labels(**self.labels).set(stats[key])
        return True
