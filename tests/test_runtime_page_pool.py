"""gpu_only decode from a server's page pool in place (PagePool + PoolResidency) equals gpu_only decode over
the runtime's own copy, bit for bit, with pages scattered over the pool, requests ending in the middle of
the batch (rows move) and the batch in another order than the rows; the pool holds every token's K/V/c
where the server put it; and the API refuses what this mode cannot do."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import SMALL
from test_runtime_equivalence import fresh_seed, random_prompt

from nosa_sglang.runtime import ModelShape, NosaRuntime, OffloadKnobs, RuntimeUsageError
from nosa_sglang.runtime.page_pool import PagePool

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = ModelShape(2, 4, 2, 16, torch.float32)
BS = SMALL.block_size


class Server:
    """What SGLang does around the runtime: pages from a shuffled free list, every prompt token written
    to its page, a page for each decode token that opens a block."""

    def __init__(self, pool: PagePool, g: torch.Generator) -> None:
        self.pool = pool
        self.free = torch.randperm(pool.num_pages - 1, generator=g).add(1).tolist()  # page 0: padding
        self.pages: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def admit(self, rid: str, ks, vs, cs) -> tuple[list[int], list[torch.Tensor]]:
        T = ks[0].shape[0]
        pages = [self.free.pop() for _ in range(SMALL.num_blocks(T))]
        self.pages[rid], self.lens[rid] = pages, T
        locs = self.locs(rid, T)
        for layer in range(SHAPE.num_layers):
            self.pool.write_tokens(layer, locs, ks[layer], vs[layer], cs[layer])
        return pages, locs

    def locs(self, rid: str, n: int) -> torch.Tensor:
        pos = torch.arange(n)
        return torch.tensor(self.pages[rid])[pos // BS] * BS + pos % BS

    def decode_locs(self, rids: list[str]) -> torch.Tensor:
        out = []
        for rid in rids:
            pos = self.lens[rid]
            if pos % BS == 0:
                self.pages[rid].append(self.free.pop())
            out.append(self.pages[rid][pos // BS] * BS + pos % BS)
            self.lens[rid] += 1
        return torch.tensor(out)

    def finish(self, rid: str) -> None:
        self.free += self.pages.pop(rid)
        del self.lens[rid]


def runtimes(pool: PagePool | None, device: str = "cpu", gpu_only: bool = True) -> NosaRuntime:
    knobs = OffloadKnobs(gpu_slots=SMALL.topk_blocks, transfer_mode="copy_engine" if device == "cpu" else "zero_copy")
    return NosaRuntime(SHAPE, SMALL, knobs, device=device, max_requests=4, max_seq_len=1024, gpu_only=gpu_only,
                       page_pool=pool)


def drive_both(seed: int, prompt_lens: list[int], steps: int, end_at: dict[int, str], order_every: int = 3,
               device: str = "cpu", host: bool = False):
    """Step a paged runtime (pool-backed gpu_only, or with `host` offloading over a host pool that the
    server writes every token to) and a copy-backed gpu_only runtime on the same inputs; return both
    outputs and selections per (step, layer), and the pool, the server, the token mirror and the paged
    runtime."""
    g = torch.Generator().manual_seed(seed)
    pool = PagePool(SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, BS, SHAPE.dtype, num_pages=160,
                    device=device, host=host)
    server = Server(pool, g)
    pooled, copied = runtimes(pool, device, gpu_only=not host), runtimes(None, device)
    mirror: dict[str, list[list[torch.Tensor]]] = {}
    ids = [f"r{i}" for i in range(len(prompt_lens))]
    for rid, T in zip(ids, prompt_lens):
        ks, vs, cs = random_prompt(SHAPE, T, g, device)
        pages, locs = server.admit(rid, ks, vs, cs)
        read = [pool.read_tokens(layer, locs) for layer in range(SHAPE.num_layers)]
        pooled.begin_request(rid, [r[0] for r in read], [r[1] for r in read], [r[2] for r in read], pages=pages)
        copied.begin_request(rid, ks, vs, cs)
        mirror[rid] = [[ks[layer], vs[layer], cs[layer]] for layer in range(SHAPE.num_layers)]
    results = []
    for step in range(steps):
        if step in end_at:
            rid = end_at[step]
            for rt in (pooled, copied):
                rt.end_request(rid)
            server.finish(rid)
            ids.remove(rid)
        batch = ids[::-1] if step % order_every == 0 else list(ids)
        locs = server.decode_locs(batch)
        for layer in range(SHAPE.num_layers):
            H, Hq, d = SHAPE.num_kv_heads, SHAPE.num_q_heads, SHAPE.head_dim
            k, v = (torch.randn(len(batch), H, d, generator=g).to(device) for _ in range(2))
            c = (0.1 + 2 * torch.rand(len(batch), H, generator=g)).to(device)
            q = torch.randn(len(batch), Hq, d, generator=g).to(device)
            if host:  # offloading, the server writes the token to its page (SGLang's backend: `store`)
                pool.write_tokens(layer, locs, k, v, c)
            outs = [rt.decode(layer, batch, q, k, v, c, token_locs=tl) for rt, tl in ((pooled, locs), (copied, None))]
            sels = [rt.last_selection(layer).clone() for rt in (pooled, copied)]
            results.append((outs, sels))
            for j, rid in enumerate(batch):
                m = mirror[rid][layer]
                for i, x in enumerate((k, v, c)):
                    m[i] = torch.cat((m[i], x[j : j + 1]))
        for rt in (pooled, copied):
            rt.step_boundary()
    return results, pool, server, mirror, pooled


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_pool_backed_decode_equals_the_copy_bit_for_bit(device):
    """On CUDA through the Triton kernels (the CPU run uses the torch statements)."""
    results, pool, server, mirror, pooled = drive_both(fresh_seed(), [150, 161, 40, 97], steps=90,
                                                       end_at={30: "r1", 60: "r0"}, device=device)
    for (o_pool, o_copy), (s_pool, s_copy) in results:
        assert torch.equal(s_pool, s_copy), "selections differ"
        assert torch.equal(o_pool, o_copy), "outputs differ"
    assert pooled.snapshot().totals.misses == 0
    for rid, layers in mirror.items():
        if rid not in server.lens:
            continue
        locs = server.locs(rid, server.lens[rid]).to(device)
        for layer, (k, v, c) in enumerate(layers):
            pk, pv, pc = pool.read_tokens(layer, locs)
            assert torch.equal(pk, k) and torch.equal(pv, v) and torch.equal(pc, c), f"{rid} layer {layer}: pool"


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_offloading_over_a_host_page_pool_equals_gpu_only_bit_for_bit(device):
    """The pool in host memory is the host store: the server's pages, the server's writes, no block
    allocated or written back by the runtime; blocks still miss and are fetched from the pages. On CUDA:
    pinned pages, the zero-copy token store, gathers and fetches."""
    results, pool, server, mirror, paged = drive_both(fresh_seed(), [150, 161, 40, 97], steps=90,
                                                      end_at={30: "r1", 60: "r0"}, host=True, device=device)
    if device == "cuda":
        assert pool.kv.is_pinned()
        for rid in server.lens:  # sequences come back whole from the pinned pages
            T = server.lens[rid]
            for layer, (k, v, c) in enumerate(mirror[rid]):
                got = pool.read_pages(layer, torch.tensor(server.pages[rid]), T)
                assert all(torch.equal(a, b) for a, b in zip(got, (k, v, c)))
    for (o_paged, o_copy), (s_paged, s_copy) in results:
        assert torch.equal(s_paged, s_copy), "selections differ"
        assert torch.equal(o_paged, o_copy), "outputs differ"
    totals = paged.snapshot().totals
    assert totals.misses > 0 and totals.bytes_d2h == 0, "blocks must miss, and nothing is written back"
    assert paged.host.used_blocks == sum(SMALL.num_blocks(T) for T in (40, 97))  # the prompts' pages adopted
    snap = paged.snapshot()  # the pages each running request spans, prompt and decoded: the server's count
    assert snap.host_blocks_used == sum(len(server.pages[rid]) for rid in ("r2", "r3"))
    assert sorted(r.host_blocks for r in snap.requests) == sorted(len(server.pages[rid]) for rid in ("r2", "r3"))
    for rid in list(paged.running_requests):
        paged.end_request(rid)
    assert paged.host.used_blocks == 0


def test_pool_backed_mode_refuses_what_it_cannot_do():
    g = torch.Generator().manual_seed(fresh_seed())
    pool = PagePool(SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, BS, SHAPE.dtype, num_pages=40, device="cpu")
    with pytest.raises(ValueError, match="page_pool: gpu_only decodes from device storage, offloading needs host"):
        NosaRuntime(SHAPE, SMALL, max_requests=2, host_capacity_bytes=1 << 20, page_pool=pool)
    rt = runtimes(pool)
    ks, vs, cs = random_prompt(SHAPE, 40, g, "cpu")
    with pytest.raises(ValueError, match="pages: required"):
        rt.begin_request("a", ks, vs, cs)
    with pytest.raises(ValueError, match=r"pages: expected 3 page ids in \[0, 40\)"):
        rt.begin_request("a", ks, vs, cs, pages=[1, 2, 40])
    with pytest.raises(RuntimeUsageError, match="begin_request_synthetic"):
        rt.begin_request_synthetic("a", 40)
    assert rt.running_requests == ()
    rt.begin_request("a", ks, vs, cs, pages=[1, 2, 3])
    x = torch.randn(1, SHAPE.num_kv_heads, SHAPE.head_dim, generator=g)
    q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=g)
    c = torch.rand(1, SHAPE.num_kv_heads, generator=g) + 0.1
    with pytest.raises(ValueError, match=r"token_locs: expected \[1\] pool locations"):
        rt.decode(0, ["a"], q, x, x, c)
    copied = runtimes(None)
    with pytest.raises(ValueError, match="pages: only with a page_pool"):
        copied.begin_request("a", ks, vs, cs, pages=[1, 2, 3])


def test_reading_a_sequence_by_pages_equals_reading_its_tokens():
    g = torch.Generator().manual_seed(fresh_seed())
    pool = PagePool(SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, BS, SHAPE.dtype, num_pages=40, device="cpu")
    server = Server(pool, g)
    for T in (1, BS, 3 * BS + 5):
        ks, vs, cs = random_prompt(SHAPE, T, g, "cpu")
        _, locs = server.admit(f"r{T}", ks, vs, cs)
        pages = torch.tensor(server.pages[f"r{T}"])
        for layer in range(SHAPE.num_layers):
            by_pages = pool.read_pages(layer, pages, T)
            assert all(torch.equal(a, b) for a, b in zip(by_pages, pool.read_tokens(layer, locs)))
            assert torch.equal(by_pages[0], ks[layer]) and torch.equal(by_pages[2], cs[layer])
            k_only = pool.read_pages(layer, pages, T, with_v=False)
            assert k_only[1] is None and torch.equal(k_only[0], by_pages[0]) and torch.equal(k_only[2], by_pages[2])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("with_k, with_v", [(True, True), (True, False), (False, True)])
def test_reading_runs_skips_negative_ids_and_parts_not_wanted(with_k, with_v, device):
    """read_runs: the parts asked for, each live run as stored, a negative id (a fixed-size list's
    padding) as zeros. On CUDA the pool is in pinned host memory: the zero-copy gathers (K or V alone
    through gather_store_runs)."""
    g = torch.Generator().manual_seed(fresh_seed())
    pool = PagePool(SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, BS, SHAPE.dtype, num_pages=12, device=device,
                    host=device == "cuda")
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=g).to(pool.kv.dtype))
    pool.c.copy_(torch.randn(pool.c.shape, generator=g))
    runs = torch.tensor([7, -1, 0, 23, -1], device=device)
    k, v, c = pool.read_runs(1, runs, with_k=with_k, with_v=with_v)
    live, dead = (runs >= 0).cpu(), (runs < 0).cpu()
    for got, i, want in ((k, 0, with_k), (v, 1, with_v)):
        if not want:
            assert got is None
            continue
        got = got.cpu()
        assert torch.equal(got[live], pool.kv[i, 1].cpu()[runs.cpu()[live]]) and not got[dead].any()
    c = c.cpu()
    assert torch.equal(c[live], pool.c[1].cpu()[runs.cpu()[live]]) and not c[dead].any()


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("host", [False, True], ids=["pool_backed", "offloaded"])
def test_admitting_paged_prompts_together_equals_one_by_one_bit_for_bit(host, device, monkeypatch):
    """begin_paged_requests (the server's admission: prompts read from their pages as one sequence per
    layer, in groups) builds the state begin_request builds per request, and decodes the same; under a
    small group cap the prompts go in three groups, one of two prompts. Bad input changes nothing."""
    from nosa_sglang.runtime import GpuSlotsExhausted
    from nosa_sglang.runtime import prompt as prompt_module

    g = torch.Generator().manual_seed(fresh_seed())
    pools = [PagePool(SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, BS, SHAPE.dtype, num_pages=100,
                      device=device, host=host) for _ in range(2)]
    server = Server(pools[0], g)
    one, many = (runtimes(pool, device, gpu_only=not host) for pool in pools)
    admitted = []
    for i, T in enumerate([150, 3, 97, 16, 41]):  # 10, 1, 7, 1 and 3 blocks; r1 is shorter than a window
        ks, vs, cs = random_prompt(SHAPE, T, g, device)
        pages, locs = server.admit(f"r{i}", ks, vs, cs)
        for layer in range(SHAPE.num_layers):
            pools[1].write_tokens(layer, locs.to(device), ks[layer], vs[layer], cs[layer])
        if i < 4:
            one.begin_request(f"r{i}", ks, vs, cs, pages=pages)
        admitted.append((f"r{i}", T, pages))
    before = many.selection.ck.clone()
    with pytest.raises(RuntimeUsageError, match="distinct"):
        many.begin_paged_requests(admitted[:2] + admitted[:1])
    with pytest.raises(ValueError, match=r"request 'r1' pages: expected 1 page ids"):
        many.begin_paged_requests([admitted[0], ("r1", 3, [1, 2])])
    with pytest.raises(GpuSlotsExhausted):
        many.begin_paged_requests(admitted)  # 5 requests, 4 rows
    assert many.running_requests == () and torch.equal(many.selection.ck, before)
    if host:
        assert many.host.used_blocks == 0
    bytes_per_block = SHAPE.num_kv_heads * SHAPE.head_dim * SHAPE.dtype_bytes * BS
    monkeypatch.setattr(prompt_module, "PAGED_GROUP_BYTES", 8 * bytes_per_block)  # [r0], [r1, r2], [r3]
    groups = []
    load_group = prompt_module.PromptLoader._load_group
    monkeypatch.setattr(prompt_module.PromptLoader, "_load_group",
                        lambda self, rows, *a: groups.append(rows) or load_group(self, rows, *a))
    assert [a.request_id for a in many.begin_paged_requests(admitted[:4])] == ["r0", "r1", "r2", "r3"]
    assert groups == [[0], [1, 2], [3]] and one.running_requests == many.running_requests
    for name in ("ck", "ce", "c", "ring"):
        assert torch.equal(getattr(one.selection, name), getattr(many.selection, name)), name
    assert torch.equal(one.host_table, many.host_table)
    if host:
        assert one.host.used_blocks == many.host.used_blocks
    ids = list(many.running_requests)
    locs = server.decode_locs(ids).to(device)
    for layer in range(SHAPE.num_layers):
        q = torch.randn(len(ids), SHAPE.num_q_heads, SHAPE.head_dim, generator=g).to(device)
        k, v = (torch.randn(len(ids), SHAPE.num_kv_heads, SHAPE.head_dim, generator=g).to(device) for _ in range(2))
        c = (0.1 + 2 * torch.rand(len(ids), SHAPE.num_kv_heads, generator=g)).to(device)
        if host:
            for pool in pools:
                pool.write_tokens(layer, locs, k, v, c)
        outs = [rt.decode(layer, ids, q, k, v, c, token_locs=locs) for rt in (one, many)]
        assert torch.equal(*outs)


def test_prompt_layout_lists_every_chunk_token_and_ring_entry_of_each_prompt():
    """The index lists expanded on the device equal the per-prompt statement: prompt i (row rows[i], T
    tokens) starts at its first block in the concatenated sequence; its chunks, tokens and last
    kernel_size tokens (ring slot = position % kernel_size) map to its row; prompts without a chunk too."""
    from nosa_sglang.runtime.prompt import PromptLayout

    rows, lens = [3, 0, 2, 1], [150, 5, 64, 97]
    cfg, bs, ks = SMALL, SMALL.block_size, SMALL.kernel_size
    lay = PromptLayout(rows, lens, cfg, torch.device("cpu"))
    want = {k: ([], [], []) for k in ("chunk", "token", "ring")}
    first = 0
    for row, T in zip(rows, lens):
        entries = {"chunk": [(first * cfg.chunks_per_block + j, j) for j in range(cfg.num_chunks(T))],
                   "token": [(first * bs + t, t) for t in range(T)],
                   "ring": [(first * bs + t, t % ks) for t in range(max(0, T - ks), T)]}
        for name, pairs in entries.items():
            want[name][0].extend(src for src, _ in pairs)
            want[name][1].extend(row for _ in pairs)
            want[name][2].extend(slot for _, slot in pairs)
        first += cfg.num_blocks(T)
    for name, (src, row_of, ids) in want.items():
        assert getattr(lay, f"{name}_src").tolist() == src, name
        assert getattr(lay, f"{name}_rows").tolist() == row_of, name
        assert getattr(lay, f"{name}_ids").tolist() == ids, name
    assert lay.n_tokens == first * bs and SMALL.num_chunks(5) == 0
