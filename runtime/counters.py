"""Counters: hits, misses, prefetches, bytes and copy times per layer, read without syncing the GPU.

Counts are produced on the device (the residency diff runs there), so they accumulate in device
tensors. At every step boundary the stepping thread enqueues one non-blocking copy of them into a
pinned mirror and records an event; `snapshot()` (any thread) reads the newest mirror whose event has
completed, so it never waits for the GPU and is at most a step or two behind. Copy and stall times
come from CUDA event pairs, resolved at step boundaries only once `query()` says they completed.
On CPU (named CPU mode) everything is immediate and times are host clocks.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import NamedTuple

import torch

from nosa_sglang.runtime.stats import LayerStats, RequestStats, StatsSnapshot

N_LAYER = 3  # selected, misses, prefetched (hits = selected - misses)
N_ROW = 2  # selected, misses
MIRRORS = 3
MAX_PENDING_EVENTS = 8192


def tally_diff(row_counts: torch.Tensor, layer_counts: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> None:
    """Add a residency diff's counts [B, 2] (selected, misses) to row_counts[rows] and their sums to
    layer_counts[:2]. index_add_ is atomic on CUDA: two micro-batches on two streams may add to one
    layer's counts at the same time, where `+=` would lose an update (the fused diff adds atomically too)."""
    row_counts.index_add_(0, rows, counts)
    layer_counts.index_add_(0, torch.arange(N_ROW, device=counts.device), counts.sum(dim=0))


class RunningRequest(NamedTuple):
    request_id: str
    row: int
    seq_len_tokens: int
    host_blocks: int


class BoundaryInfo(NamedTuple):
    """Host-known state at one step boundary (published with the device counters of that boundary)."""

    steps: int
    running: tuple[RunningRequest, ...]
    host_blocks_used: int
    host_blocks_total: int
    host_bytes_used: int
    host_capacity_bytes: int
    gpu_slot_capacity: int
    device: str
    mode: str


class _Timing(NamedTuple):
    layer: int
    start: object  # torch.cuda.Event (timing)
    end: object
    ready: object | None  # compute-stream event recorded where it started waiting for `end`


class Counters:
    """Device-side counts + host-side times of one runtime; builds StatsSnapshot."""

    def __init__(self, num_layers: int, max_rows: int, num_kv_heads: int, run_bytes: int, device: torch.device) -> None:
        self.num_layers, self.max_rows, self.run_bytes, self.device = num_layers, max_rows, run_bytes, device
        self.layer_counts = torch.zeros((num_layers, N_LAYER), dtype=torch.long, device=device)
        # NOTE: flat indices of layer_counts, for index_add_ (atomic on CUDA): two micro-batches on two
        # streams may add to one layer's counts at the same time, where `+=` would lose an update
        self._layer_idx = torch.arange(num_layers * N_LAYER, device=device).view(num_layers, N_LAYER)
        self.row_counts = torch.zeros((max_rows, N_ROW), dtype=torch.long, device=device)
        # this step's selected blocks per (layer, row, KV head), fully on the GPU (note_selected / table_runs)
        self._selected = torch.zeros((num_layers, max_rows, num_kv_heads), dtype=torch.long, device=device)
        self._lock = threading.Lock()
        self._d2h_bytes = [0] * num_layers
        self._transfer_s = [0.0] * num_layers
        self._stall_s = [0.0] * num_layers
        self._host_wait_s = [0.0] * num_layers
        self._pending: deque[_Timing] = deque()
        self._cuda = device.type == "cuda"
        size = num_layers * N_LAYER + max_rows * (N_ROW + 1)
        pin = self._cuda
        self._mirrors = [torch.zeros(size, dtype=torch.long, pin_memory=pin) for _ in range(MIRRORS)]
        self._events = [torch.cuda.Event() if self._cuda else None for _ in range(MIRRORS)]
        self._meta: list[BoundaryInfo | None] = [None] * MIRRORS
        self._seq = [0] * MIRRORS  # publication number of each mirror (0 = never published)
        self._published = 0
        self._baseline: tuple | None = None

    # -- hot path (stepping thread) -------------------------------------------------------------------
    def add_diff(self, layer: int, rows: torch.Tensor, row_range: tuple[int, int] | None, counts: torch.Tensor) -> None:
        """counts [B, 2] (selected, misses) of the batch rows `rows` [B] (a contiguous row_range if given)."""
        if row_range is not None:
            self.row_counts[row_range[0] : row_range[1]] += counts
        else:
            self.row_counts.index_add_(0, rows, counts)
        self.layer_counts.view(-1).index_add_(0, self._layer_idx[layer, :N_ROW], counts.sum(dim=0))

    def selected(self, layer: int) -> torch.Tensor:
        """[R, Hkv] where a fully-on-GPU layer notes the blocks each (row, KV head) selected this step
        (`kernels.table_runs` writes it with the slot list), kept until `add_selected`."""
        return self._selected[layer]

    def note_selected(self, layer: int, rows: torch.Tensor, row_range: tuple[int, int] | None,
                      sel: torch.Tensor) -> None:
        """The same from `sel` [B, Hkv, K] (-1 = none), for a layer without a table (2 launches)."""
        if row_range is not None:
            torch.sum(sel >= 0, dim=2, out=self._selected[layer, row_range[0] : row_range[1]])
        else:
            self._selected[layer].index_put_((rows,), (sel >= 0).sum(dim=2))

    def add_selected(self, rows: torch.Tensor, row_range: tuple[int, int] | None, real: torch.Tensor) -> None:
        """After the step's last layer: every layer's noted counts of the batch's rows, padding rows
        (real 0) left out, into the row and layer counts (a few launches a step, not ~9 a layer). A step
        abandoned before its last layer (an abort inside it) counts nothing, as it decodes nothing."""
        n = self._selected[:, slice(*row_range) if row_range is not None else rows].sum(dim=2) * real  # [L, B]
        if row_range is not None:
            self.row_counts[row_range[0] : row_range[1], 0] += n.sum(dim=0)
        else:
            self.row_counts[:, 0].index_add_(0, rows, n.sum(dim=0))
        self.layer_counts.view(-1).index_add_(0, self._layer_idx[:, 0], n.sum(dim=1))

    def diff_tally(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row_counts, this layer's counts, rows): where a residency diff of `rows` adds its counts."""
        return self.row_counts, self.layer_counts[layer], rows

    def add_prefetch(self, layer: int, ok: torch.Tensor) -> None:
        self.layer_counts.view(-1).index_add_(0, self._layer_idx[layer, 2:], ok.sum().view(1).long())

    def add_write_back(self, layer: int, runs: int) -> None:
        """`runs` (block, KV head) runs of K and V written to the host in `layer`."""
        self._d2h_bytes[layer] += 2 * runs * self.run_bytes

    def add_host_times(self, layer: int, transfer_s: float, stall_s: float) -> None:
        """CPU mode: copies are synchronous, so their time is both transfer and stall."""
        with self._lock:
            self._transfer_s[layer] += transfer_s
            self._stall_s[layer] += stall_s

    def add_host_wait(self, layer: int, seconds: float) -> None:
        with self._lock:
            self._host_wait_s[layer] += seconds

    def add_timing(self, layer: int, start: object, end: object, ready: object | None = None) -> None:
        if len(self._pending) >= MAX_PENDING_EVENTS:
            self._pending.popleft()  # the GPU is far behind: lose a sample rather than grow
        self._pending.append(_Timing(layer, start, end, ready))

    def clear_row(self, row: int) -> None:
        self.row_counts[row] = 0

    def move_row(self, src_row: int, dst_row: int) -> None:
        self.row_counts[dst_row] = self.row_counts[src_row]

    # -- step boundary (stepping thread) ------------------------------------------------------------------
    def resolve_events(self) -> None:
        """Fold completed copy timings into the per-layer times; stops at the first incomplete one."""
        while self._pending:
            t = self._pending[0]
            if not t.end.query() or (t.ready is not None and not t.ready.query()):
                break
            self._pending.popleft()
            transfer = t.start.elapsed_time(t.end) / 1e3
            stall = max(0.0, t.ready.elapsed_time(t.end) / 1e3) if t.ready is not None else 0.0
            with self._lock:
                self._transfer_s[t.layer] += transfer
                self._stall_s[t.layer] += stall

    def publish(self, resident_per_row: torch.Tensor, info: BoundaryInfo) -> None:
        """Enqueue a non-blocking copy of the device counts into the next mirror (no sync)."""
        flat = torch.cat((self.layer_counts.flatten(), self.row_counts.flatten(), resident_per_row.to(self.device)))
        with self._lock:
            i = self._published % MIRRORS
            self._mirrors[i].copy_(flat, non_blocking=self._cuda)
            if self._cuda:
                self._events[i].record()
            self._meta[i] = info
            self._published += 1
            self._seq[i] = self._published

    # -- readers (any thread) ---------------------------------------------------------------------------
    def _latest(self) -> tuple[torch.Tensor, BoundaryInfo] | None:
        """Newest mirror whose copy completed (caller holds the lock)."""
        for i in sorted(range(MIRRORS), key=lambda j: -self._seq[j]):
            if self._seq[i] == 0:
                continue
            if self._events[i] is None or self._events[i].query():
                return self._mirrors[i].clone(), self._meta[i]
        return None

    def _totals(self, vals: torch.Tensor, info: BoundaryInfo):
        L = self.num_layers
        layer = vals[: L * N_LAYER].view(L, N_LAYER).tolist()
        rows = vals[L * N_LAYER : L * N_LAYER + self.max_rows * N_ROW].view(-1, N_ROW).tolist()
        resident = vals[L * N_LAYER + self.max_rows * N_ROW :].tolist()
        per_req = {r.request_id: rows[r.row] for r in info.running}
        times = (list(self._d2h_bytes), list(self._transfer_s), list(self._stall_s), list(self._host_wait_s))
        return layer, per_req, resident, times

    def reset(self) -> None:
        """Zero every counter from now on (a baseline subtracted by `snapshot`)."""
        with self._lock:
            latest = self._latest()
            if latest is None:
                return
            layer, per_req, _, times = self._totals(*latest)
            self._baseline = (latest[1].steps, layer, per_req, times)

    def snapshot(self) -> StatsSnapshot | None:
        """The newest published state minus the reset baseline; None before the first publication."""
        with self._lock:
            latest = self._latest()
            if latest is None:
                return None
            info = latest[1]
            layer, per_req, resident, times = self._totals(*latest)
            base = self._baseline
        steps = info.steps
        if base is not None:
            b_steps, b_layer, b_req, b_times = base
            steps -= b_steps
            layer = [[a - b for a, b in zip(x, y)] for x, y in zip(layer, b_layer)]
            per_req = {k: [a - b for a, b in zip(v, b_req.get(k, (0, 0)))] for k, v in per_req.items()}
            times = tuple([a - b for a, b in zip(t, bt)] for t, bt in zip(times, b_times))
        d2h, transfer, stall, host_wait = times
        miss_bytes = 2 * self.run_bytes
        layers = tuple(
            LayerStats(layer=i, hits=n - m, misses=m, prefetched=p, bytes_h2d=(m + p) * miss_bytes, bytes_d2h=d2h[i],
                       transfer_time_s=transfer[i], stall_time_s=stall[i], host_wait_time_s=host_wait[i])
            for i, (n, m, p) in enumerate(layer)
        )
        total = LayerStats(
            layer=-1, hits=sum(s.hits for s in layers), misses=sum(s.misses for s in layers),
            prefetched=sum(s.prefetched for s in layers), bytes_h2d=sum(s.bytes_h2d for s in layers),
            bytes_d2h=sum(s.bytes_d2h for s in layers), transfer_time_s=sum(transfer), stall_time_s=sum(stall),
            host_wait_time_s=sum(host_wait),
        )
        requests = tuple(
            RequestStats(request_id=r.request_id, seq_len_tokens=r.seq_len_tokens, host_blocks=r.host_blocks,
                         resident_blocks=int(resident[r.row]),
                         hits=per_req[r.request_id][0] - per_req[r.request_id][1], misses=per_req[r.request_id][1])
            for r in info.running
        )
        return StatsSnapshot(
            taken_at_s=time.monotonic(), steps=steps, running_requests=len(info.running),
            resident_blocks=int(sum(resident[r.row] for r in info.running)),
            gpu_slot_capacity=info.gpu_slot_capacity, host_blocks_used=info.host_blocks_used,
            host_blocks_total=info.host_blocks_total, host_bytes_used=info.host_bytes_used,
            host_capacity_bytes=info.host_capacity_bytes, layers=layers, requests=requests, device=info.device,
            mode=info.mode, totals=total,
        )
