import pytest
import torch

import spec_bruteforce as spec
from nosa_sglang.config import NosaConfig
from nosa_sglang.reference import (
    block_max_pool,
    chunk_query_scores,
    compress_eviction,
    compress_keys,
    eviction_bias,
    select_blocks_decode,
    select_blocks_prefill,
)

SMALL = NosaConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, local_blocks=2, query_blocks=5, topk_blocks=8)


def random_seq(seed, L, hq, hkv, d, dtype=torch.float64):
    """q, k, v, c of one sequence; c from the eviction head with nonzero A (no ties)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, hq, d, generator=g, dtype=dtype)
    k = torch.randn(L, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(L, hkv, d, generator=g, dtype=dtype)
    A = torch.rand(hkv, generator=g, dtype=dtype) + 0.5
    W = torch.randn(hkv, hkv * d, generator=g, dtype=dtype) / d**0.5
    return q, k, v, eviction_bias(v, A, W)


def as_sets(sel):
    return {h: sorted(int(b) for b in sel[h] if b >= 0) for h in range(sel.shape[0])}


def test_compress_keys_is_the_mean_of_each_complete_window():
    k = torch.randn(2, 100, 3, 4, dtype=torch.float64)
    ck = compress_keys(k, NosaConfig())
    assert ck.shape == (2, 5, 3, 4)
    for i in range(5):
        torch.testing.assert_close(ck[:, i], k[:, 16 * i : 16 * i + 32].mean(1))
    assert compress_eviction(torch.randn(31, 2), NosaConfig()).shape == (0, 2)


def test_block_max_pool_window_is_r_plus_one_chunks_with_left_padding():
    s = torch.arange(10, dtype=torch.float64)  # chunk i scores i
    pooled = block_max_pool(s, 3, NosaConfig())  # r = 4: windows [-1,4), [3,8), [7,12)
    assert pooled.tolist() == [3.0, 7.0, 9.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("L", [1, 31, 100, 129, 160, 211, 256, 333])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 1), (8, 1)])
def test_decode_selection_matches_the_spec_small_config(seed, L, hq, hkv):
    q, k, v, c = random_seq(seed + 10 * L, L, hq, hkv, 8)
    sel = select_blocks_decode(q[-1:], k[None], c[None], torch.tensor([L]), SMALL)[0]
    assert as_sets(sel) == spec.select(q[-1], k, c, L - 1, SMALL)
    assert sel.shape == (hkv, SMALL.topk_blocks)


@pytest.mark.parametrize("L", [4097, 4500, 5000])
def test_decode_selection_matches_the_spec_default_config(L):
    q, k, v, c = random_seq(L, L, 4, 2, 16)
    sel = select_blocks_decode(q[-1:], k[None], c[None], torch.tensor([L]), NosaConfig())[0]
    assert as_sets(sel) == spec.select(q[-1], k, c, L - 1, NosaConfig())


@pytest.mark.parametrize("seed", range(5))
def test_forced_blocks_are_always_selected(seed):
    cfg = NosaConfig()
    L = 4200 + 37 * seed
    q, k, v, c = random_seq(seed, L, 2, 2, 8)
    sel = select_blocks_decode(q[-1:], k[None], c[None], torch.tensor([L]), cfg)[0]
    qb = (L - 1) // cfg.block_size
    forced = {0, *range(qb - cfg.local_blocks, qb + 1)}
    for h in range(2):
        assert forced <= set(sel[h].tolist())
        assert len(set(sel[h].tolist())) == cfg.topk_blocks


@pytest.mark.parametrize("seed", range(3))
def test_query_part_is_top_query_blocks_then_eviction_fill(seed):
    cfg = SMALL
    L = 300 + seed
    q, k, v, c = random_seq(seed, L, 4, 2, 8)
    sel = as_sets(select_blocks_decode(q[-1:], k[None], c[None], torch.tensor([L]), cfg)[0])
    nb, qb = cfg.num_blocks(L), (L - 1) // cfg.block_size
    S = block_max_pool(chunk_query_scores(q[-1:], compress_keys(k, cfg))[0], nb, cfg)
    E = block_max_pool(compress_eviction(c, cfg).T, nb, cfg)
    for h in range(2):
        forced = {0, *range(qb - cfg.local_blocks, qb + 1)}
        free = [b for b in S[h].sort(descending=True, stable=True).indices.tolist() if b not in forced]
        Q = forced | set(free[: cfg.query_blocks - len(forced)])
        fill = [b for b in E[h].sort(descending=True, stable=True).indices.tolist() if b not in Q][: cfg.topk_blocks - len(Q)]
        assert set(sel[h]) == Q | set(fill)


def test_overlapping_windows_tie_and_ties_go_to_the_lower_block_id():
    # adjacent blocks share one chunk (window r + 1 chunks, stride r): equal block scores are common
    # even with nonzero A, so the tie rule is part of the contract, not an accident of sorting.
    cfg = SMALL
    L = 300
    q, k, v, c = random_seq(1, L, 4, 2, 8)
    E = block_max_pool(compress_eviction(c, cfg).T, cfg.num_blocks(L), cfg)
    assert (E[:, 1:] == E[:, :-1]).any()
    S = torch.zeros(1, 6)
    Ez = torch.tensor([[0.0, 5.0, 5.0, 5.0, 1.0, 0.0]])
    tiny = NosaConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, local_blocks=1, query_blocks=3, topk_blocks=5)
    from nosa_sglang.reference import select_from_block_scores

    sel = select_from_block_scores(S, Ez, torch.tensor([5]), tiny)
    assert sel[0].tolist() == [0, 1, 2, 4, 5]  # forced 0, 4, 5; then E ties 1, 2 (not 3)


def test_short_sequences_select_every_block_and_pad_with_minus_one():
    q, k, v, c = random_seq(0, 70, 2, 1, 8)
    sel = select_blocks_decode(q[-1:], k[None], c[None], torch.tensor([70]), SMALL)[0]
    assert sel[0].tolist() == [0, 1, 2, 3, 4, -1, -1, -1]


def test_batch_with_different_lengths_equals_each_alone():
    cfg = SMALL
    lens = [40, 333, 201, 97]
    seqs = [random_seq(i, max(lens), 4, 2, 8) for i in range(len(lens))]
    Lmax = max(lens)
    q = torch.stack([s[0][L - 1] for s, L in zip(seqs, lens)])
    k = torch.stack([s[1] for s in seqs])
    c = torch.stack([s[3] for s in seqs])
    batch = select_blocks_decode(q, k, c, torch.tensor(lens), cfg)
    for i, L in enumerate(lens):
        alone = select_blocks_decode(q[i : i + 1], k[i : i + 1, :L], c[i : i + 1, :L], torch.tensor([L]), cfg)
        assert torch.equal(batch[i], alone[0])


@pytest.mark.parametrize("cfg", [SMALL, NosaConfig()], ids=["small", "default"])
def test_prefill_selection_of_token_t_equals_decode_at_t(cfg):
    L = 400 if cfg is SMALL else 4400
    q, k, v, c = random_seq(3, L, 4, 2, 8)
    pre = select_blocks_prefill(q, k, c, cfg)
    for t in [0, 5, 63, 64, 130, L // 2, L - 2, L - 1]:
        dec = select_blocks_decode(q[t : t + 1], k[None, : t + 1], c[None, : t + 1], torch.tensor([t + 1]), cfg)
        assert torch.equal(pre[t], dec[0]), t


@pytest.mark.parametrize("t", [7, 100, 250, 399])
def test_prefill_selection_matches_the_spec(t):
    q, k, v, c = random_seq(5, 400, 4, 2, 8)
    pre = select_blocks_prefill(q, k, c, SMALL)
    assert as_sets(pre[t]) == spec.select(q[t], k, c, t, SMALL)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: select_blocks_decode(torch.randn(1, 3, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2), torch.tensor([9]), SMALL), "q"),
        (lambda: select_blocks_decode(torch.randn(1, 4, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 3), torch.tensor([9]), SMALL), "c_cache"),
        (lambda: select_blocks_decode(torch.randn(1, 4, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2), torch.tensor([10]), SMALL), "seq_lens"),
        (lambda: select_blocks_decode(torch.randn(1, 4, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2), torch.tensor([0]), SMALL), "seq_lens"),
        (lambda: select_blocks_decode(torch.randn(2, 4, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2), torch.tensor([9]), SMALL), "q"),
        (lambda: select_blocks_decode(torch.randn(1, 4, 8), torch.randn(9, 2, 8), torch.randn(1, 9, 2), torch.tensor([9]), SMALL), "k_cache"),
        (lambda: select_blocks_prefill(torch.randn(9, 4, 8), torch.randn(8, 2, 8), torch.randn(8, 2), SMALL), "q"),
    ],
)
def test_selection_rejects_bad_arguments_by_name(call, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call()
