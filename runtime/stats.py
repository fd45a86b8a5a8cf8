"""Read-only snapshots of the runtime's counters: what the gRPC service, the demo and SGLang report.

Plain frozen dataclasses (no torch), so a snapshot can cross threads and be serialised without
touching the GPU. The runtime's `Counters` builds them; nothing else writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerStats:
    """Totals for one attention layer since the last reset."""

    layer: int
    hits: int = 0  # selected (request, KV head, block) triples already resident in a GPU slot
    misses: int = 0  # selected triples that had to be fetched from the host store
    prefetched: int = 0  # triples fetched ahead of the step that selected them
    bytes_h2d: int = 0
    bytes_d2h: int = 0
    transfer_time_s: float = 0.0  # time copies were in flight (device events, read lazily)
    stall_time_s: float = 0.0  # time the compute stream waited on copies
    host_wait_time_s: float = 0.0  # time the host waited to read a miss list back (copy-engine path)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(frozen=True)
class RequestStats:
    """Residency of one running request."""

    request_id: str
    seq_len_tokens: int
    host_blocks: int  # blocks of this request in the host store (all layers share one block id)
    resident_blocks: int  # (layer, KV head, block) triples resident in GPU slots
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(frozen=True)
class StatsSnapshot:
    """Everything an operator sees, taken at one step boundary."""

    taken_at_s: float  # time.monotonic() when the snapshot was built
    steps: int  # decode steps since the last reset
    running_requests: int
    resident_blocks: int  # (layer, KV head, block) triples in GPU slots, all requests
    gpu_slot_capacity: int  # slots allocated, same unit as resident_blocks
    host_blocks_used: int
    host_blocks_total: int
    host_bytes_used: int
    host_capacity_bytes: int
    layers: tuple[LayerStats, ...] = ()
    requests: tuple[RequestStats, ...] = ()
    device: str = "cpu"  # "cuda:N" or "cpu" (named CPU mode)
    mode: str = "offload"  # "offload" or "gpu_only"
    totals: LayerStats = field(default_factory=lambda: LayerStats(layer=-1))
