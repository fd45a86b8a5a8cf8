"""PaddedSteps (the runtime's half of SGLang's full decode graph) against the runtime's own decode, bit for
bit: padded batches in another order than the rows, requests ending (rows move), a capture's plan with no
request at all. The padding must touch nothing but unused rows and the padding page, and count nowhere;
every step's plan must have the same host-side shape and addresses, or one capture would not fit them."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import SMALL
from test_runtime_equivalence import fresh_seed, random_prompt
from test_runtime_page_pool import BS, SHAPE, Server, runtimes

from nosa_sglang.runtime import PaddedSteps, RuntimeUsageError
from nosa_sglang.runtime.page_pool import PagePool

pytestmark = pytest.mark.usefixtures("one_thread")
ROWS = 4
L = SHAPE.num_layers


def plan_shape(p) -> tuple:
    """What a captured step depends on beyond the static buffer's contents."""
    return (p.row_range, p.perm is not None, p.inv is not None, p.any_open, p.any_complete, p.wb_src,
            p.num_blocks, p.rows.data_ptr(), p.token_slots.data_ptr())


def pools_and_runtimes(g: torch.Generator, prompt_lens: list[int], device: str = "cpu", before_admission=None):
    """Two pool-backed runtimes over two pools that hold the same prompts (the server's pages);
    `before_admission(padded runtime)` runs first (SGLang captures its graphs at start-up)."""
    pools = [PagePool(SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, BS, SHAPE.dtype, num_pages=120,
                      device=device) for _ in range(2)]
    server = Server(pools[0], g)
    rts = [runtimes(pool, device) for pool in pools]
    if before_admission is not None:
        before_admission(rts[1])
    for i, T in enumerate(prompt_lens):
        ks, vs, cs = random_prompt(SHAPE, T, g, device)
        pages, locs = server.admit(f"r{i}", ks, vs, cs)
        for layer in range(SHAPE.num_layers):
            pools[1].write_tokens(layer, locs.to(device), ks[layer], vs[layer], cs[layer])
        for rt in rts:
            rt.begin_request(f"r{i}", ks, vs, cs, pages=pages)
    return pools, server, rts


def step_inputs(B: int, g: torch.Generator, device: str) -> list[tuple[torch.Tensor, ...]]:
    """Per layer q, k, v, c of B rows."""
    H, Hq, d = SHAPE.num_kv_heads, SHAPE.num_q_heads, SHAPE.head_dim
    return [(torch.randn(B, Hq, d, generator=g).to(device), torch.randn(B, H, d, generator=g).to(device),
             torch.randn(B, H, d, generator=g).to(device), (0.1 + 2 * torch.rand(B, H, generator=g)).to(device))
            for _ in range(SHAPE.num_layers)]


class CapturedSteps:
    """Every layer of a padded step as one CUDA graph per batch size, captured as SGLang does (at start-up,
    on a plan without requests, after two eager warm-ups); `run` copies the inputs into the graph's
    and replays it."""

    def __init__(self, steps: PaddedSteps, sizes: tuple[int, ...], g: torch.Generator) -> None:
        from nosa_sglang.runtime.graph_capture import capture

        self.steps, self.inputs, self.outputs, self.graphs, self.shapes = steps, {}, {}, {}, {}
        for B in sizes:
            x = self.inputs[B] = step_inputs(B, g, "cuda")
            self.shapes[B] = plan_shape(steps.begin((), B, torch.zeros(0, dtype=torch.long, device="cuda")))
            body = lambda x=x: [steps.decode(layer, *x[layer]) for layer in range(SHAPE.num_layers)]  # noqa: E731
            for _ in range(2):
                body()
            torch.cuda.synchronize()
            self.graphs[B] = torch.cuda.CUDAGraph()
            with capture(self.graphs[B], None):
                self.outputs[B] = body()
            steps.end()

    def run(self, B: int, x: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        for static, new in zip(self.inputs[B], x):
            for a, b in zip(static, new):
                a.copy_(b)
        self.graphs[B].replay()
        return self.outputs[B]


def drive(device: str, graphs: bool, impl: str | None = None, n_steps: int = 70) -> None:
    """70 steps of 3, then 2 requests, in changing order, padded to 2-4 rows: PaddedSteps (eagerly, or
    replayed from graphs captured before any request) against the runtime's own decode (which permutes
    the batch into row order and reads row ranges, where PaddedSteps reads through the rows)."""
    g = torch.Generator().manual_seed(fresh_seed())
    captured = {}
    before = (lambda rt: captured.setdefault("g", CapturedSteps(PaddedSteps(rt), (3, 4), g))) if graphs else None
    pools, server, (plain, padded) = pools_and_runtimes(g, [150, 161, 97], device, before)
    if impl is not None:
        plain.impl = padded.impl = impl
    steps = captured["g"].steps if graphs else PaddedSteps(padded)
    if not graphs:
        with pytest.raises(RuntimeUsageError, match="running requests"):  # padding would take r0..r2's rows
            steps.begin((), ROWS, torch.zeros(0, dtype=torch.long))
    ids = ["r0", "r1", "r2"]
    shapes: dict[int, tuple] = dict(captured["g"].shapes) if graphs else {}
    selected = [0] * L  # blocks the steps selected, per layer and per request: what both must count
    per_request = dict.fromkeys(ids, 0)
    for step in range(n_steps):
        if step == min(25, n_steps // 2):  # r0 ends: r2 moves into its row
            for rt in (plain, padded):
                rt.end_request("r0")
            server.finish("r0")
            ids.remove("r0")
        batch = ids[::-1] if step % 3 == 0 else list(ids)
        n = len(batch)
        B = ROWS if step % 2 or graphs else n
        locs = server.decode_locs(batch).to(device)
        p = steps.begin(batch, B, locs)
        assert shapes.setdefault(B, plan_shape(p)) == plan_shape(p), "a step's plan differs from the capture's"
        assert p.perm is None and p.row_range is None  # the caller's order, state read through the rows
        x = step_inputs(B, g, device)
        refs = [plain.decode(layer, batch, *(t[:n] for t in x[layer]), token_locs=locs) for layer in range(L)]
        sels = [plain.last_selection(layer).clone() for layer in range(L)]
        for layer in range(L):
            selected[layer] += int((sels[layer] >= 0).sum())
            for rid, sel in zip(batch, sels[layer]):
                per_request[rid] += int((sel >= 0).sum())
        outs = captured["g"].run(B, x) if graphs else [steps.decode(layer, *x[layer]) for layer in range(L)]
        for layer in range(L):
            assert torch.equal(outs[layer][:n], refs[layer]), f"step {step} layer {layer}: outputs differ"
            assert torch.equal(padded.last_selection(layer)[:n], sels[layer])
        steps.end()
        plain.step_boundary()
        assert padded.snapshot().steps == plain.snapshot().steps
    assert all(padded.seq_len(r) == plain.seq_len(r) for r in ids)
    a, b = plain.snapshot(), padded.snapshot()
    assert [(x.hits, x.misses) for x in a.layers] == [(x.hits, x.misses) for x in b.layers], "padding was counted"
    assert [x.hits for x in a.layers] == selected and all(x.misses == 0 for x in a.layers)
    for snap in (a, b):
        assert {r.request_id: r.hits for r in snap.requests} == {rid: per_request[rid] for rid in ids}
    for rid in ids:  # every token where the server put it, in both pools
        locs = server.locs(rid, server.lens[rid]).to(device)
        for layer in range(L):
            assert all(torch.equal(x, y) for x, y in zip(pools[0].read_tokens(layer, locs),
                                                        pools[1].read_tokens(layer, locs)))


def capture_step(steps: PaddedSteps, batch: int, g: torch.Generator) -> None:
    """What SGLang's warm-ups and capture run: every layer on a plan without requests, garbage inputs."""
    steps.begin((), batch, torch.zeros(0, dtype=torch.long))
    for layer, x in enumerate(step_inputs(batch, g, "cpu")):
        assert steps.decode(layer, *x).shape == (batch, SHAPE.num_q_heads, SHAPE.head_dim)
    steps.end()


def test_padded_steps_equal_the_runtime_decode_bit_for_bit():
    drive("cpu", graphs=False)


def test_padded_steps_through_the_triton_kernels_equal_the_runtime_decode_bit_for_bit():
    """The same through the Triton kernels (the interpreter): the slot list and counts, the chunk
    completion and the scores read through the rows, as a GPU runs them (a CPU runtime uses torch)."""
    from nosa_sglang.kernels._dispatch import interpret_mode

    if not interpret_mode():
        pytest.skip("runs the Triton kernels through the interpreter (TRITON_INTERPRET=1, the test command's)")
    drive("cpu", graphs=False, impl="triton", n_steps=6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_padded_steps_replayed_from_cuda_graphs_equal_the_runtime_decode_bit_for_bit():
    """The CPU twin runs the same steps eagerly; here each is a replay of a graph captured before any
    request, through the Triton kernels."""
    drive("cuda", graphs=True)


def test_a_capture_plan_touches_only_unused_rows_and_the_padding_page():
    g = torch.Generator().manual_seed(fresh_seed())
    pool = PagePool(SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, BS, SHAPE.dtype, num_pages=40, device="cpu")
    rt = runtimes(pool)
    steps = PaddedSteps(rt)
    pool.kv.normal_(generator=g)
    pool.c.normal_(generator=g)
    before = pool.kv.clone(), pool.c.clone()
    capture_step(steps, ROWS, g)
    page = SHAPE.num_kv_heads  # runs of page 0: 0..Hkv-1
    assert torch.equal(pool.kv[:, :, page:], before[0][:, :, page:])
    assert torch.equal(pool.c[:, page:], before[1][:, page:])
    assert rt.running_requests == () and rt.snapshot().steps == 0
    assert all(x.hits == x.misses == 0 for x in rt.snapshot().layers)
    ks, vs, cs = random_prompt(SHAPE, 70, g, "cpu")  # a request admitted after the capture decodes as usual
    pages = list(range(5, 5 + SMALL.num_blocks(70)))
    rt.begin_request("a", ks, vs, cs, pages=pages)
    steps.begin(["a"], ROWS, torch.tensor([pages[70 // BS] * BS + 70 % BS]))
    for layer, x in enumerate(step_inputs(ROWS, g, "cpu")):
        steps.decode(layer, *x)
    steps.end()
    assert rt.seq_len("a") == 71 and rt.snapshot().steps == 1


def test_padded_steps_refuse_what_one_capture_cannot_hold():
    g = torch.Generator().manual_seed(fresh_seed())
    pools, server, (rt, _) = pools_and_runtimes(g, [40, 50])
    steps = PaddedSteps(rt)
    with pytest.raises(RuntimeUsageError, match="running requests"):
        steps.begin(["r0"], ROWS, torch.tensor([1]))  # r1 runs too: the padding would take its row
    with pytest.raises(ValueError, match=r"batch=5: allowed range is \[2, 4\]"):
        steps.begin(["r0", "r1"], 5, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="token_locs"):
        steps.begin(["r0", "r1"], ROWS, torch.tensor([1]))
    with pytest.raises(RuntimeUsageError, match="no step begun"):
        steps.decode(0, *(torch.zeros(1) for _ in range(4)))
    offloaded = runtimes(PagePool(SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, BS, SHAPE.dtype,
                                  num_pages=8, device="cpu", host=True), gpu_only=False)
    with pytest.raises(ValueError, match="in place"):
        PaddedSteps(offloaded)
    steps.begin(["r1", "r0"], 3, server.decode_locs(["r1", "r0"]))
    with pytest.raises(RuntimeUsageError, match="open"):  # the step must end before anything else begins
        rt.begin_request("x", *random_prompt(SHAPE, 10, g, "cpu"), pages=[9])


def test_fully_on_gpu_counts_equal_the_selections_with_and_without_a_page_table():
    """Hits of a runtime fully on the GPU are its selected blocks (no misses): counted by the slot-list
    kernel from a page table, by two ops a layer from the slot base without one; either way added for
    every layer after the last, per layer and per request, batches in any order."""
    g = torch.Generator().manual_seed(fresh_seed())
    pool = PagePool(SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, BS, SHAPE.dtype, num_pages=60, device="cpu")
    server = Server(pool, g)
    pooled, copied = runtimes(pool), runtimes(None)
    ids = ["a", "b", "c"]
    for rid, T in zip(ids, (150, 70, 97)):
        ks, vs, cs = random_prompt(SHAPE, T, g, "cpu")
        pages, _ = server.admit(rid, ks, vs, cs)
        pooled.begin_request(rid, ks, vs, cs, pages=pages)
        copied.begin_request(rid, ks, vs, cs)
    for rt in (pooled, copied):
        selected, per_request = [0] * L, dict.fromkeys(ids, 0)
        for step in range(4):
            batch = ids[::-1] if step % 2 else ["b", "a", "c"]
            locs = server.decode_locs(batch) if rt is pooled else None
            for layer, x in enumerate(step_inputs(len(batch), g, "cpu")):
                rt.decode(layer, batch, *x, token_locs=locs)
                for rid, sel in zip(batch, rt.last_selection(layer)):
                    selected[layer] += int((sel >= 0).sum())
                    per_request[rid] += int((sel >= 0).sum())
            rt.step_boundary()
        snap = rt.snapshot()
        assert [x.hits for x in snap.layers] == selected and all(x.misses == 0 for x in snap.layers)
        assert {r.request_id: r.hits for r in snap.requests} == per_request


def test_a_full_graph_decode_layer_launches_only_nosa_kernels(monkeypatch):
    """Inside SGLang's full decode graph each launch costs ~2-3 us even when its work is tiny, and a layer
    was 46 of them (permutations, slot ids, counts, the chunk completion in torch ops). A pool-backed
    padded layer (not the step's last, which also adds up the counts) is its Triton kernels alone: the
    token write, the chunk completion, the scores, the top-k, the slot list, the attention."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nosa_sglang.kernels._dispatch import interpret_mode

    if not interpret_mode():
        pytest.skip("counts Triton launches through the interpreter (TRITON_INTERPRET=1, the test command's)")
    import triton.runtime.interpreter as interpreter

    kernels, torch_ops, inside = [], [], [0]
    launch = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        if not inside[0]:
            kernels.append(self.fn.__name__)
        inside[0] += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            inside[0] -= 1

    class TorchLaunches(TorchDispatchMode):
        ALLOC = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
                 "aten.new_empty.default", "aten.lift_fresh.default"}  # allocations: no launch

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and not func.is_view and str(func) not in self.ALLOC:
                torch_ops.append(str(func))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(fresh_seed())
    pools, server, (_, padded) = pools_and_runtimes(g, [150, 161, 97])
    padded.impl = "triton"  # NOTE: a CPU runtime's default is torch; a GPU's, these kernels
    steps = PaddedSteps(padded)
    for step in range(2):
        batch = ["r2", "r0", "r1"] if step else ["r0", "r1", "r2"]
        steps.begin(batch, ROWS, server.decode_locs(batch))
        x = step_inputs(ROWS, g, "cpu")
        if step:
            monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted)
            with TorchLaunches():
                steps.decode(0, *x[0])
            monkeypatch.undo()
        else:
            steps.decode(0, *x[0])
        for layer in range(1, L):
            steps.decode(layer, *x[layer])
        steps.end()
    assert torch_ops == [], torch_ops
    assert len(kernels) <= 10 and {"_table_runs_kernel", "_complete_chunks_kernel", "_decode_kernel"} <= set(kernels)
