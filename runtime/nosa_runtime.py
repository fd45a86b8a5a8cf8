"""NosaRuntime: the one API through which the reference model and the SGLang backend drive NOSA offload.

Lifecycle of a request: `begin_request` (prompt KV -> host store + warm GPU slots + compressed keys),
then per decode step and layer `append` (the new token's k/v/c) and `attend` (select -> residency diff
-> fetch -> sparse attention), `step_boundary()` between steps, and `end_request` / `abort_request`.
A step's batch may be split into disjoint *micro-batches*, each decoded through every layer on its own
CUDA stream, so that one micro-batch's copies overlap another's compute (see `decode`).
Control threads (gRPC) call `snapshot`, `knobs`, `request_knobs`, `reset_stats`, `nosa_config`: they
never touch the device and knob changes wait for the next `step_boundary()`.

Only the stepping thread may call the request and decode methods.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels.table_runs import host_run_ids
from nosa_sglang.runtime.counters import BoundaryInfo, Counters, RunningRequest
from nosa_sglang.runtime.decode_layer import LayerDecoder
from nosa_sglang.runtime.full_residency import FullResidency
from nosa_sglang.runtime.host_store import HostKVStore, HostMemoryExhausted
from nosa_sglang.runtime.knob_queue import KnobQueue, KnobRequest
from nosa_sglang.runtime.knobs import KnobError, OffloadKnobs
from nosa_sglang.runtime.page_pool import PADDING_PAGE, PagePool
from nosa_sglang.runtime.plan_streams import PlanStreams
from nosa_sglang.runtime.pool_residency import PoolResidency
from nosa_sglang.runtime.prompt import PromptLoader
from nosa_sglang.runtime.selection_state import SelectionState
from nosa_sglang.runtime.slot_cache import GpuSlotCache
from nosa_sglang.runtime.stats import StatsSnapshot
from nosa_sglang.runtime.step_plan import StepPlan, build_step_plan
from nosa_sglang.runtime.transfer import TransferEngine
from nosa_sglang.runtime.types import (
    Admission, Admitted, GpuSlotsExhausted, ModelShape, RequestTooLarge, RuntimeUsageError,
)
from nosa_sglang.runtime.victim import make_victim_policy

SELECTION_POLICIES = ("nosa", "infllmv2")


class _Request:
    __slots__ = ("request_id", "row", "seq_len", "host_blocks")

    def __init__(self, request_id: str, row: int, seq_len: int, host_blocks: list[int]) -> None:
        self.request_id, self.row, self.seq_len, self.host_blocks = request_id, row, seq_len, host_blocks


class NosaRuntime:
    """NOSA decode over a pinned host KV store and a GPU slot cache (or fully on the GPU).

    Args:
        shape: the model's attention shape (layers, heads, head_dim, dtype).
        config: the model's NOSA constants.
        knobs: initial OffloadKnobs (default OffloadKnobs(gpu_slots=config.topk_blocks)).
        device: "cuda[:N]" or "cpu" (named CPU mode: plain memory, synchronous copies).
        host_capacity_bytes: pinned host bytes for K + V of all layers (offload mode).
        max_requests: request rows of the GPU state (running requests at most).
        max_seq_len: tokens per request at most (sizes compressed keys, biases, block maps).
        max_gpu_slots: regular slots allocated per (layer, request, KV head); the `gpu_slots` knob may
            range over [topk_blocks, max_gpu_slots]. Default: knobs.gpu_slots.
        selection_policy: "nosa", or "infllmv2" (top-k by query score alone: the benchmark baseline).
        gpu_only: every block resident on the GPU, no host tier (NOSA fully on GPU).
        page_pool: a server's page pool whose pages hold every token (the caller names each request's
            pages, `begin_request`'s `pages`, and each decode token's location, `token_locs`). With
            gpu_only (device storage): decode from its pages in place (PoolResidency) instead of a
            copy of every request's blocks. Offloading (host storage, `PagePool(host=True)`): it is the
            host store; the server allocates its blocks and writes every token to them, so the runtime
            allocates and writes back nothing.
        host_buffer: optional preallocated host tensor to carve the host store from.
        kernel_impl: "auto" | "triton" | "torch" for the selection and attention kernels
            (default: "auto" on CUDA, "torch" on CPU).
        ck_dtype: storage of the compressed keys K~ (float32 matches the reference exactly; the model
            dtype halves their memory and selection reads, at the price of rare near-tie flips).
        cuda_graphs: capture each layer's tensor work in CUDA graphs (CUDA only; selection then runs
            over max_seq_len's blocks so that shapes stay fixed), and keep the static buffers that whole
            steps captured as one graph (StepGraphs) read. See graph_cache.py, step_graphs.py.
        inline_gather: in `decode()`, gather the misses on the compute stream inside the layer's one
            segment (zero-copy mode, no prefetch): one graph launch and no host point per layer, at the
            price of the transfer/stall timings (not measured for inline copies; hits, misses and bytes
            still are). See docs/runtime.md.
        per_stream_copies: every compute stream that runs layers (each micro-batch's) gets an H2D copy
            stream of its own instead of sharing one, so one micro-batch's copies never queue behind
            another's (transfer.py). Off: with zero-copy gathers it measured slower (three gathers in
            flight take SMs without raising the PCIe rate; benchmarks/results/runtime.md, session 7).
    """

    def __init__(
        self,
        shape: ModelShape,
        config: NosaConfig,
        knobs: OffloadKnobs | None = None,
        *,
        device: str | torch.device = "cpu",
        host_capacity_bytes: int = 0,
        max_requests: int = 8,
        max_seq_len: int = 32768,
        max_gpu_slots: int | None = None,
        selection_policy: str = "nosa",
        gpu_only: bool = False,
        host_buffer: torch.Tensor | None = None,
        page_pool: PagePool | None = None,
        kernel_impl: str | None = None,
        ck_dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = False,
        inline_gather: bool = False,
        per_stream_copies: bool = False,
    ) -> None:
        self.shape, self.config = shape, config
        self.device = torch.device(device)
        knobs = (knobs or OffloadKnobs(gpu_slots=config.topk_blocks)).validate_for(config.topk_blocks)
        if selection_policy not in SELECTION_POLICIES:
            raise ValueError(f"selection_policy={selection_policy!r}: allowed values are {list(SELECTION_POLICIES)}")
        if page_pool is not None and page_pool.host == gpu_only:
            raise ValueError("page_pool: gpu_only decodes from device storage, offloading needs host storage "
                             f"(got host={page_pool.host} with gpu_only={gpu_only})")
        if max_requests < 1 or max_seq_len < 1:
            raise ValueError(f"max_requests={max_requests}, max_seq_len={max_seq_len}: allowed range is >= 1")
        self.max_gpu_slots = max(knobs.gpu_slots, max_gpu_slots or knobs.gpu_slots)
        self.selection_policy, self.gpu_only = selection_policy, gpu_only
        self.max_requests, self.max_seq_len = max_requests, max_seq_len
        self.max_blocks = config.num_blocks(max_seq_len)
        self.impl = kernel_impl or ("auto" if self.device.type == "cuda" else "torch")
        L, H, d, bs = shape.num_layers, shape.num_kv_heads, shape.head_dim, config.block_size
        self.selection = SelectionState(L, max_requests, H, d, self.max_blocks * bs, config, shape.dtype, self.device,
                                        ck_dtype=ck_dtype)
        self.page_pool = page_pool
        self.paged = page_pool is not None  # the server's pages hold every token (its allocator, its writes)
        self.pool_backed = self.paged and gpu_only  # decoding from the pages in place
        #: the runtime allocates its requests' host blocks (offloading over its own store, not a server's pages)
        self.allocates_blocks = not (gpu_only or self.paged)
        self._host_table = None  # [rows, max_blocks] int32: host block (offload) or pool page of each block
        if self.pool_backed:
            self.slots = PoolResidency(page_pool, max_requests)
            self.host = None
            self._host_table = torch.full((max_requests, self.max_blocks), -1, dtype=torch.int32, device=self.device)
        elif gpu_only:
            self.slots = FullResidency(L, max_requests, H, bs, d, shape.dtype, self.max_blocks, self.device)
            self.host = None
        else:
            self.slots = GpuSlotCache(L, max_requests, H, self.max_gpu_slots, bs, d, shape.dtype, self.max_blocks,
                                      self.device)
            self.slots.set_active(knobs.gpu_slots)
            self.host = HostKVStore(L, H, d, bs, shape.dtype, host_capacity_bytes, buffer=host_buffer,
                                    storage=page_pool.kv if self.paged else None)
            self.host.set_limit_bytes(knobs.host_capacity_bytes)
            self._host_table = torch.full((max_requests, self.max_blocks), -1, dtype=torch.int32, device=self.device)
        run_bytes = bs * d * shape.dtype_bytes
        self.counters = Counters(L, max_requests, shape.num_kv_heads, run_bytes, self.device)
        self.transfer = None if gpu_only else TransferEngine(self.device, self.host, self.slots, self.counters,
                                                             knobs.transfer_mode, per_stream_copies)
        self._prompts = PromptLoader(self)
        self._knob_queue = KnobQueue(knobs)
        self._knobs = knobs
        self._victims = make_victim_policy(knobs.victim_policy)
        self._requests: dict[str, _Request] = {}
        self._row_owner: list[str] = []  # running requests occupy rows 0..n-1 (kept compact)
        self._plans: dict[tuple[str, ...], StepPlan] = {}  # this step's micro-batches (usually one)
        self._ordered = torch.cuda.Event() if self.device.type == "cuda" else None  # see _order_after_host_changes
        self._step = 0
        self._step_t = torch.zeros((), dtype=torch.int32, device=self.device)  # the step, for graphs
        self.inline_gather = inline_gather
        self._decoder = LayerDecoder(self, cuda_graphs and self.device.type == "cuda")
        self.cuda_graphs = self._decoder.graphs is not None  # static buffers + segment graphs (CUDA only)
        self.in_step_graph = False  # set by StepGraphs while a whole step runs as (or for) one graph
        self.capture_stream: torch.cuda.Stream | None = None  # set by StepGraphs while it captures a step
        self.graph_generation = 0  # bumped whenever captured graphs become invalid
        self._last_selection: dict[int, torch.Tensor] = {}
        self._heads = torch.arange(H, device=self.device)
        self._lock = threading.Lock()
        self._publish()

    # -- control surface (any thread) ------------------------------------------------------------------
    def snapshot(self) -> StatsSnapshot:
        """Counters as of a recent step boundary; never syncs the GPU."""
        snap = self.counters.snapshot()
        assert snap is not None, "the constructor publishes a first snapshot"
        return snap

    def graph_counts(self) -> dict[str, int]:
        """How the per-layer segments ran since start: eager (a key's first run), captures, replays, and
        clears (every graph dropped). Empty without segment graphs. A serving batch that keeps changing
        size or rows shows up here as eager runs and captures instead of replays."""
        g = self._decoder.graphs
        return {} if g is None else {"eager": g.eager, "captures": g.captures, "replays": g.replays, "clears": g.clears}

    def nosa_config(self) -> NosaConfig:
        return self.config

    def knobs(self) -> OffloadKnobs:
        return self._knob_queue.in_force()

    def requested_knobs(self) -> OffloadKnobs:
        return self._knob_queue.latest()

    def request_knobs(self, knobs: OffloadKnobs, timeout_s: float = 0.0) -> KnobRequest:
        """Queue `knobs` for the next step boundary (wait up to timeout_s for it). Raises KnobError if
        gpu_slots exceeds this runtime's slot allocation."""
        knobs.validate_for(self.config.topk_blocks)
        if not self.gpu_only and knobs.gpu_slots > self.max_gpu_slots:
            raise KnobError("gpu_slots", f"gpu_slots={knobs.gpu_slots}: allowed range is "
                                         f"[{self.config.topk_blocks}, {self.max_gpu_slots}] (slots allocated)")
        return self._knob_queue.request(knobs, timeout_s)

    def reset_stats(self) -> None:
        self.counters.reset()

    # -- admission -------------------------------------------------------------------------------------
    def can_admit(self, prompt_tokens: int, shared_prefix_blocks: int = 0) -> Admission:
        """Whether begin_request for a prompt of `prompt_tokens` would succeed now (a value, no raise)."""
        mine = self.allocates_blocks  # NOTE: paged, the server's allocator admits the blocks
        need = self.config.num_blocks(prompt_tokens) - shared_prefix_blocks if mine else 0
        free = self.host.free_blocks if mine else 0
        rows = self.max_requests - len(self._row_owner)
        reason, never = "", False
        if prompt_tokens + 1 > self.max_seq_len:
            reason, never = f"prompt of {prompt_tokens} tokens exceeds max_seq_len={self.max_seq_len}", True
        elif mine and need > self.host.num_blocks:
            reason, never = str(RequestTooLarge(prompt_tokens, need, self.host.num_blocks)), True
        elif rows < 1:
            reason = f"no GPU slots: all {self.max_requests} request rows in use"
        elif need > free:
            reason = f"host KV store: {need} block(s) needed, {free} free"
        return Admission(not reason, need, free, rows, reason, never)

    def begin_request(self, request_id: str, prompt_k, prompt_v, prompt_c,
                      shared_prefix_blocks: list[int] | None = None, pages: list[int] | None = None) -> Admitted:
        """Admit a request with its prompt's KV (per layer [T, Hkv, d], bias [T, Hkv]; any sequence indexed by
        layer: a list, a stacked [L, T, ...] tensor, or one that builds each layer when indexed, since
        layers are loaded one at a time). The first len(shared_prefix_blocks) full blocks are already in the host
        store (shared, not rewritten). Raises HostMemoryExhausted / GpuSlotsExhausted and then changes
        nothing; RequestTooLarge (changing nothing either) when the prompt needs more host blocks than
        the store holds at all. The prompt's own attention is the caller's (prefill).
        `pages` (page_pool mode, required there): the pool page of each of the prompt's blocks, which
        already holds its K/V/c (prompt_v is not read)."""
        self._require_no_open_step("begin_request")
        if request_id in self._requests:
            raise RuntimeUsageError(f"request_id={request_id!r}: already running")
        T = self._prompts.check(prompt_k, prompt_v, prompt_c)
        shared = list(shared_prefix_blocks or [])
        if T < 1 or T + 1 > self.max_seq_len:
            raise ValueError(f"prompt_k: {T} tokens; allowed range is [1, {self.max_seq_len - 1}] (max_seq_len - 1)")
        if len(shared) > T // self.config.block_size or (shared and self.gpu_only):
            raise ValueError(f"shared_prefix_blocks: {len(shared)} blocks; allowed range is "
                             f"[0, {T // self.config.block_size}]"
                             " full prompt blocks (and none in gpu_only mode)")
        if self.paged != (pages is not None):
            raise ValueError("pages: " + ("required with a page_pool" if self.paged else "only with a page_pool"))
        if pages is not None:
            n_pages = self.slots.pool.num_pages if self.pool_backed else self.host.num_blocks
            if len(pages) != self.config.num_blocks(T) or not all(0 <= b < n_pages for b in pages):
                raise ValueError(f"pages: expected {self.config.num_blocks(T)} page ids in [0, {n_pages}), "
                                 f"got {len(pages)}")
        self._check_fits(T, self.config.num_blocks(T) - len(shared))
        if len(self._row_owner) >= self.max_requests:
            raise GpuSlotsExhausted(self.max_requests)
        host_blocks: list[int] = list(pages or [])
        n_written = len(shared)  # full blocks already in the host store
        if not self.gpu_only:
            if self.paged:
                self.host.adopt(host_blocks)
                n_written = T // self.config.block_size
            else:
                host_blocks = self._take_host_blocks(request_id, self.config.num_blocks(T), shared)
            self.transfer.quiesce()
        row = len(self._row_owner)
        self._prompts.load(row, T, host_blocks, n_written, prompt_k, prompt_v, prompt_c, self._step)
        with self._lock:
            self._requests[request_id] = _Request(request_id, row, T, host_blocks)
            self._row_owner.append(request_id)
        self._order_after_host_changes()
        return Admitted(request_id, tuple(host_blocks), T)

    def begin_paged_requests(self, requests: Sequence[tuple[str, int, Sequence[int]]]) -> list[Admitted]:
        """Admit several requests whose prompts already sit on the page pool's pages (page_pool mode):
        `requests` = (request_id, prompt tokens, the pool page of each prompt block). The state
        begin_request builds, bit for bit, with one pass per layer for all of them (a server admits
        every request new to a decode batch at once). All or nothing: raises as begin_request does
        (ValueError, RuntimeUsageError, GpuSlotsExhausted) and then changes nothing."""
        self._require_no_open_step("begin_paged_requests")
        if not self.paged:
            raise RuntimeUsageError("begin_paged_requests: only with a page_pool (use begin_request)")
        ids = [rid for rid, _, _ in requests]
        if not ids or len(set(ids)) != len(ids) or set(ids) & self._requests.keys():
            raise RuntimeUsageError(f"request ids {ids}: expected distinct requests that are not running")
        n_pages = self.slots.pool.num_pages if self.pool_backed else self.host.num_blocks
        for rid, T, pages in requests:
            if not 1 <= T < self.max_seq_len:
                raise ValueError(f"request {rid!r}: {T} prompt tokens; allowed range is [1, {self.max_seq_len - 1}]")
            if len(pages) != self.config.num_blocks(T) or not all(0 <= b < n_pages for b in pages):
                raise ValueError(f"request {rid!r} pages: expected {self.config.num_blocks(T)} page ids in "
                                 f"[0, {n_pages}), got {len(pages)}")
        if len(self._row_owner) + len(ids) > self.max_requests:
            raise GpuSlotsExhausted(self.max_requests)
        pages = [list(p) for _, _, p in requests]
        if not self.gpu_only:
            for p in pages:
                self.host.adopt(p)
            self.transfer.quiesce()
        rows = list(range(len(self._row_owner), len(self._row_owner) + len(ids)))
        lens = [T for _, T, _ in requests]
        self._prompts.load_paged(rows, lens, pages, self._step)
        with self._lock:
            for rid, row, T, p in zip(ids, rows, lens, pages):
                self._requests[rid] = _Request(rid, row, T, p)
                self._row_owner.append(rid)
        self._order_after_host_changes()
        return [Admitted(rid, tuple(p), T) for rid, T, p in zip(ids, lens, pages)]

    def begin_request_synthetic(self, request_id: str, num_tokens: int, seed: int = 0,
                                shared_blocks: list[int] | None = None) -> Admitted:
        """Benchmarks only: admit a request of `num_tokens` whose K/V are whatever the host store and the
        slots hold, with random compressed keys, chunk means and biases (no prompt upload: admission
        costs microseconds, not a PCIe pass). Back-pressure as begin_request. `shared_blocks`: its first
        full blocks are these host blocks of another request (as begin_request's shared prefix), so a
        benchmark can run more requests than the pinned store holds: the copies move the same bytes,
        from host addresses that several requests share."""
        self._require_no_open_step("begin_request_synthetic")
        if self.paged:
            raise RuntimeUsageError("begin_request_synthetic: not with a page_pool (its pages hold the server's KV)")
        if request_id in self._requests:
            raise RuntimeUsageError(f"request_id={request_id!r}: already running")
        if not 1 <= num_tokens < self.max_seq_len:
            raise ValueError(f"num_tokens={num_tokens}: allowed range is [1, {self.max_seq_len - 1}]")
        shared = [] if self.gpu_only else list(shared_blocks or [])
        if len(shared) > num_tokens // self.config.block_size:
            raise ValueError(f"shared_blocks: {len(shared)} blocks; allowed range is "
                             f"[0, {num_tokens // self.config.block_size}] (full blocks of the request)")
        self._check_fits(num_tokens, self.config.num_blocks(num_tokens) - len(shared))
        if len(self._row_owner) >= self.max_requests:
            raise GpuSlotsExhausted(self.max_requests)
        host_blocks: list[int] = []
        if not self.gpu_only:
            host_blocks = self._take_host_blocks(request_id, self.config.num_blocks(num_tokens), shared)
            self.transfer.quiesce()
        row = len(self._row_owner)
        self._prompts.load_synthetic(row, num_tokens, host_blocks, seed, self._step)
        with self._lock:
            self._requests[request_id] = _Request(request_id, row, num_tokens, host_blocks)
            self._row_owner.append(request_id)
        self._order_after_host_changes()
        return Admitted(request_id, tuple(host_blocks), num_tokens)

    def host_blocks(self, request_id: str) -> tuple[int, ...]:
        """Host block ids of a running request (for prefix sharing)."""
        return tuple(self._req(request_id).host_blocks)

    def end_request(self, request_id: str) -> None:
        """Free everything the request owns (host block references, its GPU row)."""
        self._require_no_open_step("end_request")
        req = self._req(request_id)
        if self.transfer is not None:
            self.transfer.quiesce()  # NOTE: in-flight copies may still touch its slots and blocks
            self.host.release(req.host_blocks)
        last = len(self._row_owner) - 1
        with self._lock:
            if req.row != last:  # keep rows compact: the last row moves into the hole
                mover = self._requests[self._row_owner[last]]
                self.slots.move_row(last, req.row)
                self.selection.move_row(last, req.row)
                self.counters.move_row(last, req.row)
                if self._host_table is not None:
                    self._host_table[req.row] = self._host_table[last]
                mover.row = req.row
                self._row_owner[req.row] = mover.request_id
                self._drop_graphs()
            self._row_owner.pop()
            del self._requests[request_id]
        self.slots.clear_row(last)
        self._order_after_host_changes()

    def _drop_graphs(self) -> None:
        """Re-capture after rows move or slot knobs change. NOTE: on an H200, graph replays after a row
        move plus gpu_slots changes produced out-of-range host ids (docs/runtime.md, "GPU status");
        with the graphs dropped here, test_row_moves_block_openings_and_knob_changes_on_cuda passes there."""
        if self._decoder.graphs is not None:
            self._decoder.graphs.clear()
        self.graph_generation += 1  # step graphs (StepGraphs) re-capture too

    def abort_request(self, request_id: str) -> None:
        """Like end_request, and also valid inside an open step (an exception interrupted a forward):
        that step is then discarded for every micro-batch, whose appends must be repeated."""
        if self._plans and not self._step_complete():
            self._join_micro_batch_streams()  # NOTE: their kernels may still touch the rows that move
            self._plans = {}  # NOTE: a repeated step rewrites the same positions (start_tail_block is idempotent)
        self.end_request(request_id)

    @property
    def running_requests(self) -> tuple[str, ...]:
        return tuple(self._row_owner)

    def seq_len(self, request_id: str) -> int:
        return self._req(request_id).seq_len

    # -- decode ----------------------------------------------------------------------------------------
    def append(self, layer: int, request_ids, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
               token_locs: torch.Tensor | None = None) -> None:
        """Store one new token per request in `layer`: k, v [B, Hkv, d] (post-RoPE k), c [B, Hkv].
        token_locs (page_pool mode, required there): [B] pool location of each new token (page *
        block_size + offset; its offset must be the token's position modulo block_size).
        The first append of a step may raise HostMemoryExhausted (a new block) and then changes nothing."""
        p = self._plan_for(tuple(request_ids), layer, token_locs)
        self._enter(p)
        self._decoder.append(layer, p, k, v, c)
        p.appended.add(layer)

    def attend(self, layer: int, request_ids, q: torch.Tensor) -> torch.Tensor:
        """NOSA decode attention of the tokens appended in `layer` this step: q [B, Hq, d] -> [B, Hq, d].
        With cuda_graphs the result may live in a graph's buffer: consume it before the next step."""
        p = self._plans.get(tuple(request_ids))
        if p is None or layer not in p.appended:
            raise RuntimeUsageError(f"attend(layer={layer}): append this batch's tokens in layer {layer} first")
        self._enter(p)
        o = self._decoder.attend(layer, p, q)
        p.attended.add(layer)
        return o

    def decode(self, layer: int, request_ids, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               c: torch.Tensor, token_locs: torch.Tensor | None = None) -> torch.Tensor:
        """`append(layer, ids, k, v, c)` then `attend(layer, ids, q)` in one call, the shape of an attention
        backend's decode (q, k, v come out of one projection): the same results, and with cuda_graphs
        one captured segment fewer per layer. Raises as append does, and then changes nothing.

        Micro-batches: a step may decode disjoint sets of running requests separately, each through
        every layer, e.g. two halves of the batch, each under its own `torch.cuda.stream`, interleaved
        layer by layer. The streams then overlap one micro-batch's copies with the other's compute;
        the results are those of one batch. Every stream's first layer of a micro-batch waits for
        that micro-batch's step plan (built after the last admission, release or step boundary), and
        `step_boundary()` orders the calling stream after every stream that ran a layer (PlanStreams).
        The layer's inputs stay the caller's to order."""
        p = self._plan_for(tuple(request_ids), layer, token_locs)
        self._enter(p)
        o = self._decoder.decode(layer, p, q, k, v, c)
        p.appended.add(layer)
        p.attended.add(layer)
        return o

    def begin_step(self, request_ids, token_locs: torch.Tensor | None = None) -> StepPlan:
        """Open this step for the batch: its host side (new blocks, the step plan and its upload) before
        any layer runs. The first append()/decode() of a step does this itself; a caller that runs whole
        steps as one CUDA graph (StepGraphs) calls it before the replay, since a capture cannot hold it.
        Closes a complete previous step; raises as append does (HostMemoryExhausted), changing nothing."""
        ids = tuple(request_ids)
        p = self._plans.get(ids)
        if p is not None and p.appended:
            if not self._step_complete():
                raise RuntimeUsageError(f"begin_step: layers {sorted(p.appended)} of batch {ids} already ran this step")
            self.step_boundary()
        return self._plan_for(ids, 0, token_locs)

    def last_selection(self, layer: int) -> torch.Tensor | None:
        """[B, Hkv, topk_blocks] int32 blocks the last attend of `layer` selected (caller order)."""
        return self._last_selection.get(layer)

    def step_boundary(self) -> None:
        """Close the step (every layer appended), apply queued knobs, roll and publish the counters."""
        if self._plans:
            for p in self._plans.values():
                if len(p.appended) != self.shape.num_layers:
                    raise RuntimeUsageError(f"step_boundary: only layers {sorted(p.appended)} of "
                                            f"{self.shape.num_layers} appended this step for batch {p.request_ids}")
            for p in self._plans.values():
                for rid in p.request_ids:
                    self._requests[rid].seq_len += 1
            self._join_micro_batch_streams()  # NOTE: counters, step counter and the next plans follow them
            self._plans = {}
            self._step += 1
            self._step_t.fill_(self._step)
        new = self._knob_queue.take()
        if new is not None:
            self._apply_knobs(new)
        self.counters.resolve_events()
        self._publish()
        self._order_after_host_changes()

    # -- internals -------------------------------------------------------------------------------------
    def _req(self, request_id: str) -> _Request:
        req = self._requests.get(request_id)
        if req is None:
            raise RuntimeUsageError(f"request_id={request_id!r}: not running")
        return req

    def _take_host_blocks(self, request_id: str, n_blocks: int, shared: list[int]) -> list[int]:
        """A new request's host blocks: `shared` (another request's full prompt blocks, one more reference
        each), then fresh ones. Raises HostMemoryExhausted, or ValueError for ids that are not allocated
        blocks, and then nothing changed."""
        what, n_new = f"request {request_id!r}", n_blocks - len(shared)
        if n_new > self.host.free_blocks:
            raise HostMemoryExhausted(n_new, self.host.free_blocks, what)
        self.host.share(shared)  # validates the ids before anything else changes
        try:
            return shared + self.host.allocate(n_new, what)
        except HostMemoryExhausted:
            self.host.release(shared)
            raise

    def _check_fits(self, tokens: int, new_blocks: int) -> None:
        """RequestTooLarge when `new_blocks` exceed the whole host store: no wait could make room."""
        if self.allocates_blocks and new_blocks > self.host.num_blocks:
            raise RequestTooLarge(tokens, new_blocks, self.host.num_blocks)

    def _step_complete(self) -> bool:
        return all(len(p.appended) == self.shape.num_layers for p in self._plans.values())

    def _require_no_open_step(self, what: str) -> None:
        if self._plans:
            if self._step_complete():
                self.step_boundary()
            else:
                raise RuntimeUsageError(f"{what}: a decode step is open (call step_boundary() after the last layer)")

    def _join_micro_batch_streams(self) -> None:
        """The calling stream waits for the work of every stream that ran a layer this step."""
        if self._ordered is None:
            return
        here = torch.cuda.current_stream()
        for p in self._plans.values():
            p.streams.join_into(here)
        if self.transfer is not None:
            self.transfer.join_copy_streams()

    def _enter(self, p: StepPlan) -> None:
        """The current stream is about to run a layer of `p`: order it after the plan (PlanStreams)."""
        ps = p.streams
        if ps is not None:
            stream = torch.cuda.current_stream()
            if self.capture_stream is None and ps.is_new(stream):  # NOTE: only a stream's first layer pays the check
                self._refuse_foreign_capture(f"batch {p.request_ids}")
            ps.enter(stream, self.capture_stream)

    def _refuse_foreign_capture(self, what: str) -> None:
        """Outside StepGraphs a capture cannot wait for the plan (its upload and events lie outside the
        graph): CUDA would fail the capture with an isolation error; say why instead."""
        if self.capture_stream is None and torch.cuda.is_current_stream_capturing():
            raise RuntimeUsageError(f"{what}: a CUDA graph capture other than StepGraphs' (decode steps are "
                                    f"captured with runtime.StepGraphs, which builds the plans before the capture)")

    def join_captured_plan_streams(self) -> None:
        """End of a StepGraphs capture: the capture stream joins every stream that ran a layer in it."""
        for p in self._plans.values():
            if p.streams is not None:
                p.streams.join_captured(self.capture_stream)

    def abandon_captured_plan_streams(self) -> None:
        """A StepGraphs capture failed: nothing ran on the streams it entered."""
        for p in self._plans.values():
            if p.streams is not None:
                p.streams.abandon_capture()

    def _order_after_host_changes(self) -> None:
        """Mark the calling stream's position after an admission, a release or a step boundary: the
        next micro-batch's stream starts after it (its plan reads rows, maps and the step counter)."""
        if self._ordered is not None:
            self._ordered.record()

    def _plan_for(self, request_ids: tuple[str, ...], layer: int, token_locs: torch.Tensor | None = None) -> StepPlan:
        p = self._plans.get(request_ids)
        if p is not None and layer in p.appended and self._step_complete():
            self.step_boundary()  # a new step began without an explicit boundary
            p = None
        if p is not None:
            if layer in p.appended:
                raise RuntimeUsageError(f"append(layer={layer}): already appended this step")
            return p
        reqs = [self._req(r) for r in request_ids]
        if len(set(request_ids)) != len(request_ids) or not reqs:
            raise RuntimeUsageError(f"request_ids={request_ids}: expected distinct running requests")
        for other in self._plans.values():
            if set(request_ids) & set(other.request_ids):
                raise RuntimeUsageError(f"append(layer={layer}): batch {request_ids} overlaps this step's "
                                        f"micro-batch {other.request_ids} (micro-batches must be disjoint)")
        if self.capture_stream is not None:
            raise RuntimeUsageError(f"batch {request_ids}: not begun before the step's capture (a plan's upload "
                                    f"cannot be captured; StepGraphs begins every batch it was given)")
        if self.paged and (token_locs is None or tuple(token_locs.shape) != (len(reqs),)):
            got = None if token_locs is None else list(token_locs.shape)
            raise ValueError(f"token_locs: expected [{len(reqs)}] pool locations of the new tokens, got {got}")
        p = self._plans[request_ids] = self._build_plan(request_ids, reqs, token_locs)
        return p

    def _map_token_pages(self, p: StepPlan, token_locs: torch.Tensor) -> None:
        """page_pool mode: the table maps each new token's block to its page (device ops: the server chose
        the pages on the device); decoding in place, the token is written to that page's run."""
        locs = token_locs.to(self.device, torch.long)
        if p.perm is not None:
            locs = locs[p.perm]
        pages = torch.div(locs, self.config.block_size, rounding_mode="floor")
        self._host_table[p.rows, p.tail_blocks] = pages.int()
        if self.pool_backed:
            p.token_slots.copy_(pages[:, None] * self.shape.num_kv_heads + self._heads)

    def _build_plan(self, request_ids, reqs, token_locs: torch.Tensor | None, pad_to: int | None = None,
                    static: torch.Tensor | None = None) -> StepPlan:
        """The step plan of `reqs` (raises ValueError, changing nothing, when one is full). pad_to
        (PaddedSteps, pool-backed): a fixed plan of pad_to rows at the address `static`, the requests'
        rows 0..n-1 and then unused rows, whose tokens go to the padding page."""
        for r in reqs:
            if r.seq_len + 1 > self.max_seq_len:
                raise ValueError(f"request {r.request_id!r}: {r.seq_len + 1} tokens exceed "
                                 f"max_seq_len={self.max_seq_len}")
        if self._ordered is not None:
            self._refuse_foreign_capture(f"batch {request_ids}")
            torch.cuda.current_stream().wait_event(self._ordered)
        bs, H = self.config.block_size, self.shape.num_kv_heads
        tails: list[int | None] = [None] * len(reqs)
        updates: list[tuple[int, int, int]] = []
        if not self.gpu_only:
            if not self.paged:  # NOTE: paged, the server allocated the page and writes the token to it
                opening = [r for r in reqs if r.seq_len // bs == len(r.host_blocks)]
                ids = self.host.allocate(len(opening), "a decode step") if opening else []
                for r, b in zip(opening, ids):
                    r.host_blocks.append(b)
                    updates.append((r.row, r.seq_len // bs, b))
                tails = [r.host_blocks[r.seq_len // bs] for r in reqs]
            token_slot = lambda row, h, blk: self.slots.tail_slot_id(row, h)  # noqa: E731
            tail_slot = self.slots.tail_slot_id
        else:
            token_slot, tail_slot = self.slots.slot_id, None
        base = lambda row, h: self.slots.slot_id(row, h, 0)  # noqa: E731
        n, fixed = len(reqs), pad_to is not None
        pad = pad_to - n if fixed else 0
        rows = [r.row for r in reqs] + list(range(n, n + pad))
        p = build_step_plan(request_ids, rows, [r.seq_len for r in reqs] + [0] * pad, tails + [None] * pad,
                            token_slot, tail_slot, base, H, self.config, self.device,
                            num_blocks=self.max_blocks if fixed or self._decoder.graphs is not None else None,
                            static=static if fixed else self._decoder.static_plan_buffer(rows), real=n, fixed=fixed)
        if updates:
            t = torch.tensor(updates, dtype=torch.long).T.contiguous()
            if self.device.type == "cuda":
                t = t.pin_memory().to(self.device, non_blocking=True)
            self._host_table[t[0], t[1]] = t[2].int()
        if self.gpu_only:
            for r in reqs:
                self.slots.set_blocks(r.row, self.config.num_blocks(r.seq_len + 1))
        if self.paged:
            if pad:
                token_locs = torch.cat((token_locs.to(self.device, torch.long),
                                        torch.full((pad,), PADDING_PAGE * bs, dtype=torch.long, device=self.device)))
            self._map_token_pages(p, token_locs)
        if self._ordered is not None:  # NOTE: after every upload and table write of the plan
            uploaded = torch.cuda.Event()
            uploaded.record()
            p.streams = PlanStreams(torch.cuda.current_stream(), uploaded)
        return p

    def host_runs(self, p: StepPlan, blocks: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, K] host run ids of (row, head, block) (garbage where block < 0: masked by callers)."""
        table = self._host_table[p.row_range[0] : p.row_range[1]] if p.row_range else self._host_table[p.rows]
        return host_run_ids(table, blocks)

    @property
    def host_table(self) -> torch.Tensor:
        """[rows, max_blocks] int32 host block (offload) or pool page (page_pool) of each (request row,
        logical block), -1 unmapped; None in gpu_only mode without a page pool."""
        return self._host_table

    def _apply_knobs(self, new: OffloadKnobs) -> None:
        if not self.gpu_only:
            if new.gpu_slots != self.slots.active:
                self.transfer.quiesce()
                self.slots.set_active(new.gpu_slots)
            self.transfer.set_mode(new.transfer_mode)
            self.host.set_limit_bytes(new.host_capacity_bytes)
        self._victims = make_victim_policy(new.victim_policy)
        if (new.gpu_slots, new.victim_policy) != (self._knobs.gpu_slots, self._knobs.victim_policy):
            self._drop_graphs()
        self._knobs = new

    def _blocks_of(self, r: _Request) -> int:
        """Host blocks a request spans: paged, its prompt's pages plus one per block opened since (the
        server's pages; the runtime never learns their ids on the host)."""
        return self.config.num_blocks(r.seq_len) if self.paged else len(r.host_blocks)

    def _publish(self) -> None:
        with self._lock:
            reqs = [self._requests[rid] for rid in self._row_owner]
            running = tuple(RunningRequest(r.request_id, r.row, r.seq_len, self._blocks_of(r)) for r in reqs)
            opened = sum(self._blocks_of(r) - len(r.host_blocks) for r in reqs)  # NOTE: decode pages are private
        h = self.host
        used = h.used_blocks + opened if h else 0
        info = BoundaryInfo(
            steps=self._step, running=running,
            host_blocks_used=used, host_blocks_total=h.num_blocks if h else 0,
            host_bytes_used=used * h.block_bytes if h else 0,
            host_capacity_bytes=h.capacity_bytes if h else 0,
            gpu_slot_capacity=self.max_requests * self.shape.num_layers * self.shape.num_kv_heads
            * (self.max_blocks if self.gpu_only else self.slots.active + 1),
            device=str(self.device), mode="gpu_only" if self.gpu_only else "offload",
        )
        self.counters.publish(self.slots.resident_per_row(), info)
