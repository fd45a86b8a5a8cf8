"""The `nosa` attention backend inside SGLang's real KV pool and request pool, against the reference.

A small simulated scheduler drives NosaAttnBackend the way SGLang's ModelRunner does: it allocates
pages of 64-token-like blocks (here SMALL's 16) from the NosaKVPool SGLang builds, writes req_to_token
rows in SGLang's ReqToTokenPool, prefills in chunks and with a radix-cache prefix hit (shared pages),
and decodes a changing batch (a request finishes, one joins). Every layer's output of every forward is
checked against the reference NOSA attention over the full sequence. Offloading (and where a request
decodes) must not change a single value.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernel_checks import SMALL

from nosa_sglang.reference import nosa_decode_attention, nosa_prefill_attention
from nosa_sglang.server_flags import NosaFlagError, NosaServerFlags

pytest.importorskip("sglang.srt.mem_cache.memory_pool")
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from nosa_sglang.backend import NosaAttnBackend  # noqa: E402
from nosa_sglang.kv_pool import NosaKVPool  # noqa: E402

L, HQ, HKV, D = 2, 4, 2, 16
PAGE = SMALL.block_size
POOL_TOKENS = 64 * PAGE


def make_runner(pool_tokens: int = POOL_TOKENS, requests: int = 4, pool_class=NosaKVPool, offload: bool = True,
                dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The pool as SGLang's plugin hook builds it: in host memory when offloading."""
    extra = {"host": offload} if pool_class is NosaKVPool else {}
    kv = pool_class(pool_tokens, PAGE, dtype, HKV, D, L, device, False, **extra)
    reqs = ReqToTokenPool(requests, 1024, device, False)
    hf = SimpleNamespace(nosa=SMALL.to_dict())
    mc = SimpleNamespace(hf_config=hf, num_hidden_layers=L, head_dim=D, context_len=1024,
                         get_num_attention_heads=lambda tp: HQ, get_num_kv_heads=lambda tp: HKV)
    return SimpleNamespace(model_config=mc, server_args=SimpleNamespace(page_size=PAGE), token_to_kv_pool=kv,
                           req_to_token_pool=reqs, ps=SimpleNamespace(tp_size=1, tp_rank=0), dtype=dtype,
                           device=device, gpu_id=0)


class Seq:
    """One request's tokens as the reference sees them: every layer's k, v, c so far."""

    def __init__(self, rid: str, row: int) -> None:
        self.rid, self.row, self.pages = rid, row, []
        self.k = [torch.empty(0, HKV, D) for _ in range(L)]
        self.v = [torch.empty(0, HKV, D) for _ in range(L)]
        self.c = [torch.empty(0, HKV) for _ in range(L)]

    @property
    def n(self) -> int:
        return self.k[0].shape[0]


class Scheduler:
    """Page allocation and forward batches as SGLang makes them (ForwardMode, rids, lens, locations), on the
    runner's device. `outputs` collects every layer's output (on the CPU); `check=False` skips the
    reference (CUDA runs compare two modes bit for bit instead: fp32 kernels may break fp64 near ties)."""

    def __init__(self, backend, runner, gen, check: bool = True) -> None:
        self.backend, self.runner, self.gen, self.check = backend, runner, gen, check
        self.device = torch.device(runner.device)
        self.outputs: list[torch.Tensor] = []
        self.free_pages = list(range(1, POOL_TOKENS // PAGE))  # page 0 is SGLang's padding page
        self.layers = [RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=i) for i in range(L)]
        self.next_row = 1

    def new(self, rid: str, shared_from: "Seq | None" = None, shared_pages: int = 0) -> Seq:
        s = Seq(rid, self.next_row)
        self.next_row += 1
        if shared_from is not None:  # a radix-cache hit: the same pages, the same K/V/c
            s.pages = shared_from.pages[:shared_pages]
            n = shared_pages * PAGE
            s.k = [t[:n].clone() for t in shared_from.k]
            s.v = [t[:n].clone() for t in shared_from.v]
            s.c = [t[:n].clone() for t in shared_from.c]
            rows = self.runner.req_to_token_pool.req_to_token
            rows[s.row, :n] = rows[shared_from.row, :n]
        return s

    def serve(self, rid: str, prompt_tokens: int, decode_steps: int) -> Seq:
        """A new request: its prompt in one extend, then decode steps alone in the batch."""
        s = self.new(rid)
        self.forward(ForwardMode.EXTEND, [(s, prompt_tokens)])
        for _ in range(decode_steps):
            self.forward(ForwardMode.DECODE, [(s, 1)])
        return s

    def _locs(self, s: Seq, n_new: int) -> torch.Tensor:
        while len(s.pages) * PAGE < s.n + n_new:
            s.pages.append(self.free_pages.pop(0))
        pos = torch.arange(s.n, s.n + n_new)
        locs = torch.tensor(s.pages)[pos // PAGE] * PAGE + pos % PAGE
        self.runner.req_to_token_pool.req_to_token[s.row, s.n : s.n + n_new] = locs.int().to(self.device)
        return locs

    def _rand(self, *shape, scale=1.0):
        return torch.randn(*shape, generator=self.gen) * scale

    def forward(self, mode: ForwardMode, batch: list[tuple[Seq, int]], pad: int = 0) -> None:
        """One forward of `batch` [(seq, new tokens)], every layer checked against the reference.
        `pad` (decode): as a replay of SGLang's decode graphs does it: the rids handed over by the runner
        hook, a metadata view padded with `pad` dummy rows, inputs with `pad` garbage rows (breakable
        graphs: their outputs must be zeros; full graphs: the runner's execute hook closes the step)."""
        locs = torch.cat([self._locs(s, n) for s, n in batch])
        dev = self.device
        fb = SimpleNamespace(
            forward_mode=mode, rids=[s.rid for s, _ in batch],
            req_pool_indices=torch.tensor([s.row for s, _ in batch], device=dev),
            seq_lens_cpu=torch.tensor([s.n + n for s, n in batch]), extend_prefix_lens_cpu=[s.n for s, _ in batch],
            extend_seq_lens_cpu=[n for _, n in batch], out_cache_loc=locs.to(dev))
        if pad:
            assert mode.is_decode()
            self.backend.pending_rids = fb.rids
            fb = SimpleNamespace(forward_mode=mode, out_cache_loc=fb.out_cache_loc, num_padding=pad,
                                 req_pool_indices=torch.cat([fb.req_pool_indices, fb.req_pool_indices.new_zeros(pad)]),
                                 seq_lens_cpu=torch.cat([fb.seq_lens_cpu, torch.ones(pad, dtype=torch.long)]))
            self.backend.init_forward_metadata_out_graph(fb)
        else:
            self.backend.init_forward_metadata(fb)
        total = sum(n for _, n in batch)
        for layer in self.layers:
            i = layer.layer_id
            q, k, v = self._rand(total + pad, HQ, D), self._rand(total + pad, HKV, D), self._rand(total + pad, HKV, D)
            c = self._rand(total + pad, HKV, scale=0.5)
            fwd = self.backend.forward_decode if mode.is_decode() else self.backend.forward_extend
            out = fwd(*(x.to(dev) for x in (q.reshape(-1, HQ * D), k, v)), layer, fb, nosa_bias=c.to(dev))
            out = out.view(total + pad, HQ, D).cpu()
            assert self.backend.padded is not None or not out[total:].any(), "padded rows must answer zeros"
            out = out[:total]
            self.outputs.append(out)
            start = 0
            for s, n in batch:
                s.k[i], s.v[i], s.c[i] = (torch.cat([t, x[start : start + n]]) for t, x in
                                          ((s.k[i], k), (s.v[i], v), (s.c[i], c)))
                if self.check:
                    ref = self._reference(s, i, q[start : start + n], n)
                    torch.testing.assert_close(out[start : start + n], ref, rtol=1e-4, atol=1e-5)
                start += n
        if pad:
            self.backend.end_graph_step()

    @staticmethod
    def _reference(s: Seq, layer: int, q: torch.Tensor, n: int) -> torch.Tensor:
        k, v, c = s.k[layer], s.v[layer], s.c[layer]
        if n == 1:
            return nosa_decode_attention(q, k[None], v[None], c[None], torch.tensor([s.n]), SMALL).float()
        q_full = torch.cat([torch.zeros(s.n - n, HQ, D), q])  # earlier rows are not compared
        return nosa_prefill_attention(q_full, k, v, c, SMALL)[s.n - n :].float()


def scenario(gen, offload: bool, device: str = "cpu", check: bool = True) -> Scheduler:
    """Chunked prefill, a radix-cache hit, decode with a changing batch; the pool checked as the complete
    record; everything released at idle. Returns the scheduler (its `outputs`)."""
    runner = make_runner(offload=offload, device=device, requests=6)
    backend = NosaAttnBackend(runner, NosaServerFlags(offload=offload, slots=SMALL.topk_blocks, max_slots=12))
    rt = backend.runtime
    assert rt.paged and rt.pool_backed == (not offload) and backend.kv_pool.pages.host == offload
    sched = Scheduler(backend, runner, gen, check=check)
    a = sched.new("a")
    sched.forward(ForwardMode.EXTEND, [(a, 96)])  # first chunk
    sched.forward(ForwardMode.EXTEND, [(a, 61)])  # last chunk: a prefix of 96 tokens
    b = sched.new("b", shared_from=a, shared_pages=4)
    sched.forward(ForwardMode.EXTEND, [(b, 70)])  # radix hit on a's first 4 pages
    for _ in range(20):
        sched.forward(ForwardMode.DECODE, [(a, 1), (b, 1)])
    assert set(rt.running_requests) == {"a", "b"}
    # the pages are the runtime's blocks: a's and b's first 4 are the same pages
    assert torch.equal(rt.host_table[rt._req("a").row, :4], rt.host_table[rt._req("b").row, :4])
    if offload:  # the host store is the pool: the runtime holds references to the prompts' distinct pages
        assert rt.host.used_blocks == SMALL.num_blocks(157) + SMALL.num_blocks(134) - 4
        assert rt.snapshot().totals.misses > 0 and rt.snapshot().totals.bytes_d2h == 0
    d, e = sched.new("d", shared_from=a, shared_pages=6), sched.new("e", shared_from=b, shared_pages=5)
    sched.forward(ForwardMode.EXTEND, [(d, 5), (e, 40)])  # two radix hits extended together: one group
    c = sched.new("c")
    sched.forward(ForwardMode.EXTEND, [(c, 40)])
    for _ in range(20):  # a has finished: absent from the batch, it ends; c joins
        sched.forward(ForwardMode.DECODE, [(b, 1), (c, 1)])
    assert set(rt.running_requests) == {"b", "c"}
    rows = runner.req_to_token_pool.req_to_token
    for s in (a, b, c):  # the pool is the complete record: every token, prompt and decoded, on its page
        for layer in range(L):
            got = backend.kv_pool.read_pages(layer, backend.kv_pool.sequence_pages(rows[s.row, : s.n]), s.n)
            assert all(torch.equal(x.cpu(), y) for x, y in zip(got, (s.k[layer], s.v[layer], s.c[layer])))
    backend.on_idle(set())  # the scheduler went idle: everything is released
    assert rt.running_requests == ()
    if offload:
        assert rt.host.used_blocks == 0
    return sched


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "gpu_only"])
def test_backend_equals_reference_through_chunks_prefix_hits_and_batch_changes(gen, offload):
    scenario(gen, offload)


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "gpu_only"])
def test_grouped_extends_through_the_triton_kernels_equal_the_reference(gen, offload):
    """Extends of a few tokens after radix-cache hits, grouped (one read of their pages, each kernel once
    per layer): through the Triton kernels (the interpreter here), every row equals the reference."""
    runner = make_runner(offload=offload, requests=6)
    backend = NosaAttnBackend(runner, NosaServerFlags(offload=offload, slots=SMALL.topk_blocks))
    sched = Scheduler(backend, runner, gen)
    a, b = sched.new("a"), sched.new("b")
    sched.forward(ForwardMode.EXTEND, [(a, 9 * PAGE + 3), (b, 11 * PAGE)])
    x, y, z = (sched.new(r, shared_from=s, shared_pages=n) for r, s, n in (("x", a, 9), ("y", b, 11), ("z", a, 4)))
    backend.runtime.impl = "triton"
    sched.forward(ForwardMode.EXTEND, [(x, 1), (y, 20), (z, 7)])
    assert len(backend._extend_groups) == 1 and backend._extend_groups[0].seqs == [
        (1, 0, 9 * PAGE + 1), (20, 10 * PAGE, 11 * PAGE + 20), (7, 23 * PAGE, 4 * PAGE + 7)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_cuda_backend_offloaded_equals_fully_on_gpu_bit_for_bit():
    """On CUDA: the host pool (pinned pages, zero-copy token store and gathers, fetches from the pages)
    against decoding from the GPU pool in place, with the runtime's graph segments: the same outputs."""
    runs = [scenario(torch.Generator().manual_seed(5), offload, device="cuda", check=False).outputs
            for offload in (True, False)]
    assert len(runs[0]) == len(runs[1]) and all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "gpu_only"])
def test_breakable_graph_capture_touches_nothing_and_padded_replays_equal_the_reference(gen, offload):
    """SGLang's breakable decode graphs (--nosa-model-graphs): the capture's dummy batch leaves the runtime
    as it was and answers zeros; replays see padded views and padded inputs, decode the real rows
    exactly, answer zeros in the padded ones, and need the rids the runner hook hands over."""
    runner = make_runner(offload=offload)
    backend = NosaAttnBackend(runner, NosaServerFlags(offload=offload, slots=SMALL.topk_blocks, max_slots=12,
                                                      model_graphs="breakable"))
    sched = Scheduler(backend, runner, gen)
    a, b = sched.new("a"), sched.new("b")
    sched.forward(ForwardMode.EXTEND, [(a, 150), (b, 90)])
    dummy = SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices=torch.zeros(4, dtype=torch.long),
                            seq_lens_cpu=torch.ones(4, dtype=torch.long), out_cache_loc=torch.zeros(4, dtype=torch.long))
    backend.init_forward_metadata_out_graph(dummy, in_capture=True)
    for layer in sched.layers:
        out = backend.forward_decode(torch.randn(4, HQ * D, generator=gen), torch.randn(4, HKV, D, generator=gen),
                                     torch.randn(4, HKV, D, generator=gen), layer, dummy,
                                     nosa_bias=torch.randn(4, HKV, generator=gen))
        assert out.shape == (4, HQ * D) and not out.any()
    assert backend.runtime.running_requests == () and backend.runtime.snapshot().steps == 0
    for step in range(12):
        sched.forward(ForwardMode.DECODE, [(a, 1), (b, 1)], pad=2 if step % 2 else 6)
    sched.forward(ForwardMode.DECODE, [(b, 1)], pad=3)  # a finished: the padded view holds only b
    assert backend.runtime.running_requests == ("b",)
    with pytest.raises(RuntimeError, match="without the batch's request ids"):
        backend.init_forward_metadata_out_graph(dummy)


def test_full_graph_capture_touches_nothing_and_every_replay_fits_the_capture(gen):
    """SGLang's full decode graphs (--nosa-model-graphs full): the capture (two warm-ups and the capture
    itself on a dummy batch) leaves the runtime as it was; replays of padded batches decode the real rows
    exactly, and each replay's plan has the host-side shape and the addresses of its batch size's
    capture (CPU has no graphs: this is what makes one capture fit every step)."""
    from test_runtime_padded_steps import plan_shape

    runner = make_runner(offload=False)
    backend = NosaAttnBackend(runner, NosaServerFlags(offload=False, model_graphs="full"))
    rt, shapes = backend.runtime, {}
    for batch in (2, 4):
        dummy = SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices=torch.zeros(batch, dtype=torch.long),
                                seq_lens_cpu=torch.ones(batch, dtype=torch.long),
                                out_cache_loc=torch.zeros(batch, dtype=torch.long))
        backend.init_forward_metadata_out_graph(dummy, in_capture=True)
        shapes[batch] = plan_shape(backend.padded.plan)
        sched = Scheduler(backend, runner, gen)
        for _ in range(3):
            for layer in sched.layers:
                out = backend.forward_decode(torch.randn(batch, HQ * D, generator=gen),
                                             torch.randn(batch, HKV, D, generator=gen),
                                             torch.randn(batch, HKV, D, generator=gen), layer, dummy,
                                             nosa_bias=torch.randn(batch, HKV, generator=gen))
                assert out.shape == (batch, HQ * D)
    assert rt.running_requests == () and rt.snapshot().steps == 0
    a, b = sched.new("a"), sched.new("b")
    sched.forward(ForwardMode.EXTEND, [(a, 150), (b, 90)])  # an eager forward drops the capture's plan
    assert backend.padded.plan is None
    for step in range(12):
        sched.forward(ForwardMode.DECODE, [(a, 1), (b, 1)] if step % 3 else [(b, 1), (a, 1)], pad=2 * (step % 2))
    sched.forward(ForwardMode.DECODE, [(b, 1)], pad=1)  # a finished: b moves to row 0, padded to 2
    assert rt.running_requests == ("b",) and rt.snapshot().steps == 13 and rt.seq_len("b") == 103
    sched.forward(ForwardMode.DECODE, [(b, 1)])  # a batch larger than any graph: eager, as before
    assert rt.seq_len("b") == 104
    seen = []
    real_begin = backend.padded.begin
    backend.padded.begin = lambda ids, batch, locs: seen.append(plan_shape(real_begin(ids, batch, locs)) == shapes[batch])
    sched.forward(ForwardMode.DECODE, [(b, 1)], pad=3)
    assert seen == [True]


def test_model_graph_flags_pick_sglangs_graph_backend_and_the_hooks():
    from nosa_sglang.server_flags import nosa_server_args

    assert NosaServerFlags(offload=False).model_graphs == "full"
    assert NosaServerFlags().model_graphs == "breakable" == NosaServerFlags(model_graphs="on").model_graphs
    assert nosa_server_args(NosaServerFlags(offload=False))["cuda_graph_backend_decode"] == "full"
    assert nosa_server_args(NosaServerFlags(model_graphs="off"))["cuda_graph_backend_decode"] == "disabled"
    with pytest.raises(NosaFlagError, match="--nosa-model-graphs=full: needs --nosa-offload off"):
        NosaServerFlags(model_graphs="full")
    with pytest.raises(NosaFlagError, match=r"--nosa-model-graphs='yes': allowed values are \['auto', 'full'"):
        NosaServerFlags(model_graphs="yes")


def test_the_execute_hook_closes_a_full_graph_step_and_passes_anything_else_through():
    from nosa_sglang.model_graphs import end_full_graph_step

    closed = []
    backend = NosaAttnBackend(make_runner(offload=False), NosaServerFlags(offload=False))
    backend.end_graph_step = lambda: closed.append(True)
    assert end_full_graph_step("out", SimpleNamespace(attn_backend=backend)) == "out" and closed == [True]
    assert end_full_graph_step("out", SimpleNamespace(attn_backend=object())) == "out" and closed == [True]


def test_the_load_batch_hook_hands_the_real_rids_to_the_nosa_backend():
    from nosa_sglang.model_graphs import stash_decode_rids

    backend = NosaAttnBackend(make_runner(), NosaServerFlags(slots=SMALL.topk_blocks))
    runner = SimpleNamespace(attn_backend=backend)
    seen = []
    out = stash_decode_rids(lambda r, fb, *a, **kw: seen.append((r, fb)) or "loaded", runner,
                            SimpleNamespace(rids=("x", "y")))
    assert out == "loaded" and backend.pending_rids == ["x", "y"] and seen[0][0] is runner
    other = SimpleNamespace(attn_backend=object())  # another backend: untouched, the call passes through
    assert stash_decode_rids(lambda r, fb: "loaded", other, SimpleNamespace(rids=("z",))) == "loaded"


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "gpu_only"])
def test_admission_and_extends_read_only_the_v_they_use(gen, offload, monkeypatch):
    """A request entering decode: its compressed keys come from K alone (the pool's pages hold V), and
    offloaded the warm start reads from the host pages just the runs it installs (the tail and as many
    blocks as there are slots), not the whole prompt. An offloaded extend after a cached prefix reads
    the prefix's V only where its tokens select. Every output still equals the reference."""
    from nosa_sglang.runtime.page_pool import PagePool

    runner = make_runner(offload=offload)
    backend = NosaAttnBackend(runner, NosaServerFlags(offload=offload, slots=SMALL.topk_blocks))
    sched = Scheduler(backend, runner, gen)
    a = sched.new("a")
    sched.forward(ForwardMode.EXTEND, [(a, 20 * PAGE + 5)])  # 21 blocks, the last one partial
    import nosa_sglang.runtime.page_pool as page_pool

    reads, original, by_runs = [], PagePool._read_runs, page_pool.read_page_tokens
    # every read of runs goes through one of them: read_runs and a host pool's read_pages through _read_runs, a
    # device pool's read_pages through read_page_tokens (its layer found by address)
    monkeypatch.setattr(PagePool, "_read_runs", lambda pool, layer, runs, with_k, with_v, skips: reads.append(
        (layer, int((runs >= 0).sum()), with_v)) or original(pool, layer, runs, with_k, with_v, skips))  # runs read

    def spy(k_runs, v_runs, c_runs, pages, n_tokens, num_kv_heads, impl="auto"):
        pool = backend.kv_pool.pages
        layer = [x.data_ptr() for x in pool.kv[0]].index(k_runs.data_ptr())
        reads.append((layer, -(-n_tokens // pool.block_size) * num_kv_heads, v_runs is not None))
        return by_runs(k_runs, v_runs, c_runs, pages, n_tokens, num_kv_heads, impl)

    monkeypatch.setattr(page_pool, "read_page_tokens", spy)
    sched.forward(ForwardMode.DECODE, [(a, 1)])  # admission, then the first step
    k_reads = [(layer, n) for layer, n, with_v in reads if not with_v]
    assert k_reads == [(layer, 21 * HKV) for layer in range(L)]  # every run of K, once per layer
    v_runs = sum(n for _, n, with_v in reads if with_v)
    assert v_runs == (L * (SMALL.topk_blocks + 1) * HKV if offload else 0)  # slots + the tail, per layer
    for _ in range(3):
        sched.forward(ForwardMode.DECODE, [(a, 1)])
    # a radix hit on the 20 full pages, extended by 3 tokens on a 21st page: the whole sequence comes from
    # the pool (it holds the 3 tokens once stored); offloaded, V only where one of them selects (K and c
    # whole: the selection needs them)
    reads.clear()
    b = sched.new("b", shared_from=a, shared_pages=20)
    sched.forward(ForwardMode.EXTEND, [(b, 3)])
    k_runs = [n for _, n, with_v in reads if not with_v]
    v_runs = [n for _, n, with_v in reads if with_v]
    if offload:
        assert k_runs == [21 * HKV] * L and len(v_runs) == L and all(0 < n < 21 * HKV for n in v_runs), reads
    else:
        assert not k_runs and v_runs == [21 * HKV] * L


def test_breakable_graphs_hold_and_replay_a_logits_output(gen):
    """SGLang 0.5.17's breakable backend keeps a captured output in buffers of tensors and tuples only, and
    raised on the LogitsProcessorOutput of a causal LM (the first GPU run): the capture hook hands it the
    output's tensors, the replay hook answers a LogitsProcessorOutput with the replayed buffers' rows."""
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput
    from sglang.srt.model_executor.runner_backend.breakable_cuda_graph_backend import BreakableCudaGraphBackend

    from nosa_sglang.model_graphs import capture_logits_as_tuple, replay_logits_output

    bcg = BreakableCudaGraphBackend.__new__(BreakableCudaGraphBackend)  # its buffer helpers, without a GPU
    bcg._outputs = {}

    def capture_one(backend, key, forward_fn):  # what capture_one does with the output (CUDA parts left out)
        out = forward_fn()
        buffer = backend._alloc_full_buffer(out, 8)
        backend._copy_output_to_buffer(out, buffer, backend._output_rows(out, 8))
        backend._outputs[key] = backend._slice_output(buffer, 8)

    logits, hidden = torch.randn(8, 259, generator=gen), torch.randn(8, 16, generator=gen)
    with pytest.raises(TypeError, match="Unsupported BCG output type"):  # SGLang's backend alone
        capture_one(bcg, "bs8", lambda: LogitsProcessorOutput(next_token_logits=logits))
    capture_logits_as_tuple(capture_one, bcg, "bs8", lambda: LogitsProcessorOutput(next_token_logits=logits,
                                                                                     hidden_states=hidden))
    out = replay_logits_output(lambda backend, key, *a: backend._outputs[key], bcg, "bs8", "static_batch")
    assert isinstance(out, LogitsProcessorOutput) and out.full_logits is None
    assert torch.equal(out.next_token_logits, logits) and torch.equal(out.hidden_states, hidden)
    assert out.next_token_logits.data_ptr() != logits.data_ptr()  # the backend's buffer, not the capture's
    capture_logits_as_tuple(capture_one, bcg, "proxy", lambda: logits)  # other outputs pass through untouched
    assert torch.is_tensor(replay_logits_output(lambda backend, key, *a: backend._outputs[key], bcg, "proxy"))
    with pytest.raises(RuntimeError, match="customized_info"):
        capture_logits_as_tuple(capture_one, bcg, "bs4", lambda: LogitsProcessorOutput(
            next_token_logits=logits, customized_info={"x": [1]}))


def test_a_request_whose_length_changed_is_rebuilt_from_the_pool(gen):
    """A retracted request that was prefilled again comes back with another length: it restarts."""
    runner = make_runner()
    backend = NosaAttnBackend(runner, NosaServerFlags(slots=SMALL.topk_blocks))
    sched = Scheduler(backend, runner, gen)
    a = sched.new("a")
    sched.forward(ForwardMode.EXTEND, [(a, 50)])
    sched.forward(ForwardMode.DECODE, [(a, 1)])
    sched.forward(ForwardMode.EXTEND, [(a, 7)])  # (the re-prefill appends the tokens the retraction dropped)
    begun = backend.requests.begun
    sched.forward(ForwardMode.DECODE, [(a, 1)])
    assert backend.requests.begun == begun + 1 and backend.runtime.seq_len("a") == a.n


def test_backend_refuses_a_page_size_other_than_the_block():
    runner = make_runner()
    runner.server_args.page_size = 64
    with pytest.raises(NosaFlagError, match="--page-size=64"):
        NosaAttnBackend(runner, NosaServerFlags())


def test_backend_needs_the_eviction_bias(gen):
    runner = make_runner()
    backend = NosaAttnBackend(runner, NosaServerFlags(slots=SMALL.topk_blocks))
    fb = SimpleNamespace(forward_mode=ForwardMode.EXTEND, req_pool_indices=torch.tensor([1]),
                         extend_prefix_lens_cpu=[0], extend_seq_lens_cpu=[4], out_cache_loc=torch.arange(16, 20))
    backend.init_forward_metadata(fb)
    layer = RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=0)
    with pytest.raises(RuntimeError, match="nosa_bias"):
        backend.forward_extend(torch.randn(4, HQ * D), torch.randn(4, HKV, D), torch.randn(4, HKV, D), layer, fb)
    with pytest.raises(RuntimeError, match="save_kv_cache"):  # the extend reads its new tokens from the pool
        backend.forward_extend(torch.randn(4, HQ * D), torch.randn(4, HKV, D), torch.randn(4, HKV, D), layer, fb,
                               save_kv_cache=False, nosa_bias=torch.randn(4, HKV))


def test_backend_refuses_sglangs_own_pool_and_a_pool_in_the_wrong_memory():
    with pytest.raises(NosaFlagError, match="MHATokenToKVPool, not a NosaKVPool"):
        NosaAttnBackend(make_runner(pool_class=MHATokenToKVPool), NosaServerFlags())
    with pytest.raises(NosaFlagError, match="--nosa-offload=on: the KV pool was built in GPU memory"):
        NosaAttnBackend(make_runner(offload=False), NosaServerFlags(offload=True))


def test_nosa_pool_keeps_tokens_where_sglang_puts_them(gen):
    """set_kv_buffer (SGLang's write) and store (with c) land in the run of the token's page, at its offset;
    the pool pages read them back; get_kv_size_bytes counts K, V and c."""
    pool = NosaKVPool(8 * PAGE, PAGE, torch.float32, HKV, D, L, "cpu", False)
    locs = torch.tensor([PAGE + 3, 5 * PAGE, 8 * PAGE + PAGE - 1])
    k, v = torch.randn(3, HKV, D, generator=gen), torch.randn(3, HKV, D, generator=gen)
    c = torch.rand(3, HKV, generator=gen) + 0.1
    pool.set_kv_buffer(RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=1), locs, k.view(3, -1), v)
    rk, rv, rc = pool.pages.read_tokens(1, locs)
    assert torch.equal(rk, k) and torch.equal(rv, v) and not rc.any()
    pool.store(0, locs, v, k, c)
    rk, rv, rc = pool.pages.read_tokens(0, locs)
    assert torch.equal(rk, v) and torch.equal(rv, k) and torch.equal(rc, c)
    runs = pool.get_key_buffer(1).view(-1, PAGE, D)
    assert torch.equal(runs[1 * HKV + 1, 3], k[0, 1]) and torch.equal(runs[8 * HKV + 0, PAGE - 1], k[2, 0])
    runs = 9 * HKV + 1  # pages 0..8 and the trash run
    assert pool.get_kv_size_bytes() == (L * runs * PAGE * D * 4, L * runs * PAGE * (D + 1) * 4)
    with pytest.raises(ValueError, match="size=20: must be a multiple of page_size"):
        NosaKVPool(20, PAGE, torch.float32, HKV, D, L, "cpu", False)


def test_gpu_state_that_does_not_fit_names_the_flags_that_size_it(monkeypatch):
    import nosa_sglang.backend as backend_module

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(backend_module, "NosaRuntime", no_memory)
    with pytest.raises(NosaFlagError, match="--max-running-requests, --nosa-max-slots"):
        NosaAttnBackend(make_runner(), NosaServerFlags(slots=SMALL.topk_blocks))


@pytest.mark.parametrize("ck_dtype, expected", [("float32", torch.float32), ("model", torch.bfloat16)])
def test_compressed_keys_are_stored_as_the_flag_says(ck_dtype, expected):
    runner = make_runner(dtype=torch.bfloat16)
    backend = NosaAttnBackend(runner, NosaServerFlags(slots=SMALL.topk_blocks, ck_dtype=ck_dtype))
    assert backend.runtime.selection.ck.dtype == expected


def test_unknown_ck_dtype_names_the_flag():
    with pytest.raises(NosaFlagError, match=r"--nosa-ck-dtype='fp8': allowed values are \['float32', 'model'\]"):
        NosaServerFlags(ck_dtype="fp8")


class OpCount(TorchDispatchMode):
    """Counts the tensor ops dispatched inside (each a launch on a GPU, or more)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def backend_ops(sched: "Scheduler", mode: ForwardMode, batch: list[tuple[Seq, int]]) -> int:
    """Tensor ops the backend dispatches for one forward of `batch` (its metadata and every layer); the
    scheduler's own work (locations, inputs) is outside the count."""
    locs = torch.cat([sched._locs(s, n) for s, n in batch])
    total = sum(n for _, n in batch)
    fb = SimpleNamespace(forward_mode=mode, rids=[s.rid for s, _ in batch],
                         req_pool_indices=torch.tensor([s.row for s, _ in batch]),
                         seq_lens_cpu=torch.tensor([s.n + n for s, n in batch]),
                         extend_prefix_lens_cpu=[s.n for s, _ in batch], extend_seq_lens_cpu=[n for _, n in batch],
                         out_cache_loc=locs)
    inputs = [(torch.randn(total, HQ * D), torch.randn(total, HKV, D), torch.randn(total, HKV, D),
               torch.randn(total, HKV) * 0.5) for _ in sched.layers]
    count = OpCount()
    with count:
        sched.backend.init_forward_metadata(fb)
        if mode.is_extend():
            for layer, (q, k, v, c) in zip(sched.layers, inputs):
                sched.backend.forward_extend(q, k, v, layer, fb, nosa_bias=c)
    return count.n


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "gpu_only"])
def test_the_fixed_cost_of_a_request_does_not_grow_with_layers_times_requests(gen, offload):
    """What each request pays once was ~55 launches per layer (the extend of its last page, its admission
    to the runtime): the server's GPU sat a fifth busy. Grouped extends (Triton path) and batched
    admission cost the same ops per layer for 2 requests as for 5; what remains per request is outside
    the layer loop (its pages, its row), or, offloaded, its warm start."""
    counts = {}
    for n in (2, 5):
        runner = make_runner(offload=offload, requests=2 * n + 1)
        backend = NosaAttnBackend(runner, NosaServerFlags(offload=offload, slots=SMALL.topk_blocks))
        sched = Scheduler(backend, runner, gen, check=False)
        first = [sched.new(f"p{i}") for i in range(n)]
        sched.forward(ForwardMode.EXTEND, [(s, 4 * PAGE + 3) for s in first])
        again = [sched.new(f"r{i}", shared_from=s, shared_pages=4) for i, s in enumerate(first)]
        backend.runtime.impl = "triton"
        extend = backend_ops(sched, ForwardMode.EXTEND, [(s, 5) for s in again])
        backend.runtime.impl = "torch"
        for s in again:
            s.k[0] = torch.empty(s.n + 5, HKV, D)  # NOTE: only the lengths matter from here on
        admit = backend_ops(sched, ForwardMode.DECODE, [(s, 1) for s in again])
        assert set(backend.runtime.running_requests) == {s.rid for s in again}
        counts[n] = extend, admit
    (e2, a2), (e5, a5) = counts[2], counts[5]
    # one at a time, a request cost ~35 ops per layer to extend and ~20 per layer to admit (its prompt read,
    # its compressed keys); now a few per forward: its pages, its row, its index lists (host tensors)
    assert e5 - e2 <= 3 * 5, counts
    if not offload:  # NOTE: offloaded, each request's warm start (its slots) still runs in every layer
        assert a5 - a2 <= 3 * 25, counts
