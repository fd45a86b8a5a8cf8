"""NosaAttnBackend: SGLang's attention backend `nosa` — exact NOSA prefill, decode through NosaRuntime.

Data flow per layer (the model passes each token's eviction bias as `nosa_bias`):
* every new token's k/v/c go into SGLang's KV pool, a NosaKVPool (NOSA's run layout, `c` beside each
  token): the pool stays the complete record that the radix cache shares, chunked prefill extends and
  a retracted request is rebuilt from;
* extend (prefill, a chunk, or the rest of a prompt after a prefix hit): each request's new tokens
  attend their own NOSA selection over the whole sequence read from the pool (`q_start` = prefix);
* decode: `RuntimeRequests.sync` has made the runtime hold exactly the batch, then
  `NosaRuntime.decode` does select -> residency diff -> fetch -> sparse attention, and the last layer
  closes the step (`step_boundary`, where knob changes from the control API take effect).
  Fully on the GPU (`--nosa-offload off`) the runtime decodes from the pool's pages in place and writes
  the decode token there itself. Offloaded, the pool lives in pinned host memory and is the runtime's
  host store (SGLang's allocator hands out its blocks, SGLang's KV budget is host memory): the token
  goes to its host page, and the runtime caches the blocks it selects in GPU slots.
"""

from __future__ import annotations

import logging

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph import eager_on_graph

from nosa_sglang.config import NosaConfig
from nosa_sglang.extend_batches import GROUPED_NEW_TOKENS, ExtendGroup, plan_groups
from nosa_sglang.kernels.page_tokens import runs_to_tokens
from nosa_sglang.kernels.prefill_selection import select_blocks_prefill, select_blocks_prefill_batched
from nosa_sglang.kernels.sparse_prefill import sparse_prefill_attention, sparse_prefill_batched
from nosa_sglang.kv_pool import NosaKVPool
from nosa_sglang.request_sync import RuntimeRequests
from nosa_sglang.runtime.knobs import OffloadKnobs
from nosa_sglang.runtime.nosa_runtime import NosaRuntime
from nosa_sglang.runtime.padded_steps import PaddedSteps
from nosa_sglang.runtime.types import ModelShape
from nosa_sglang.server_flags import NosaFlagError, NosaServerFlags

logger = logging.getLogger(__name__)
GiB = 1 << 30


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class NosaAttnBackend(AttentionBackend):
    def __init__(self, model_runner, flags: NosaServerFlags) -> None:
        super().__init__()
        mc = model_runner.model_config
        self.nosa = NosaConfig.from_hf_config(mc.hf_config)
        page = model_runner.server_args.page_size
        if page != self.nosa.block_size:
            raise NosaFlagError(f"--page-size={page}: must equal the model's NOSA block size {self.nosa.block_size}")
        self.kv_pool = model_runner.token_to_kv_pool
        if not isinstance(self.kv_pool, NosaKVPool):
            raise NosaFlagError(f"the KV pool is a {type(self.kv_pool).__name__}, not a NosaKVPool: start the server "
                                "with `python -m nosa_sglang.launch_server --enable-nosa ...` (its plugin builds it)")
        if self.kv_pool.pages.host != flags.offload:
            raise NosaFlagError(f"--nosa-offload={'on' if flags.offload else 'off'}: the KV pool was built "
                                f"{'in host' if self.kv_pool.pages.host else 'in GPU'} memory")
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        tp = model_runner.ps.tp_size
        self.shape = ModelShape(mc.num_hidden_layers, mc.get_num_attention_heads(tp), mc.get_num_kv_heads(tp),
                                mc.head_dim, model_runner.dtype)
        device = torch.device(model_runner.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", model_runner.gpu_id)
        max_requests = model_runner.req_to_token_pool.size
        self._allocate_gpu_state(flags, device, max_requests, mc.context_len)
        self.requests = RuntimeRequests(self.runtime, self.kv_pool, self.req_to_token)
        self.flags = flags
        args = model_runner.server_args
        self.metrics = None
        if getattr(args, "enable_metrics", False) and model_runner.ps.tp_rank == 0:
            from nosa_sglang.metrics import NosaMetrics

            self.metrics = NosaMetrics({"model_name": str(args.served_model_name)})
        self._decode_ids: tuple[str, ...] = ()
        self._token_locs = None  # the decode batch's out_cache_loc (its real rows)
        self._extends: list[tuple] = []  # (first row, prefix, new tokens, pages or None) per request alone
        self._extend_groups: list[ExtendGroup] = []  # the short extends after a cached prefix, grouped
        self._layers: dict[int, object] = {}  # layer_id -> RadixAttention (head counts, for decode_break)
        self._capturing = False  # SGLang is capturing its decode graphs on a dummy batch
        self.pending_rids: list[str] | None = None  # a graph replay's rids (model_graphs.stash_decode_rids)
        # NOTE: a graph break under SGLang's breakable decode graphs; a plain call otherwise
        self.decode_break = eager_on_graph(True)(self._decode_rows)
        #: SGLang's full decode graphs (--nosa-model-graphs full): the runtime's layers inside them
        self.padded = PaddedSteps(self.runtime) if flags.model_graphs == "full" else None
        kv = self.kv_pool.pages
        logger.info("NOSA backend: %s, offload %s, %d request rows, KV pool %.2f GiB in %s memory, NOSA GPU state "
                    "%.2f GiB", self.shape, "on" if flags.offload else "off", max_requests,
                    kv.kv_bytes / GiB, "host" if kv.host else "GPU", self.gpu_bytes / GiB)

    def _allocate_gpu_state(self, flags: NosaServerFlags, device: torch.device, max_requests: int,
                            context_len: int) -> None:
        """The runtime, after SGLang sized its KV pool: running out of memory here is a start-up error that
        names the flags sizing it."""
        slots = flags.slots or self.nosa.topk_blocks
        knobs = OffloadKnobs(gpu_slots=slots, transfer_mode=flags.transfer_mode, prefetch=flags.prefetch,
                             victim_policy=flags.victim_policy)
        before = _allocated(device)
        try:
            self.runtime = NosaRuntime(
                self.shape, self.nosa, knobs, device=device, max_requests=max_requests,
                max_seq_len=context_len + 1, max_gpu_slots=flags.max_slots or slots,
                gpu_only=not flags.offload, page_pool=self.kv_pool.pages,
                ck_dtype=torch.float32 if flags.ck_dtype == "float32" else self.shape.dtype,
                cuda_graphs=flags.graphs and device.type == "cuda",
            )
        except torch.OutOfMemoryError as e:
            raise NosaFlagError(
                f"the NOSA GPU state ({max_requests} request rows x {flags.max_slots or slots} slots, context "
                f"{context_len}) does not fit next to the KV pool: lower --max-running-requests, --nosa-max-slots, "
                "--context-length or --mem-fraction-static, or pass --nosa-ck-dtype model") from e
        self.gpu_bytes = _allocated(device) - before

    # -- metadata ----------------------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch) -> None:
        mode = forward_batch.forward_mode
        self._capturing = False
        if self.padded is not None:
            self.padded.plan = None  # NOTE: an eager forward; a capture's plan is no step (nothing to close)
        if mode.is_decode():
            self._sync_decode(list(forward_batch.rids), forward_batch)
        elif mode.is_extend() and not mode.is_idle():
            self._plan_extends(forward_batch)

    def _plan_extends(self, forward_batch) -> None:
        """Each extended sequence's pages once per forward, not once per layer; the extends of a few tokens
        after a cached prefix in groups (extend_batches.py), the others alone."""
        rows = forward_batch.req_pool_indices.tolist()
        alone, short, start = [], [], 0
        for row, prefix, n in zip(rows, forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu):
            pages = self.kv_pool.sequence_pages(self.req_to_token[row, :prefix + n]) if prefix else None
            (short if prefix and n <= GROUPED_NEW_TOKENS else alone).append((start, prefix, n, pages))
            start += n
        self._extends = alone
        self._extend_groups = plan_groups(short, self.nosa, self.shape.num_kv_heads, self.kv_pool.pages.page_k_bytes,
                                          self.runtime.device)

    def _sync_decode(self, rids: list[str], forward_batch) -> None:
        """The runtime holds exactly the batch's requests: its first len(rids) rows (a graph replay's view
        is padded past them)."""
        n = len(rids)
        self._decode_ids = self.requests.sync(rids, forward_batch.req_pool_indices[:n],
                                              forward_batch.seq_lens_cpu[:n].tolist())
        self._token_locs = forward_batch.out_cache_loc[:n]

    def on_idle(self, running_rids: set[str]) -> None:
        """Scheduler idle: release requests that are gone and apply queued knobs (no step is open)."""
        self.requests.end_all_but(running_rids)
        self._close_step()

    def _close_step(self) -> None:
        """The step boundary (queued knobs take effect, counters are published), then the gauges."""
        self.runtime.step_boundary()
        if self.metrics is not None:
            self.metrics.update(self.runtime)

    # -- forward -----------------------------------------------------------------------------------------
    def _store(self, layer, forward_batch, k, v, c, save_kv_cache: bool) -> None:
        """Every new token into the pool with its bias: the extend then reads whole sequences there."""
        if c is None or not save_kv_cache:
            raise RuntimeError(f"layer {layer.layer_id}: the NOSA backend stores each new token with the model's "
                               "eviction bias (nosa_bias, save_kv_cache); serve a NosaLlamaForCausalLM / "
                               "SparseLlamaForCausalLM checkpoint")
        hkv, d = layer.tp_k_head_num, layer.head_dim
        self.kv_pool.store(layer.layer_id, forward_batch.out_cache_loc, k.view(-1, hkv, d), v.view(-1, hkv, d), c)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, nosa_bias=None, **kwargs):
        self._store(layer, forward_batch, k, v, nosa_bias, save_kv_cache)
        hq, hkv, d, lid = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim, layer.layer_id
        q3, k3, v3 = q.view(-1, hq, d), k.view(-1, hkv, d), v.view(-1, hkv, d)
        c = nosa_bias.float()  # NOTE: what the pool holds (the model rounded c to its dtype)
        out = torch.empty_like(q3)
        impl, host = self.runtime.impl, self.kv_pool.pages.host
        for group in self._extend_groups:
            self._extend_group(group, q3, layer, out)
        for start, prefix, n, pages in self._extends:
            new = slice(start, start + n)
            qq = q3[new]
            if prefix:  # NOTE: the whole sequence from the pool, which holds the new tokens since _store (PCIe
                # when it lives on the host: K and c, and V only where the new tokens select)
                kk, vv, cc = self.kv_pool.read_pages(lid, pages, prefix + n, with_v=not host)
            else:
                kk, vv, cc = k3[new].to(self.kv_pool.dtype), v3[new].to(self.kv_pool.dtype), c[new]  # as stored
            sel = select_blocks_prefill(qq, kk, cc, self.nosa, impl=impl, q_start=prefix)
            if vv is None:
                vv = self._selected_v(lid, pages, prefix + n, sel)
            out[new] = sparse_prefill_attention(qq, kk, vv, cc, sel, self.nosa.block_size, sm_scale=layer.scaling,
                                                impl=impl, q_start=prefix)
        return out.view(-1, hq * d)

    def _extend_group(self, group: ExtendGroup, q3: torch.Tensor, layer, out: torch.Tensor) -> None:
        """A group's sequences read from the pool as one (it holds the new tokens since _store), each
        kernel once for all of them; offloaded, V only of the blocks some new token selects."""
        lid, impl, n_tokens = layer.layer_id, self.runtime.impl, group.n_tokens
        kk, vv, cc = self.kv_pool.read_pages(lid, group.pages, n_tokens, with_v=not self.kv_pool.pages.host)
        qq = q3[group.rows]
        sel = select_blocks_prefill_batched(qq, kk, cc, group.seqs, self.nosa, impl=impl)
        if vv is None:  # NOTE: the selected blocks counted in `pages`, not in each sequence
            vv = self._selected_v(lid, group.pages, n_tokens, torch.where(sel >= 0, sel + group.row_blocks, -1))
        out[group.rows] = sparse_prefill_batched(qq, kk, vv, cc, sel, group.seqs, self.nosa.block_size,
                                                 sm_scale=layer.scaling, impl=impl)

    def _selected_v(self, layer_id: int, pages: torch.Tensor, n_tokens: int, sel: torch.Tensor) -> torch.Tensor:
        """[n_tokens, Hkv, d] V of the sequence with only the (block, head) runs in `sel` (the new tokens'
        selections, [n, Hkv, topk]) read from the host pages; the rest stays zero, which the sparse
        attention never reads (a token attends only its selected blocks). Saves the PCIe pass over every
        V a cached prefix holds when a few tokens extend it. No sync: the run list has a fixed size,
        the unselected runs are skipped ids."""
        bs, hkv = self.nosa.block_size, self.shape.num_kv_heads
        nb = -(-n_tokens // bs)
        picked = torch.zeros((hkv, nb + 1), dtype=torch.bool, device=sel.device)
        blocks = torch.where((sel >= 0) & (sel < nb), sel, nb).long().transpose(0, 1).reshape(hkv, -1)
        picked.scatter_(1, blocks, True)
        pool = self.kv_pool.pages
        runs = torch.where(picked[:, :nb].T, pool.runs_of(pages[:nb]), -1)
        v = pool.read_runs(layer_id - self.kv_pool.start_layer, runs.flatten(), with_k=False)[1]
        return runs_to_tokens(v, n_tokens, hkv, bs)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, nosa_bias=None, **kwargs):
        if nosa_bias is None or not save_kv_cache:
            raise RuntimeError(f"layer {layer.layer_id}: decode needs the model's eviction bias (nosa_bias) and "
                               "the KV write")
        self._layers[layer.layer_id] = layer
        if self.padded is not None and self.padded.plan is not None:  # inside SGLang's full decode graph
            hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
            o = self.padded.decode(layer.layer_id, q.view(-1, hq, d), k.view(-1, hkv, d), v.view(-1, hkv, d),
                                   nosa_bias.float())
            return o.reshape(-1, hq * d)
        return self.decode_break(q, k, v, nosa_bias, layer.layer_id)

    def _decode_rows(self, q, k, v, c, layer_id: int):
        """One layer's decode of the batch's real rows (the first len(rids)); padded rows answer zeros.
        Under SGLang's breakable graphs this runs eagerly at every replay (`decode_break`), and on the
        capture's dummy batch it touches no runtime state."""
        layer = self._layers[layer_id]
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
        if self._capturing:
            return q.new_zeros((q.shape[0], hq * d))
        B, locs = len(self._decode_ids), self._token_locs
        q3, k3, v3, c2 = q.view(-1, hq, d)[:B], k.view(-1, hkv, d)[:B], v.view(-1, hkv, d)[:B], c[:B]
        if not self.runtime.pool_backed:  # NOTE: decoding from the pages in place, the runtime writes the token
            self.kv_pool.store(layer_id, locs, k3, v3, c2)
        o = self.runtime.decode(layer_id, self._decode_ids, q3, k3, v3, c2.float(), token_locs=locs)
        if layer_id == self.shape.num_layers - 1:
            self._close_step()
        o = o.reshape(B, hq * d)
        if B == q.shape[0]:
            return o
        out = q.new_zeros((q.shape[0], hq * d))
        out[:B] = o
        return out

    # -- SGLang's decode graphs (--nosa-model-graphs full | breakable; model_graphs.py) -----------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Nothing to preallocate: the runtime's state is sized at start-up."""

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        """Before a capture or a replay, on the padded batch view. Breakable graphs: a capture's dummy batch
        decodes zeros; a replay syncs the runtime to the real rows, whose rids the runner's load_batch hook
        stashed. Full graphs: the same sync, then the step's plan for the padded size is uploaded where
        the captured layers read it (a capture's plan has no request: it touches no runtime state)."""
        self._capturing = in_capture and self.padded is None
        batch = forward_batch.req_pool_indices.shape[0]
        if in_capture:
            if self.padded is not None:
                self.padded.begin((), batch, forward_batch.out_cache_loc[:0])
            return
        rids, self.pending_rids = self.pending_rids, None
        if rids is None:
            raise RuntimeError("a decode graph replay without the batch's request ids: the NOSA plugin's hook on "
                               "DecodeCudaGraphRunner.load_batch did not run (start through nosa_sglang.launch_server)")
        self._sync_decode(rids, forward_batch)
        if self.padded is not None:
            self.padded.begin(self._decode_ids, batch, self._token_locs)

    def end_graph_step(self) -> None:
        """After a full decode graph's replay (`model_graphs.end_full_graph_step`): the step's host side."""
        if self.padded is not None and self.padded.plan is not None:
            self.padded.end()
            if self.metrics is not None:
                self.metrics.update(self.runtime)


def create_nosa_backend(model_runner) -> NosaAttnBackend:
    """The attention_registry factory (registered by the plugin when NOSA is enabled)."""
    flags = NosaServerFlags.from_env()
    if flags is None:
        raise NosaFlagError("--attention-backend nosa: start the server with "
                            "`python -m nosa_sglang.launch_server --enable-nosa ...`")
    backend = NosaAttnBackend(model_runner, flags)
    from nosa_sglang.scheduler_control import maybe_start_control_server

    maybe_start_control_server(backend, model_runner)
    return backend
