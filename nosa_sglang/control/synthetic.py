"""SyntheticProvider: a test double of the runtime, for the control service's tests, demo and benchmark.

It is NOT the runtime and measures nothing: there are no tensors and no GPU. Its counters follow a
closed-form model of a decode loop (each `step()` grows every request by one token; the miss rate
falls with more GPU slots; prefetch changes nothing, as measured on the runtime), just enough for the
numbers to move the way an operator expects, so the service, `nosa-ctl` and
`examples/tune_offload.py` can be exercised before (and without) `nosa_sglang.runtime.NosaRuntime`. It uses the same step-boundary
knob swap as the runtime (`KnobQueue`), so the UpdateConfig semantics tested against it are real.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from nosa_sglang.config import NosaConfig
from nosa_sglang.runtime.knob_queue import KnobQueue
from nosa_sglang.control.provider import ControlProvider, KnobUpdate
from nosa_sglang.runtime.knobs import OffloadKnobs
from nosa_sglang.runtime.stats import LayerStats, RequestStats, StatsSnapshot

#: modelled copy bandwidth per transfer mode (bytes/s), after the H100 measurement behind the
#: zero_copy default (per-run DMA is slow: one small copy per (block, head) run)
_MODEL_BANDWIDTH = {"copy_engine": 5e9, "zero_copy": 50e9}
#: share of the transfer time the compute stream waits for
_MODEL_STALL_SHARE = 0.6
#: host wait per layer step with misses, for reading the miss list back (copy-engine path only)
_MODEL_HOST_WAIT_S = {"copy_engine": 10e-6, "zero_copy": 0.0}


@dataclass(frozen=True)
class SyntheticSetup:
    """Shape of the modelled workload.

    Attributes:
        num_layers, kv_heads, head_dim, dtype_bytes: the modelled attention layers.
        num_requests: requests running at once; one that reaches `max_seq_tokens` is replaced by a
            new one of `prompt_tokens`.
        base_miss_rate: miss rate with gpu_slots == topk_blocks; it falls as (topk / slots)^2.
        host_blocks_total: size of the modelled host store, in blocks.
        step_work_s: pure-Python busy time per step: it holds the GIL like a Python decode loop, so
            the benchmark sees the cost of serving clients from the same process.
    """

    num_layers: int = 4
    kv_heads: int = 2
    head_dim: int = 128
    dtype_bytes: int = 2
    num_requests: int = 3
    prompt_tokens: int = 8192
    max_seq_tokens: int = 65536
    base_miss_rate: float = 0.3
    host_blocks_total: int = 1 << 16
    step_work_s: float = 0.0


@dataclass
class _Request:
    request_id: str
    seq_len_tokens: int
    hits: int = 0
    misses: int = 0


class SyntheticProvider(ControlProvider):
    """Thread-safe synthetic provider; call `step()` from one thread (e.g. a `StepLoop`)."""

    def __init__(
        self,
        setup: SyntheticSetup = SyntheticSetup(),
        nosa: NosaConfig = NosaConfig(),
        knobs: OffloadKnobs | None = None,
    ) -> None:
        self.setup = setup
        self._nosa = nosa
        self._knobs = KnobQueue((knobs or OffloadKnobs(gpu_slots=nosa.topk_blocks)).validate_for(
            nosa.topk_blocks))
        self._lock = threading.Lock()
        self._next_request = 0
        self._requests = [self._new_request() for _ in range(setup.num_requests)]
        self._reset_counters()

    # -- the stepping side -------------------------------------------------------------------
    def step(self) -> None:
        """One modelled decode step of every request; the step boundary comes first."""
        self._knobs.take()
        knobs = self._knobs.in_force()
        s, nosa = self.setup, self._nosa
        block_bytes = 2 * nosa.block_size * s.head_dim * s.dtype_bytes  # K and V of one head
        miss_rate = s.base_miss_rate * min(1.0, nosa.topk_blocks / knobs.gpu_slots) ** 2
        with self._lock:
            for i, req in enumerate(self._requests):
                if req.seq_len_tokens >= s.max_seq_tokens:
                    req = self._requests[i] = self._new_request()
                req.seq_len_tokens += 1
                selected = s.kv_heads * min(nosa.topk_blocks, nosa.num_blocks(req.seq_len_tokens))
                misses = round(selected * miss_rate)
                filled = req.seq_len_tokens % nosa.block_size == 0
                for layer in self._layers:
                    layer["hits"] += selected - misses
                    layer["misses"] += misses
                    layer["prefetched"] += misses // 2 if knobs.prefetch else 0
                    layer["bytes_h2d"] += misses * block_bytes
                    layer["bytes_d2h"] += s.kv_heads * block_bytes if filled else 0
                    transfer_s = misses * block_bytes / _MODEL_BANDWIDTH[knobs.transfer_mode]
                    layer["transfer_time_s"] += transfer_s
                    layer["stall_time_s"] += transfer_s * _MODEL_STALL_SHARE
                    layer["host_wait_time_s"] += _MODEL_HOST_WAIT_S[knobs.transfer_mode] if misses else 0.0
                req.hits += s.num_layers * (selected - misses)
                req.misses += s.num_layers * misses
            self._steps += 1
        _busy_wait(s.step_work_s)

    # -- ControlProvider ---------------------------------------------------------------------
    def snapshot(self) -> StatsSnapshot:
        s, nosa = self.setup, self._nosa
        knobs = self._knobs.in_force()
        block_bytes_all = 2 * nosa.block_size * s.head_dim * s.dtype_bytes * s.kv_heads * s.num_layers
        with self._lock:
            layers = tuple(LayerStats(layer=i, **c) for i, c in enumerate(self._layers))
            requests = tuple(
                RequestStats(
                    request_id=r.request_id,
                    seq_len_tokens=r.seq_len_tokens,
                    host_blocks=nosa.num_blocks(r.seq_len_tokens),
                    resident_blocks=s.num_layers * s.kv_heads
                    * min(knobs.gpu_slots, nosa.num_blocks(r.seq_len_tokens)),
                    hits=r.hits,
                    misses=r.misses,
                )
                for r in self._requests
            )
            steps = self._steps
        totals = LayerStats(
            layer=-1,
            **{k: sum(getattr(layer, k) for layer in layers) for k in self._layers[0]},
        )
        host_blocks_used = sum(r.host_blocks for r in requests)
        return StatsSnapshot(
            taken_at_s=time.monotonic(),
            steps=steps,
            running_requests=len(requests),
            resident_blocks=sum(r.resident_blocks for r in requests),
            gpu_slot_capacity=len(requests) * s.num_layers * s.kv_heads * knobs.gpu_slots,
            host_blocks_used=host_blocks_used,
            host_blocks_total=s.host_blocks_total,
            host_bytes_used=host_blocks_used * block_bytes_all,
            host_capacity_bytes=knobs.host_capacity_bytes or s.host_blocks_total * block_bytes_all,
            layers=layers,
            requests=requests,
            device="cpu",
            mode="offload",
            totals=totals,
        )

    def nosa_config(self) -> NosaConfig:
        return self._nosa

    def knobs(self) -> OffloadKnobs:
        return self._knobs.in_force()

    def requested_knobs(self) -> OffloadKnobs:
        return self._knobs.latest()

    def request_knobs(self, knobs: OffloadKnobs, timeout_s: float) -> KnobUpdate:
        return self._knobs.request(knobs, timeout_s)

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_counters()
            for req in self._requests:
                req.hits = req.misses = 0

    # -- helpers -----------------------------------------------------------------------------
    def _reset_counters(self) -> None:
        zero = dict(hits=0, misses=0, prefetched=0, bytes_h2d=0, bytes_d2h=0,
                    transfer_time_s=0.0, stall_time_s=0.0, host_wait_time_s=0.0)
        self._layers = [dict(zero) for _ in range(self.setup.num_layers)]
        self._steps = 0

    def _new_request(self) -> _Request:
        self._next_request += 1
        return _Request(f"synthetic-{self._next_request}", self.setup.prompt_tokens)


def _busy_wait(seconds: float) -> None:
    """Spin in Python (holding the GIL between switch intervals) for `seconds`."""
    if seconds <= 0:
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class StepLoop:
    """Calls `step()` every `period_s` on a daemon thread until `stop()`: the modelled decode loop."""

    def __init__(self, step: Callable[[], None], period_s: float = 0.002) -> None:
        self._step = step
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nosa-synthetic-steps", daemon=True)

    def start(self) -> "StepLoop":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "StepLoop":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._step()
            self._stop.wait(self._period_s)
