"""TransferEngine: every byte between the pinned host store and the GPU slots, on named streams.

Streams and the orderings that matter (CUDA):
- `h2d_stream` carries misses and prefetches into slots. Before a copy it waits on an event recorded
  on the compute stream after the residency diff (the victim slots are no longer read by attention
  and the id lists exist) and on the layer's last write-back (a block being re-fetched must have
  landed in the host store). The compute stream waits on the layer's last H2D event right before
  attention (`wait_for_layer`): the only point where compute can stall, and it is timed.
  With `per_stream_copies` every compute stream that runs layers (a micro-batch's) has an H2D stream
  of its own, so one micro-batch's copies do not queue behind another's: a stream's copies and waits
  (`wait_for_layer`, the slot-reuse `wait_h2d`) pair with its own H2D stream, since micro-batches own
  disjoint rows, and the step boundary joins them all (a prefetch is waited by no attention of its own
  step, and a request may run on another stream in the next).
- `writeback_stream` carries a tail block to the host once it fills (and prompts at admission). It
  waits on the compute event that wrote the last token; the compute stream waits on the write-back
  before a later token overwrites the tail slot (`wait_writeback`).
No `synchronize()` on the hot path. Zero-copy (the default) passes the fixed-size, padded miss list
straight from the GPU (`block_copy.SKIPS_NEGATIVE_IDS`). The copy engines cannot gather, so the
copy-engine path reads the miss list back through a pinned buffer and waits for that event (timed as
host wait), and does not prefetch: prefetches deferred to ride along with the next read-back gave wrong
outputs on an H200 (copy_engine + eviction-score victims, the only combination that prefetches), and
prefetch never raised the measured hit rate (docs/runtime.md).
On CPU (named CPU mode) copies are synchronous `index_copy_`s and times are host clocks.
"""

from __future__ import annotations

import time

import torch

from nosa_sglang.kernels import block_copy
from nosa_sglang.runtime.counters import Counters
from nosa_sglang.runtime.host_store import HostKVStore
from nosa_sglang.runtime.slot_buffers import SlotBuffers

#: set by kernels.block_copy when its zero-copy kernel skips entries whose src id is < 0: then the
#: runtime passes fixed-size, padded GPU id lists and never reads them back
ZERO_COPY_SKIPS_PADDING = bool(getattr(block_copy, "SKIPS_NEGATIVE_IDS", False))


class TransferEngine:
    """Issues gathers (host -> slots) and write-backs (slots -> host) for one runtime."""

    def __init__(self, device: torch.device, host: HostKVStore, slots: SlotBuffers, counters: Counters,
                 mode: str, per_stream_copies: bool = False) -> None:
        self.device, self.host, self.slots, self.counters = device, host, slots, counters
        self.cuda = device.type == "cuda"
        L = slots.num_layers
        self.h2d_stream = torch.cuda.Stream(device) if self.cuda else None
        self.writeback_stream = torch.cuda.Stream(device) if self.cuda else None
        self.per_stream_copies = per_stream_copies
        self._h2d_of: dict[torch.cuda.Stream, torch.cuda.Stream] = {}  # compute -> H2D (per_stream_copies)
        self._h2d_done: list[dict] = [{} for _ in range(L)]  # per layer: H2D stream -> its last end event
        self._unwaited: list[dict] = [{} for _ in range(L)]  # per layer: H2D stream -> [(start, end)] not waited
        self._wb_done: list[object | None] = [None] * L
        self._readback = torch.empty(0, dtype=torch.long)
        self._gathers: list[block_copy.PreparedGather | None] = [None] * L  # zero-copy launchers, made on first use
        self._queued = None  # the compute-stream event copies wait on (see _timed_after_compute)
        self._forked: set[torch.cuda.Stream] = set()  # copy streams forked into the step being captured
        self.mode = "cpu"
        self.set_mode(mode)
        self.debug_delay_cycles = 0  # tests: a sleep kernel on the h2d stream before every copy
        self.debug_writeback_delay_cycles = 0  # tests: the same on the write-back stream
        self.host_syncs = 0  # read-backs of miss lists (the copy-engine path's one wait)

    def set_mode(self, mode: str, allow_interpreter: bool = False) -> None:
        """'zero_copy' | 'copy_engine' (the transfer_mode knob); 'cpu' without CUDA, except that tests may
        run the zero-copy kernel on CPU tensors under TRITON_INTERPRET=1 (allow_interpreter)."""
        if self.cuda:
            self.mode = mode
        else:
            self.mode = "zero_copy" if allow_interpreter and mode == "zero_copy" else "cpu"

    # -- host -> GPU ------------------------------------------------------------------------------------
    def fetch(self, layer: int, packed: torch.Tensor, prefetch: bool = False) -> None:
        """Copy host runs into slots: packed [2, N] device long = (host run ids, -1 = nothing to copy;
        slot ids, the trash slot where nothing is copied)."""
        if not self.cuda:
            keep = packed[0] >= 0
            t0 = time.perf_counter()
            self._issue(layer, packed[0][keep], packed[1][keep])
            dt = time.perf_counter() - t0
            self.counters.add_host_times(layer, dt, 0.0 if prefetch else dt)
            return
        if self.mode == "zero_copy" and ZERO_COPY_SKIPS_PADDING:
            self._issue(layer, packed[0], packed[1])
        else:
            self._read_back_and_issue(layer, packed)

    def _read_back_and_issue(self, layer: int, packed: torch.Tensor) -> None:
        flat = packed.flatten()
        if self._readback.numel() < flat.numel():
            self._readback = torch.empty(max(flat.numel(), 2 * self._readback.numel()), dtype=torch.long,
                                         pin_memory=True)
        buf = self._readback[: flat.numel()]
        buf.copy_(flat, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        t0 = time.perf_counter()
        ready.synchronize()  # NOTE: the copy engines need the ids on the host (see module docstring)
        self.counters.add_host_wait(layer, time.perf_counter() - t0)
        self.host_syncs += 1
        arr = buf.view(2, -1)
        keep = arr[0] >= 0
        if bool(keep.any()):
            src, dst = arr[0][keep], arr[1][keep]
            self._check_ids(layer, src, dst)
            self._issue(layer, src, dst)

    def _check_ids(self, layer: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """The copy engines take raw host pointers: an id outside the store would make the driver read
        unmapped host memory and kill the process, so ids already on the host are checked (microseconds)."""
        runs, slots = self.host.layer_k(layer).shape[0], self.slots.k_runs(layer).shape[0]
        for name, ids, n in (("host run", src, runs), ("slot", dst, slots)):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= n:
                raise RuntimeError(f"transfer: layer {layer} {name} ids span [{lo}, {hi}], outside [0, {n}): "
                                   "the runtime's maps are inconsistent (a bug; please report it)")

    def _issue(self, layer: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        host_k, host_v = self.host.layer_k(layer), self.host.layer_v(layer)
        gpu_k, gpu_v = self.slots.k_runs(layer), self.slots.v_runs(layer)
        if not self.cuda:
            block_copy.gather_runs(host_k, host_v, src, gpu_k, gpu_v, dst, mode=self.mode, validate_ids=False)
            return
        src, dst = self._ids(src), self._ids(dst)
        h2d = self._h2d_for_current()
        # NOTE: the diff chose these victims on the compute stream; copy only after it (and after the
        # attention that last read them), and after this layer's write-backs reached the host.
        if self._wb_done[layer] is not None:
            h2d.wait_event(self._wb_done[layer])
        if self.mode == "zero_copy" and src.is_cuda and dst.is_cuda:  # the hot path: a bare launch
            gather = self._prepared(layer)
            copy = lambda: gather.launch(src, dst)  # noqa: E731
        else:
            copy = lambda: block_copy.gather_runs(host_k, host_v, src, gpu_k, gpu_v, dst, mode=self.mode,  # noqa: E731
                                                  stream=h2d, validate_ids=False)
        start, end = self._timed_after_compute(h2d, self.debug_delay_cycles, copy)
        for t in (src, dst):
            if t.is_cuda:
                t.record_stream(h2d)  # NOTE: allocated on the compute stream, read on h2d
        self._h2d_done[layer][h2d] = end
        self._unwaited[layer].setdefault(h2d, []).append((start, end))

    def _h2d_for_current(self) -> torch.cuda.Stream:
        """The H2D stream that carries the current compute stream's copies."""
        if not self.per_stream_copies:
            return self.h2d_stream
        compute = torch.cuda.current_stream()
        h2d = self._h2d_of.get(compute)
        if h2d is None:
            h2d = self._h2d_of[compute] = torch.cuda.Stream(self.device)  # NOTE: from torch's pool, no CUDA call
        return h2d

    def h2d_streams(self) -> list[torch.cuda.Stream]:
        """Every H2D stream copies may have run on."""
        return [self.h2d_stream, *self._h2d_of.values()] if self.cuda else []

    def gather_inline(self, layer: int, packed: torch.Tensor) -> None:
        """The misses of `packed` (as `fetch`) on the *current* stream: no events, no side stream, so
        the call can sit inside a captured segment. The caller made the current stream wait for this
        layer's write-backs (`wait_writeback`): a re-fetched block must have reached the host store."""
        if not self.cuda:
            keep = packed[0] >= 0
            self._issue(layer, packed[0][keep], packed[1][keep])
            return
        if self.mode != "zero_copy":
            raise RuntimeError(f"gather_inline: transfer mode {self.mode!r}; inline copies are zero-copy only")
        self._prepared(layer).launch(packed[0], packed[1])

    def _prepared(self, layer: int) -> block_copy.PreparedGather:
        """The layer's zero-copy launcher (tensors checked once, on first use)."""
        gather = self._gathers[layer]
        if gather is None:
            gather = self._gathers[layer] = block_copy.PreparedGather(
                self.host.layer_k(layer), self.host.layer_v(layer), self.slots.k_runs(layer), self.slots.v_runs(layer))
        return gather

    def wait_for_layer(self, layer: int) -> None:
        """Compute stream waits for every H2D copy into this layer's slots that it issued (timed as
        stall, except inside a captured step, which has no timing events)."""
        if not self.cuda:
            return
        h2d = self._h2d_for_current()
        pending = self._unwaited[layer].pop(h2d, None)
        if not pending:
            return
        timed = [(start, end) for start, end in pending if start is not None]
        ready = None
        if timed:
            ready = torch.cuda.Event(enable_timing=True)
            ready.record()
        torch.cuda.current_stream().wait_event(self._h2d_done[layer][h2d])
        for i, (start, end) in enumerate(timed):
            self.counters.add_timing(layer, start, end, ready if i == len(timed) - 1 else None)

    def wait_h2d(self, layer: int) -> None:
        """Compute waits for H2D copies of this layer before it overwrites a slot (no stall timing). With
        per_stream_copies only its own H2D stream's: other micro-batches copy into other rows' slots, and
        the step boundary joined every earlier copy (a prefetch included)."""
        if not self.cuda:
            return
        done = self._h2d_done[layer]
        if self.per_stream_copies:
            own = done.get(self._h2d_for_current())
            events = [] if own is None else [own]
        else:
            events = list(done.values())
        for event in events:
            torch.cuda.current_stream().wait_event(event)

    # -- GPU -> host --------------------------------------------------------------------------------
    def write_back(self, layer: int, src: torch.Tensor, dst_runs: torch.Tensor,
                   gpu_k: torch.Tensor | None = None, gpu_v: torch.Tensor | None = None,
                   runs: int | None = None) -> None:
        """host run dst_runs[i] = GPU run src[i]; from the slots unless gpu_k/gpu_v (a prompt staged in
        runs) are given. Ids: CPU tensors, or (zero-copy, a step graph) device tensors padded with -1,
        of which `runs` are real."""
        staged = gpu_k is not None
        gpu_k = self.slots.k_runs(layer) if gpu_k is None else gpu_k
        gpu_v = self.slots.v_runs(layer) if gpu_v is None else gpu_v
        host_k, host_v = self.host.layer_k(layer), self.host.layer_v(layer)
        if not self.capturing():  # NOTE: a captured step counts its bytes when it replays (StepGraphs)
            self.counters.add_write_back(layer, src.numel() if runs is None else runs)
        if not self.cuda:
            keep = src >= 0
            src, dst_runs = src[keep], dst_runs[keep]
            t0 = time.perf_counter()
            block_copy.scatter_runs(gpu_k, gpu_v, src, host_k, host_v, dst_runs, mode=self.mode, validate_ids=False)
            self.counters.add_host_times(layer, time.perf_counter() - t0, 0.0)
            return
        src, dst_runs = self._ids(src), self._ids(dst_runs)
        wb = self.writeback_stream
        # NOTE: the last token of the block was written on the compute stream
        start, end = self._timed_after_compute(wb, self.debug_writeback_delay_cycles, lambda: block_copy.scatter_runs(
            gpu_k, gpu_v, src, host_k, host_v, dst_runs, mode=self.mode, stream=wb, validate_ids=False))
        if staged:
            for t in (gpu_k, gpu_v):
                t.record_stream(wb)  # NOTE: a staged prompt is freed on the compute stream
        self._wb_done[layer] = end
        if start is not None:
            self.counters.add_timing(layer, start, end)

    def _timed_after_compute(self, stream: torch.cuda.Stream, delay_cycles: int, copy) -> tuple[object, object]:
        """Issue `copy()` on `stream` after everything queued on the compute stream so far, between two
        timing events (after a sleep of `delay_cycles` when a test asks for a late copy). Inside a
        captured step the wait forks `stream` into the capture, and there are no timing events (start
        is None): a graph cannot time its own nodes for the host.

        The ordering event is one reused object: a stream waits for the event's latest record at the
        time of `wait_event`, so recording it again later cannot release or delay an earlier wait."""
        if self._queued is None:
            self._queued = torch.cuda.Event()
        self._queued.record()
        stream.wait_event(self._queued)
        capturing = self.capturing()
        if capturing:
            self._forked.add(stream)
        start = None if capturing else torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=not capturing)
        with torch.cuda.stream(stream):
            if start is not None:
                start.record(stream)
            if delay_cycles:
                torch.cuda._sleep(delay_cycles)
            copy()
            end.record(stream)
        return start, end

    def capturing(self) -> bool:
        """Is the current stream capturing a CUDA graph (a StepGraphs capture)?"""
        return self.cuda and torch.cuda.is_current_stream_capturing()

    def join_forked(self) -> None:
        """End of a captured step: the capture stream waits for every copy stream the step forked (a
        capture must end joined), then the step's events are forgotten: they exist only in the graph,
        whose replay ends after all of its copies."""
        here = torch.cuda.current_stream()
        for stream in self._forked:
            here.wait_stream(stream)
        self._forked.clear()
        self._forget_events()

    def abandon_capture(self) -> None:
        """A capture failed: its forks and events never existed."""
        self._forked.clear()
        self._forget_events()

    def _forget_events(self) -> None:
        L = len(self._h2d_done)
        self._h2d_done, self._wb_done = [{} for _ in range(L)], [None] * L
        self._unwaited = [{} for _ in range(L)]

    def join_copy_streams(self) -> None:
        """Step boundary (per_stream_copies): the current stream waits for every micro-batch's H2D stream,
        so that a prefetch, which no attention of its own step waits for, lands before the next step's
        plans, whatever stream the request's next micro-batch runs on. (With one H2D stream the next
        step's copies queue behind it, and every layer's attention, inline gathers included, waits for
        the stream's pending copies: `wait_for_layer`.)"""
        if self.cuda and self.per_stream_copies:
            here = torch.cuda.current_stream()
            for h2d in self._h2d_of.values():
                here.wait_stream(h2d)

    def _ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Host id lists for the zero-copy kernel are copied to the GPU: pin them so that the copy is
        asynchronous (a pageable source would make the host wait)."""
        if self.mode == "zero_copy" and not ids.is_cuda and not ids.is_pinned():
            return ids.pin_memory()
        return ids

    def wait_writeback(self, layer: int) -> None:
        """Compute waits for this layer's write-backs before it overwrites a tail slot."""
        if self.cuda and self._wb_done[layer] is not None:
            torch.cuda.current_stream().wait_event(self._wb_done[layer])

    def quiesce(self) -> None:
        """Order every stream before rows or host blocks change owner (admission, release): compute waits
        for the copy streams (H2D and write-back) and they wait for compute."""
        if not self.cuda:
            return
        compute = torch.cuda.current_stream()
        copy_streams = [*self.h2d_streams(), self.writeback_stream]
        for s in copy_streams:
            compute.wait_stream(s)
        for s in copy_streams:
            s.wait_stream(compute)
        for layer, pending in enumerate(self._unwaited):
            for start, end in (pair for pairs in pending.values() for pair in pairs):
                if start is not None:
                    self.counters.add_timing(layer, start, end)
        self._forget_events()  # NOTE: compute has waited for every copy, and every copy stream for compute
