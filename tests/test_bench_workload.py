"""The decode benchmarks (benchmarks/decode_workload.py, decode_throughput.py, dense_decode.py,
two_homes.py). The query stream drawn up front must be the very stream that drawing per call gives
(same seed), so that results before and after the change share a query model."""

from __future__ import annotations

import math
import sys
import time
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from decode_workload import Workload, warm_up  # noqa: E402

from nosa_sglang.runtime import ModelShape  # noqa: E402

SHAPE = ModelShape(3, 4, 2, 16, torch.bfloat16)


@pytest.mark.parametrize("model", ["iid", "drift"])
def test_queries_drawn_up_front_equal_the_per_call_stream(model):
    steps = 5
    lazy = Workload(SHAPE, 2, model, 0.9, "cpu", seed=3)
    drawn = Workload(SHAPE, 2, model, 0.9, "cpu", seed=3, steps=steps)
    seen = []
    for _ in range(steps):
        for layer in range(SHAPE.num_layers):
            a, b = lazy.next(layer), drawn.next(layer)
            for x, y in zip(a, b):
                assert torch.equal(x, y)
            seen.append(b[0].clone())
    assert all(not torch.equal(seen[i], seen[i + SHAPE.num_layers]) for i in range(len(seen) - SHAPE.num_layers))
    # past `steps` the stream starts over
    assert torch.equal(drawn.next(0)[0], seen[0])


def test_drift_queries_correlate_with_the_step_before():
    w = Workload(ModelShape(1, 8, 2, 64, torch.float32), 4, "drift", 0.9, "cpu", seed=0, steps=40)
    qs = [w.next(0)[0].flatten() for _ in range(40)]
    corr = torch.stack([torch.corrcoef(torch.stack((qs[t], qs[t + 1])))[0, 1] for t in range(39)]).mean()
    assert 0.8 < corr < 0.97


def test_warm_up_times_one_step_after_the_capturing_ones():
    calls = []

    def step():  # the first two calls (eager, capture) are slow and must not count
        calls.append(1)
        time.sleep(0.05 if len(calls) <= 2 else 0.01)

    args = SimpleNamespace(warmup=4, device="cpu")
    host_ms = warm_up(args, step)
    assert len(calls) == 4
    assert 9 <= host_ms < 40
    assert math.isnan(warm_up(SimpleNamespace(warmup=2, device="cpu"), step))


def test_a_whole_step_into_buffers_equals_per_layer_calls():
    """The step-graph benchmark writes a step's inputs into [L, ...] buffers in four copies: the same
    values, in the same stream, as L calls of next()."""
    L, B = SHAPE.num_layers, 2
    lazy = Workload(SHAPE, B, "drift", 0.9, "cpu", seed=5, steps=4)
    bulk = Workload(SHAPE, B, "drift", 0.9, "cpu", seed=5, steps=4)
    q = torch.empty((L, B, SHAPE.num_q_heads, SHAPE.head_dim), dtype=SHAPE.dtype)
    k = torch.empty((L, B, SHAPE.num_kv_heads, SHAPE.head_dim), dtype=SHAPE.dtype)
    v, c = torch.empty_like(k), torch.empty((L, B, SHAPE.num_kv_heads))
    for _ in range(6):  # past `steps` as well
        bulk.next_step_into(q, k, v, c)
        for layer in range(L):
            for x, y in zip(lazy.next(layer), (q[layer], k[layer], v[layer], c[layer])):
                assert torch.equal(x, y)


@pytest.fixture
def dt_tiny(monkeypatch):
    """decode_throughput with a "tiny" model (2 layers, Hq 4, Hkv 2, d 16) and context (300 tokens)."""
    import decode_throughput as dt

    monkeypatch.setitem(dt.MODELS, "tiny", (2, 4, 2, 16))
    monkeypatch.setitem(dt.CONTEXTS, "tiny", 300)
    return dt


def test_each_configuration_starts_after_the_previous_runtime_is_collected(dt_tiny, monkeypatch):
    """The runtime is a reference cycle (its CUDA graphs, micro-batches and step closure point back at
    it), so only the collector frees its GPU memory: with the collector off, a configuration must still
    start with every earlier runtime gone (the 1B 128K dense run ran out of HBM behind a dead one)."""
    import gc
    import weakref

    dt = dt_tiny
    made = []
    real = dt.synthetic_runtime

    def spy(*args, **kwargs):
        assert all(r() is None for r in made), "a configuration started beside a previous one's runtime"
        rt, ids = real(*args, **kwargs)
        made.append(weakref.ref(rt))
        return rt, ids

    monkeypatch.setattr(dt, "synthetic_runtime", spy)
    gc.disable()
    try:
        assert dt.main(["--device", "cpu", "--model", "tiny", "--contexts", "tiny", "--configs", "a,b,a",
                        "--views", "common", "--query-models", "drift", "--steps", "1", "--warmup", "2",
                        "--host-gib", "0.01", "--gpu-gib", "0.01", "--max-batch", "2"]) == 0
    finally:
        gc.enable()
    assert len(made) == 3


def test_two_homes_config_steps_an_offload_and_a_resident_runtime(dt_tiny, monkeypatch, tmp_path):
    """Config ac: (a) at its largest batch plus, stepped with it, a GPU-only runtime of the requests the
    HBM left over holds; the row counts both batches' tokens."""
    dt = dt_tiny
    made = []
    real = dt.synthetic_runtime

    def spy(shape, cfg, knobs, tokens, B, *args, gpu_only=False, **kwargs):
        rt, ids = real(shape, cfg, knobs, tokens, B, *args, gpu_only=gpu_only, **kwargs)
        made.append((B, gpu_only, rt))
        return rt, ids

    monkeypatch.setattr(dt, "synthetic_runtime", spy)
    out = tmp_path / "ac.md"
    assert dt.main(["--device", "cpu", "--model", "tiny", "--contexts", "tiny", "--configs", "ac", "--views", "max",
                    "--query-models", "drift", "--steps", "2", "--warmup", "3", "--host-gib", "0.0005",
                    "--gpu-gib", "0.002", "--max-batch", "3", "--step-graphs", "--micro-batches", "2",
                    "--out", str(out)]) == 0
    (B, offload_gpu_only, offload), (R, resident_gpu_only, resident) = made
    assert not offload_gpu_only and resident_gpu_only and B >= 1 and R >= 1
    lengths = {rt.seq_len(f"r{i}") for rt, n in ((offload, B), (resident, R)) for i in range(n)}
    assert len(lengths) == 1 and lengths.pop() >= 300 + 2 + 3  # both decoded every warm-up and timed step
    row = next(line for line in out.read_text().splitlines() if line.startswith("| max | ac |"))
    assert f"| {B}+{R} |" in row


def test_graphed_dense_baseline_attends_over_every_token_so_far():
    """Config dg: each step writes every layer's new k/v at position seq - 1 and attends over every
    token so far (float64 reference over the same cache: position bookkeeping, GQA, the tail block)."""
    from dense_decode import DenseGraphed

    shape = ModelShape(2, 4, 2, 16, torch.float32)
    args = SimpleNamespace(device="cpu", steps=3, warmup=2, drift_rho=0.9)
    B, T, bs = 3, 100, 64
    dense = DenseGraphed(args, shape, T, B)
    g = torch.Generator().manual_seed(5)
    dense.k.copy_(torch.randn(dense.k.shape, generator=g))  # never zeros: a wrong position shows
    dense.v.copy_(torch.randn(dense.v.shape, generator=g))
    nb = dense.slots.shape[-1]
    for step in range(3):
        dense.step()
        n = T + 1 + step  # tokens attended, the new one included
        for layer in range(shape.num_layers):
            K = dense.k[layer].view(B, shape.num_kv_heads, nb * bs, -1)[:, :, :n].double()
            V = dense.v[layer].view(B, shape.num_kv_heads, nb * bs, -1)[:, :, :n].double()
            assert torch.equal(K[:, :, n - 1], dense.kn[layer].double())  # the new token, where it belongs
            G = shape.num_q_heads // shape.num_kv_heads
            K, V = K.repeat_interleave(G, 1), V.repeat_interleave(G, 1)
            p = torch.softmax(torch.einsum("bhd,bhtd->bht", dense.q[layer].double(), K) / math.sqrt(16), -1)
            want = torch.einsum("bht,bhtd->bhd", p, V)
            torch.testing.assert_close(dense.out[layer].double(), want, atol=1e-4, rtol=1e-4)
    assert dense.seq.tolist() == [T + 4] * B


def test_two_homes_config_runs_each_host_batch_with_the_hbm_it_leaves(dt_tiny, monkeypatch, tmp_path):
    """--ac-host-batches: one ac run per host-homed batch (capped at (a)'s largest); a smaller one leaves
    more HBM, so at least as many resident requests step beside it."""
    dt = dt_tiny
    made = []
    real = dt.synthetic_runtime

    def spy(shape, cfg, knobs, tokens, B, *args, gpu_only=False, **kwargs):
        made.append((B, gpu_only))
        return real(shape, cfg, knobs, tokens, B, *args, gpu_only=gpu_only, **kwargs)

    monkeypatch.setattr(dt, "synthetic_runtime", spy)
    out = tmp_path / "ac.md"
    assert dt.main(["--device", "cpu", "--model", "tiny", "--contexts", "tiny", "--configs", "ac", "--views", "max",
                    "--query-models", "drift", "--steps", "1", "--warmup", "2", "--host-gib", "0.001",
                    "--gpu-gib", "0.01", "--max-batch", "8", "--ac-host-batches", "1,99", "--out", str(out)]) == 0
    (b1, g1), (r1, h1), (b2, g2), (r2, h2) = made
    assert (g1, h1, g2, h2) == (False, True, False, True)
    assert b1 == 1 < b2 and r1 >= r2 >= 1
    rows = [line for line in out.read_text().splitlines() if line.startswith("| max | ac |")]
    assert [f"| {b1}+{r1} |" in rows[0], f"| {b2}+{r2} |" in rows[1]] == [True, True]


def test_two_homes_host_batches_are_validated():
    import decode_throughput as dt

    for bad in ("0", "x"):
        with pytest.raises(SystemExit):
            dt.main(["--device", "cpu", "--configs", "ac", "--ac-host-batches", bad])


def test_decoupled_two_homes_count_each_loops_tokens(dt_tiny, monkeypatch, tmp_path):
    """Config ad: the resident runtime runs its own step loop, sized for SIDE_STEPS x --steps; the row's
    tok/s counts the steps each loop ran (on a CPU the loops alternate, one step each)."""
    dt = dt_tiny
    made = []
    real = dt.synthetic_runtime

    def spy(shape, cfg, knobs, tokens, B, max_seq_len, *args, gpu_only=False, **kwargs):
        rt, ids = real(shape, cfg, knobs, tokens, B, max_seq_len, *args, gpu_only=gpu_only, **kwargs)
        made.append((B, gpu_only, max_seq_len, rt))
        return rt, ids

    monkeypatch.setattr(dt, "synthetic_runtime", spy)
    out = tmp_path / "ad.md"
    assert dt.main(["--device", "cpu", "--model", "tiny", "--contexts", "tiny", "--configs", "ad", "--views", "max",
                    "--query-models", "drift", "--steps", "2", "--warmup", "3", "--host-gib", "0.001",
                    "--gpu-gib", "0.01", "--max-batch", "3", "--out", str(out)]) == 0
    (B, off_gpu_only, off_len, offload), (R, res_gpu_only, res_len, resident) = made
    assert not off_gpu_only and res_gpu_only and res_len - off_len == (dt.SIDE_STEPS - 1) * 2
    assert {offload.seq_len(f"r{i}") for i in range(B)} == {300 + 3 + 2}
    assert {resident.seq_len(f"r{i}") for i in range(R)} == {300 + 3 + 2}  # CPU: one side step per (a) step
    text = out.read_text()
    assert f"NOTE: max ad drift {B}+{R}: the resident loop ran 2 steps while (a) ran 2" in text
