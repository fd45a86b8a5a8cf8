"""Decode selection scores, top-k and incremental compression equal the reference (NOSA_SPEC.md).

CPU: Triton kernels under TRITON_INTERPRET=1 (tests/conftest.py) and the torch paths; GPU: marked.
Selections are compared as sorted id lists: both sides break ties toward the lower block id.
"""

from __future__ import annotations


import pytest
import torch

from kernel_checks import SMALL

from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels import topk as topk_module
from nosa_sglang.kernels import selection as SEL
from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.kernels.compress import complete_chunks, complete_chunks_torch
from nosa_sglang.kernels.selection import (
    append_new_chunks, chunk_completes, compress_new_chunks, decode_block_scores, eviction_block_scores,
    max_blocks_for_chunks, select_topk,
)
from nosa_sglang.reference import (
    block_max_pool, chunk_query_scores, compress_eviction, compress_keys, select_blocks_decode,
    select_from_block_scores,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["triton", "torch"]


def poison_like(t: torch.Tensor) -> None:
    t.fill_(float("nan"))


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def padded_chunks(k, c, seq_lens, cfg, cmax_extra=3):
    """Per-request compressed keys / eviction means from the reference, padded to a common Cmax with NaN."""
    n = [cfg.num_chunks(L) for L in seq_lens]
    cmax = max(n) + cmax_extra
    B, _, hkv, d = k.shape
    ck = torch.full((B, cmax, hkv, d), float("nan"), device=DEVICE)
    ce = torch.full((B, cmax, hkv), float("nan"), device=DEVICE)
    for b, L in enumerate(seq_lens):
        ck[b, : n[b]] = compress_keys(k[b, :L].float(), cfg)
        ce[b, : n[b]] = compress_eviction(c[b, :L].float(), cfg)
    return ck, ce, torch.tensor(n, dtype=torch.int32, device=DEVICE)


def expected_scores(q, ck, ce, n, seq_lens, cfg, nb):
    """Reference S (forced +inf, absent -inf) and E (absent -inf) of each request's decode token."""
    S, E = [], []
    b_ids = torch.arange(nb, device=DEVICE)
    for b, L in enumerate(seq_lens):
        s = chunk_query_scores(q[b : b + 1].float(), ck[b, : n[b]].float())[0]
        e = ce[b, : n[b]].T
        Sb, Eb = block_max_pool(s, nb, cfg), block_max_pool(e, nb, cfg)
        qb = (L - 1) // cfg.block_size
        forced = (b_ids <= qb) & ((b_ids < cfg.init_blocks) | (b_ids >= qb - cfg.local_blocks))
        S.append(torch.where(forced, float("inf"), Sb).masked_fill(b_ids > qb, float("-inf")))
        E.append(Eb.masked_fill(b_ids > qb, float("-inf")))
    return torch.stack(S), torch.stack(E)


def assert_scores_close(got, want, rtol):
    assert torch.equal(torch.isposinf(got), torch.isposinf(want))
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    assert not got.isnan().any()
    torch.testing.assert_close(got[fin], want[fin], rtol=rtol, atol=rtol * want[fin].abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (8, 1)])
def test_block_scores_match_reference(gen, dtype, impl, hq, hkv):
    lens = [203, 61, 8, 5]  # tails, not multiples of 16, one chunk, no chunk at all
    q, k, c = randn(gen, 4, hq, 64, dtype=dtype), randn(gen, 4, 203, hkv, 64, dtype=dtype), randn(gen, 4, 203, hkv)
    ck, ce, n = padded_chunks(k, c, lens, SMALL)
    ck = ck.to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    nb = max_blocks_for_chunks(ck.shape[1], SMALL)
    want_S, want_E = expected_scores(q, ck, ce, n, lens, SMALL, nb)
    S = decode_block_scores(q, ck, n, sl, SMALL, impl=impl)
    E = eviction_block_scores(ce, n, sl, SMALL, impl=impl)
    assert S.shape == (4, hkv, nb) and S.dtype == torch.float32
    assert_scores_close(S, want_S, 1e-4 if dtype == torch.float32 else 1e-2)
    assert_scores_close(E, want_E, 1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4)])
def test_pooled_ties_stay_bit_identical(gen, impl, hq, hkv):
    """Neighbouring blocks that pool the same boundary chunk get the same fp32 score bit for bit, so the
    top-k's tie rule (lower id) decides exactly as in the reference (on an H200 the chunk's score was
    once computed in two lanes and rounded apart, flipping the selection)."""
    lens = [400, 390, 377, 360, 341, 300, 250, 177]  # ~30 tied pairs expected: the threshold is robust
    q, k = randn(gen, 8, hq, 64), randn(gen, 8, 400, hkv, 64)
    c = randn(gen, 8, 400, hkv)
    ck, ce, n = padded_chunks(k, c, lens, SMALL)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    nb = max_blocks_for_chunks(ck.shape[1], SMALL)
    want_S, _ = expected_scores(q.double(), ck.double(), ce.double(), n, lens, SMALL, nb)
    S = decode_block_scores(q, ck, n, sl, SMALL, impl=impl)
    fin = torch.isfinite(want_S[..., :-1]) & torch.isfinite(want_S[..., 1:])
    tied = fin & (want_S[..., :-1] == want_S[..., 1:])  # fp64 pooled the same chunk
    assert int(tied.sum()) >= 5  # the shared chunk wins often: the test has something to check
    assert torch.equal(S[..., :-1][tied], S[..., 1:][tied])


@pytest.mark.parametrize("impl", IMPLS)
def test_scores_read_through_rows_equal_the_gathered_batch(gen, impl):
    """rows= reads each request's K~ and chunk means in place from a runtime's state (rows in any order,
    poisoned rows between them): the same S and E bit for bit as the gathered batch."""
    lens = [203, 61, 130]
    q, k, c = randn(gen, 3, 8, 64), randn(gen, 3, 203, 2, 64), randn(gen, 3, 203, 2)
    ck, ce, n = padded_chunks(k, c, lens, SMALL)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([4, 0, 2], device=DEVICE)
    ck_all = torch.full((5, *ck.shape[1:]), float("nan"), device=DEVICE)
    ce_all = torch.full((5, *ce.shape[1:]), float("nan"), device=DEVICE)
    ck_all[rows], ce_all[rows] = ck, ce
    S = decode_block_scores(q, ck_all, n, sl, SMALL, impl=impl, rows=rows)
    E = eviction_block_scores(ce_all, n, sl, SMALL, impl=impl, rows=rows)
    assert torch.equal(S, decode_block_scores(q, ck, n, sl, SMALL, impl=impl))
    assert torch.equal(E, eviction_block_scores(ce, n, sl, SMALL, impl=impl))
    with pytest.raises(KernelArgumentError, match=r"rows: expected shape \[3\]"):
        decode_block_scores(q, ck_all, n, sl, SMALL, impl=impl, rows=rows[:2])


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_selection_equals_reference(gen, impl):
    lens = [250, 117, 40]
    q, k, c = randn(gen, 3, 8, 64), randn(gen, 3, 250, 2, 64), randn(gen, 3, 250, 2)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ck, ce, n = padded_chunks(k, c, lens, SMALL)
    S = decode_block_scores(q, ck, n, sl, SMALL, impl=impl)
    E = eviction_block_scores(ce, n, sl, SMALL, impl=impl)
    sel = select_topk(S, E, sl, SMALL, impl=impl)
    assert sel.dtype == torch.int32 and sel.shape == (3, 2, SMALL.topk_blocks)
    assert torch.equal(sel.long(), select_blocks_decode(q, k, c, sl, SMALL))


@pytest.mark.parametrize("dot", ["ieee", "tf32x3"])
def test_chunk_logits_fp32_products_match_float64(gen, dot):
    """Kernel 1's fp32-K~ products (FP32_SCORES_DOT picks one on a GPU) on 2 requests, one shorter than
    the buffer, split in two: every visible logit within fp32 rounding of float64, none written past n."""
    B, hq, hkv, d, cmax = 2, 8, 2, 64, 100
    q, ck = randn(gen, B, hq, d), randn(gen, B, cmax, hkv, d)
    n = torch.tensor([100, 77], dtype=torch.int32, device=DEVICE)
    G = hq // hkv
    w = torch.full((B, hkv, G, cmax), float("nan"), device=DEVICE)
    m, s = torch.empty((B, hkv, G, 2), device=DEVICE), torch.empty((B, hkv, G, 2), device=DEVICE)
    SEL._chunk_logits_kernel[(B * hkv, 2)](
        q, ck, n, n, w, m, s, SEL.LOG2E / d ** 0.5, hkv, cmax, 64, q.stride(0), q.stride(1), ck.stride(0),
        ck.stride(1), ck.stride(2), G=G, BLOCK_G=16, HEAD_DIM=d, BLOCK_C=32, DOT=dot,
        HAS_ROWS=False, WAIT=False)
    want = torch.einsum("bhgd,bchd->bhgc", q.double().view(B, hkv, G, d), ck.double()) * SEL.LOG2E / d ** 0.5
    for b, nb in enumerate(n.tolist()):
        torch.testing.assert_close(w[b, ..., :nb].double(), want[b, ..., :nb], rtol=0, atol=1e-5)
        assert w[b, ..., nb:].isnan().all()


def use_search(monkeypatch, search) -> None:
    """The top-k kernel's k-th-value search at one row per program: "binary" or "radix" (at any batch)."""
    monkeypatch.setattr(topk_module, "RADIX_SELECT", search == "radix")
    monkeypatch.setattr(topk_module, "RADIX_ROWS_PER_SM", 1 << 20)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("policy", ["nosa", "infllmv2"])
@pytest.mark.parametrize("packed", [False, True, "binary"], ids=["row-per-program", "rows-packed", "binary"])
def test_topk_rule_with_ties_equals_reference(gen, impl, policy, packed, monkeypatch):
    """Scores drawn from a few values (many ties), rows of different lengths (-1 padding); Triton with
    one row per program (decode batches: radix select, or the binary search) and with rows packed 16 to
    a program (prefill's many rows: the binary search)."""
    if packed == "binary":
        use_search(monkeypatch, "binary")
    elif packed:
        monkeypatch.setattr(topk_module, "PACK_ROWS_PER_SM", 0)
    B, hkv, nb = 5, 3, 40
    S = torch.randint(0, 4, (B, hkv, nb), generator=gen).float().to(DEVICE)
    E = torch.randint(0, 4, (B, hkv, nb), generator=gen).float().to(DEVICE)
    S[0, 0, 7] = float("-inf")
    lens = [640, 33, 100, 1, 400]
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    qb = ((sl.long() - 1) // SMALL.block_size)[:, None].expand(B, hkv)
    cfg = SMALL if policy == "nosa" else NosaConfig(**{**SMALL.to_dict(), "query_blocks": SMALL.topk_blocks})
    want = select_from_block_scores(S, E, qb, cfg)
    got = select_topk(S, E if policy == "nosa" else None, sl, SMALL, policy=policy, impl=impl)
    assert torch.equal(got.long(), want)


@pytest.mark.parametrize("search", ["binary", "radix"])
def test_topk_search_changes_nothing(gen, search, monkeypatch):
    """The binary search and the radix select cut where the reference does: ties, -inf, +inf,
    all-equal rows, rows shorter than k, and the full fp32 range (signs, huge and tiny magnitudes)."""
    use_search(monkeypatch, search)
    B, hkv, nb = 4, 2, 300
    S = torch.randint(0, 4, (B, hkv, nb), generator=gen).float()
    E = torch.randn(B, hkv, nb, generator=gen) * torch.logspace(-30, 30, nb)[torch.randperm(nb, generator=gen)]
    S[1] = torch.randn(hkv, nb, generator=gen) * 1e30
    S[2, 0] = 1.5  # one value everywhere
    E[2, 1, ::7] = float("inf")
    E[3, 0, ::3] = float("-inf")
    S, E = S.to(DEVICE), E.to(DEVICE)
    cfg = NosaConfig()
    sl = torch.tensor([300 * 64, 5000, 19000, 65], dtype=torch.int32, device=DEVICE)
    qb = ((sl.long() - 1) // cfg.block_size)[:, None].expand(B, hkv)
    want = select_from_block_scores(S, E, qb, cfg)
    assert torch.equal(select_topk(S, E, sl, cfg, impl="triton").long(), want)


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_long_rows(gen, impl):
    """NB beyond one Triton tile of rows (2K blocks: a 128K context at block 64)."""
    cfg = NosaConfig()
    B, hkv, nb = 2, 2, 2048
    S, E = randn(gen, B, hkv, nb), randn(gen, B, hkv, nb)
    sl = torch.tensor([131072, 70001], dtype=torch.int32, device=DEVICE)
    qb = ((sl.long() - 1) // cfg.block_size)[:, None].expand(B, hkv)
    assert torch.equal(select_topk(S, E, sl, cfg, impl=impl).long(), select_from_block_scores(S, E, qb, cfg))


def test_incremental_compression_equals_whole_prompt(gen):
    """Appending tokens one by one yields the reference compressed keys of the whole sequence."""
    B, L, hkv, d = 2, 45, 2, 16
    k, c = randn(gen, B, L, hkv, d), randn(gen, B, L, hkv)
    cmax = SMALL.num_chunks(L) + 2
    ck_buf = torch.full((B, cmax, hkv, d), float("nan"), device=DEVICE)
    ce_buf = torch.full((B, cmax, hkv), float("nan"), device=DEVICE)
    n = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    ks = SMALL.kernel_size
    for t in range(1, L + 1):
        sl = torch.full((B,), t, dtype=torch.int32, device=DEVICE)
        if t >= ks:
            append_new_chunks(ck_buf, ce_buf, n, k[:, t - ks : t], c[:, t - ks : t], sl, SMALL)
        assert n.tolist() == [SMALL.num_chunks(t)] * B
    nc = SMALL.num_chunks(L)
    torch.testing.assert_close(ck_buf[:, :nc], compress_keys(k, SMALL), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce_buf[:, :nc], compress_eviction(c, SMALL), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ck_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [SMALL, NosaConfig()], ids=["small", "default"])
def test_complete_chunks_kernel_equals_torch_statement(gen, ck_dtype, cfg):
    """The decode step's chunk completion (one launch) against its torch statement on random state: rows
    in any order, some completing a chunk and some not (those must stay bit for bit untouched), a window
    at the start of the sequence (pos + 1 == kernel_size)."""
    if DEVICE == "cpu" and not SEL.interpret_mode():
        pytest.skip("needs TRITON_INTERPRET=1 (set by the test command on machines without CUDA)")
    R, cmax, H, d, T, ks = 6, 9, 2, 16, 200, cfg.kernel_size
    state = (randn(gen, R, cmax, H, d).to(ck_dtype), randn(gen, R, cmax, H),
             randn(gen, R, ks, H, d, dtype=torch.bfloat16), randn(gen, R, H, T))
    rows = torch.tensor([4, 1, 3, 0], device=DEVICE)
    pos = torch.tensor([ks - 1, 150, 77, 120], device=DEVICE)
    completes = torch.tensor([1, 0, 1, 1], device=DEVICE)
    chunk_ids = torch.tensor([0, 5, 8, 3], device=DEVICE)
    want = [t.clone() for t in state]
    complete_chunks_torch(*want, rows, pos, completes, chunk_ids, cfg)
    got = [t.clone() for t in state]
    complete_chunks(*got, rows, pos, completes, chunk_ids, cfg, impl="triton")
    torch.testing.assert_close(got[0], want[0], rtol=1e-6 if ck_dtype == torch.float32 else 1e-2, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    assert not torch.equal(want[0], state[0]) and not torch.equal(want[1], state[1]), "the case must write"
    untouched = torch.ones(R, cmax, dtype=torch.bool)
    untouched[[4, 3, 0], [0, 8, 3]] = False
    assert torch.equal(got[0][untouched], state[0][untouched]) and torch.equal(got[1][untouched], state[1][untouched])
    window = state[3][3, :, 77 + 1 - ks : 78]  # row 3's chunk mean: its last kernel_size biases
    torch.testing.assert_close(got[1][3, 8], window.mean(dim=-1), rtol=1e-6, atol=1e-6)


def test_chunk_completes_every_stride():
    L = torch.arange(1, 30)
    got = chunk_completes(L, SMALL)
    want = torch.tensor([SMALL.num_chunks(x) > SMALL.num_chunks(x - 1) for x in L.tolist()])
    assert torch.equal(got, want)


def test_compress_new_chunks_is_window_mean(gen):
    k, c = randn(gen, 3, SMALL.kernel_size, 2, 16), randn(gen, 3, SMALL.kernel_size, 2)
    new = compress_new_chunks(k, c, SMALL)
    torch.testing.assert_close(new.ck, k.mean(1))
    torch.testing.assert_close(new.ce, c.mean(1))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: decode_block_scores(torch.zeros(2, 4, 64), torch.zeros(3, 5, 2, 64), torch.zeros(2, dtype=torch.int32),
                                     torch.ones(2, dtype=torch.int32), SMALL), r"^ck: expected"),
        (lambda: decode_block_scores(torch.zeros(2, 4, 64), torch.zeros(2, 5, 3, 64), torch.zeros(2, dtype=torch.int32),
                                     torch.ones(2, dtype=torch.int32), SMALL), r"^q: Hq=4"),
        (lambda: decode_block_scores(torch.zeros(2, 4, 64), torch.zeros(2, 5, 2, 64), torch.zeros(3, dtype=torch.int32),
                                     torch.ones(2, dtype=torch.int32), SMALL), r"^n_chunks: expected shape"),
        (lambda: decode_block_scores(torch.zeros(2, 4, 64), torch.zeros(2, 5, 2, 64), torch.zeros(2, dtype=torch.int32),
                                     torch.ones(2), SMALL), r"^seq_lens: dtype"),
        (lambda: decode_block_scores(torch.zeros(2, 4, 64), torch.zeros(2, 5, 2, 64), torch.zeros(2, dtype=torch.int32),
                                     torch.ones(2, dtype=torch.int32), SMALL, num_blocks=0), r"^num_blocks:"),
        (lambda: eviction_block_scores(torch.zeros(2, 5, 2, dtype=torch.float16), torch.zeros(2, dtype=torch.int32),
                                       torch.ones(2, dtype=torch.int32), SMALL), r"^ce: dtype"),
        (lambda: select_topk(torch.zeros(2, 2, 8), torch.zeros(2, 2, 9), torch.ones(2, dtype=torch.int32), SMALL),
         r"^E: expected shape"),
        (lambda: select_topk(torch.zeros(2, 2, 8), None, torch.ones(2, dtype=torch.int32), SMALL, policy="top"),
         r"^policy:"),
        (lambda: compress_new_chunks(torch.zeros(2, 7, 2, 16), torch.zeros(2, 7, 2), SMALL), r"^k_tail: dim 1"),
    ],
)
def test_argument_errors_name_the_argument(call, match):
    with pytest.raises(KernelArgumentError, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("fp32_dot", ["ieee", "tf32x3"])
def test_gpu_decode_selection_real_sizes(gen, batch, fp32_dot, monkeypatch):
    """Default NOSA config, d 128, 8B-like heads, 16K context (bf16 keys, fp32 K~ under each fp32 product
    kernel 1 can use, and bf16 K~)."""
    monkeypatch.setattr(SEL, "FP32_SCORES_DOT", fp32_dot)
    cfg = NosaConfig()
    lens = [16384, 16000 + 37, 12345, 9000][:batch]
    L = max(lens)
    q, k, c = randn(gen, batch, 32, 128, dtype=torch.bfloat16), randn(gen, batch, L, 8, 128, dtype=torch.bfloat16), \
        randn(gen, batch, L, 8)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ck, ce, n = padded_chunks(k, c, lens, cfg)
    nb = max_blocks_for_chunks(ck.shape[1], cfg)
    want_S, want_E = expected_scores(q, ck, ce, n, lens, cfg, nb)
    S = decode_block_scores(q, ck, n, sl, cfg)  # fp32 K~: exact selection expected
    E = eviction_block_scores(ce, n, sl, cfg)
    assert_scores_close(S, want_S, 1e-3)
    assert_scores_close(E, want_E, 1e-6)
    assert torch.equal(select_topk(S, E, sl, cfg).long(), select_blocks_decode(q, k, c, sl, cfg))
    S16 = decode_block_scores(q, ck.to(torch.bfloat16), n, sl, cfg)
    assert_scores_close(S16, want_S, 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (CPU twin: test_topk_rule_with_ties_equals_reference)")
@pytest.mark.parametrize("nb", [16, 40, 100, 300])
def test_gpu_radix_select_on_short_rows(gen, nb, monkeypatch):
    """Radix select compiled for sm_90 on rows shorter than a warp's lanes x warps (contexts under ~8K
    tokens), where each histogram input element is held by several threads: ties, -inf, rows shorter
    than k, both policies."""
    use_search(monkeypatch, "radix")
    cfg = NosaConfig()
    B, hkv = 12, 8
    S = torch.randint(0, 5, (B, hkv, nb), generator=gen).float().to(DEVICE)
    E = torch.randint(0, 5, (B, hkv, nb), generator=gen).float().to(DEVICE)
    S[0, 0, ::3] = float("-inf")
    sl = torch.randint(1, nb * cfg.block_size + 1, (B,), generator=gen).to(torch.int32).to(DEVICE)
    qb = ((sl.long() - 1) // cfg.block_size)[:, None].expand(B, hkv)
    for policy in ("nosa", "infllmv2"):
        pcfg = cfg if policy == "nosa" else NosaConfig(**{**cfg.to_dict(), "query_blocks": cfg.topk_blocks})
        want = select_from_block_scores(S, E, qb, pcfg)
        assert torch.equal(select_topk(S, E if policy == "nosa" else None, sl, cfg, policy=policy).long(), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (CPU twin: test_topk_search_changes_nothing)")
@pytest.mark.parametrize("search", ["binary", "radix"])
def test_gpu_topk_search_at_128k(gen, search, monkeypatch):
    """The binary search and the radix select compiled for sm_90 at a 128K context's 2048 blocks: ties
    and wide ranges."""
    use_search(monkeypatch, search)
    cfg = NosaConfig()
    B, hkv, nb = 16, 8, 2048
    S = torch.randint(0, 50, (B, hkv, nb), generator=gen).float().to(DEVICE) / 7
    E = randn(gen, B, hkv, nb) * 10.0 ** torch.randint(-20, 20, (B, hkv, nb), generator=gen).float().to(DEVICE)
    sl = torch.randint(64, 131072, (B,), generator=gen).to(torch.int32).to(DEVICE)
    qb = ((sl.long() - 1) // cfg.block_size)[:, None].expand(B, hkv)
    assert torch.equal(select_topk(S, E, sl, cfg).long(), select_from_block_scores(S, E, qb, cfg))
