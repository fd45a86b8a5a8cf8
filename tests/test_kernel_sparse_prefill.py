"""Sparse prefill attention and prefill selection equal the reference (NOSA_SPEC.md).

CPU: Triton kernels under TRITON_INTERPRET=1 (tests/conftest.py) and the torch paths; GPU: marked.
"""

from __future__ import annotations


import pytest
import torch

from kernel_checks import SMALL, TOL, poisoned_allocations, rel_err

from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.kernels.sparse_prefill import select_blocks_prefill, sparse_prefill_attention, union_blocks
from nosa_sglang.reference import nosa_prefill_attention
from nosa_sglang.reference import select_blocks_prefill as reference_select

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def packed_topk_rows_on_cpu(monkeypatch):
    """Under the Triton interpreter each program costs milliseconds: prefill's hundreds of top-k rows
    run packed 16 to a program here (both row layouts are checked in test_kernel_selection.py)."""
    if DEVICE == "cpu":
        from nosa_sglang.kernels import topk

        monkeypatch.setattr(topk, "PACK_ROWS_PER_SM", 0)


IMPLS = ["triton", "torch"]


def overlap(sel: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of the reference's selected blocks that `sel` selected too (per row, as sets)."""
    chosen = ref >= 0
    shared = (sel.long()[..., :, None] == ref[..., None, :]).any(-2) & chosen
    return (shared.sum() / chosen.sum()).item()


def inputs(gen, T, hq, hkv, d, dtype):
    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dt).to(DEVICE)

    return r(T, hq, d), r(T, hkv, d), r(T, hkv, d), r(T, hkv, dt=torch.float32) * 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (8, 1)])
def test_attention_matches_reference(gen, dtype, impl, hq, hkv):
    T = 187  # not a multiple of 16: partial tail block and tile
    q, k, v, c = inputs(gen, T, hq, hkv, 64, dtype)
    blocks = reference_select(q, k, c, SMALL)
    ref = nosa_prefill_attention(q, k, v, c, SMALL, blocks=blocks)
    with poisoned_allocations():
        out = sparse_prefill_attention(q, k, v, c, blocks.to(torch.int32), SMALL.block_size, impl=impl)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_with_arbitrary_block_lists(gen, impl):
    """Unsorted lists with -1 padding and repeats: the kernel treats each token's list as a set."""
    T, hkv = 100, 2
    q, k, v, c = inputs(gen, T, 4, hkv, 64, torch.float32)
    own = (torch.arange(T, device=DEVICE) // SMALL.block_size)[:, None, None].expand(T, hkv, 1)
    rand = torch.randint(-1, 7, (T, hkv, 5), generator=gen).to(DEVICE)
    blocks = torch.cat([rand, own], -1).to(torch.int32)  # every token sees its own block
    ref_blocks = torch.where(blocks > own, -1, blocks).long()  # blocks after a token hold no visible key
    ref = nosa_prefill_attention(q, k, v, c, SMALL, blocks=ref_blocks)
    with poisoned_allocations():
        out = sparse_prefill_attention(q, k, v, c, blocks, SMALL.block_size, impl=impl)
    assert rel_err(out, ref) <= 1e-4


def test_block_64_head_dim_128(gen):
    cfg = NosaConfig(block_size=64, kernel_stride=16, kernel_size=32, init_blocks=1, local_blocks=1,
                     query_blocks=3, topk_blocks=4)
    q, k, v, c = inputs(gen, 330, 4, 1, 128, torch.bfloat16)
    blocks = reference_select(q, k, c, cfg)
    ref = nosa_prefill_attention(q, k, v, c, cfg, blocks=blocks)
    with poisoned_allocations():
        sel = select_blocks_prefill(q, k, c, cfg)
        out = sparse_prefill_attention(q, k, v, c, blocks.to(torch.int32), cfg.block_size)
    assert overlap(sel, blocks) >= 0.98
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_selection_equals_reference(gen, dtype, impl, hq, hkv):
    q, k, _, c = inputs(gen, 203, hq, hkv, 64, dtype)
    with poisoned_allocations():
        sel = select_blocks_prefill(q, k, c, SMALL, impl=impl)
    assert sel.dtype == torch.int32 and sel.shape == (203, hkv, SMALL.topk_blocks)
    ref = reference_select(q, k, c, SMALL)
    if dtype == torch.float32 or impl == "torch":
        assert torch.equal(sel.long(), ref)
    else:  # the Triton path scores against bf16 K~: a near-tie may flip one free pick
        assert overlap(sel, ref) >= 0.98
        keyed = torch.where(sel < 0, torch.iinfo(torch.int32).max, sel)
        assert torch.equal(keyed.sort(-1).values, keyed)  # still ascending, -1 padding last


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("q_start", [64, 150])
def test_extend_after_a_prefix_equals_the_prompt_rows(gen, impl, q_start):
    """An extend (cached prefix or earlier chunk of q_start tokens) gives the rows q_start.. of the
    whole prompt's prefill: both the selection and the attention."""
    T = 203
    q, k, v, c = inputs(gen, T, 8, 2, 64, torch.float32)
    blocks = reference_select(q, k, c, SMALL)
    ref = nosa_prefill_attention(q, k, v, c, SMALL, blocks=blocks)
    with poisoned_allocations():
        sel = select_blocks_prefill(q[q_start:], k, c, SMALL, impl=impl, q_start=q_start)
        out = sparse_prefill_attention(q[q_start:], k, v, c, sel, SMALL.block_size, impl=impl, q_start=q_start)
    assert torch.equal(sel.long(), blocks[q_start:])
    assert rel_err(out, ref[q_start:]) <= 1e-4


def test_extend_argument_errors():
    q, k, v, c = (torch.randn(10, 4, 64), torch.randn(12, 2, 64), torch.randn(12, 2, 64), torch.randn(12, 2))
    for bad in (1, -2, 2.0, True):
        with pytest.raises(KernelArgumentError, match="q_start"):
            select_blocks_prefill(q, k, c, SMALL, q_start=bad)
        with pytest.raises(KernelArgumentError, match="q_start"):
            sparse_prefill_attention(q, k, v, c, torch.zeros(10, 2, 3, dtype=torch.int32), 16, q_start=bad)


def test_union_blocks_is_sorted_dedupe():
    ids = torch.tensor([[[3, -1, 1]], [[1, 5, 3]], [[-1, -1, -1]]], dtype=torch.int32)  # T=3, Hkv=1
    union, counts = union_blocks(ids, 2)
    assert counts.tolist() == [[3], [0]]
    assert union[0, 0, :3].tolist() == [1, 3, 5]


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(k=torch.zeros(10, 2, 32)), r"^k: expected shape"),
        (dict(v=torch.zeros(10, 2, 64, dtype=torch.float16)), r"^v: dtype"),
        (dict(c=torch.zeros(10, 3)), r"^c: expected shape"),
        (dict(block_ids=torch.zeros(10, 2, 4)), r"^block_ids: dtype"),
        (dict(block_ids=torch.zeros(9, 2, 4, dtype=torch.int32)), r"^block_ids: expected"),
        (dict(block_size=0), r"^block_size:"),
        (dict(q=torch.zeros(10, 3, 64)), r"^q: Hq=3"),
    ],
)
def test_argument_errors_name_the_argument(change, match):
    args = dict(q=torch.zeros(10, 4, 64), k=torch.zeros(10, 2, 64), v=torch.zeros(10, 2, 64), c=torch.zeros(10, 2),
                block_ids=torch.zeros(10, 2, 4, dtype=torch.int32), block_size=16)
    args.update(change)
    with pytest.raises(KernelArgumentError, match=match):
        sparse_prefill_attention(**args)


def test_selection_argument_errors():
    with pytest.raises(KernelArgumentError, match=r"^c: expected a float32"):
        select_blocks_prefill(torch.zeros(10, 4, 64), torch.zeros(10, 2, 64), torch.zeros(10, 2).half(), SMALL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_prefill_16k(gen, dtype):
    """Default NOSA config, d 128, block 64, 16K tokens (Hq 8 / Hkv 2 keeps the reference in memory)."""
    cfg = NosaConfig()
    q, k, v, c = inputs(gen, 16384 - 37, 8, 2, 128, dtype)
    ref_blocks = reference_select(q, k, c, cfg)
    with poisoned_allocations():
        sel = select_blocks_prefill(q, k, c, cfg)
        out = sparse_prefill_attention(q, k, v, c, ref_blocks.to(torch.int32), cfg.block_size)
    torch.cuda.synchronize()
    # bf16 stage-1 logits vs the fp32 reference: near-ties may flip a few free picks
    agree = overlap(sel, ref_blocks)
    assert agree >= 0.995, f"selection agreement {agree}"
    ref = nosa_prefill_attention(q, k, v, c, cfg, blocks=ref_blocks)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_batched_extends_equal_one_call_per_sequence_bit_for_bit(gen, dtype, impl):
    """A server's extends after cached prefixes, batched: each sequence's pages read as one (every
    sequence starting at a block boundary, the last block of each partly garbage), its queries the last
    n rows (one, a tile and a half, the whole sequence). The same blocks and outputs as one call per
    sequence, and those equal the reference's rows."""
    from nosa_sglang.kernels.prefill_selection import select_blocks_prefill_batched
    from nosa_sglang.kernels.sparse_prefill import sparse_prefill_batched

    hq, hkv, d, bs = 8, 2, 64, SMALL.block_size
    lens, news = [150, 37, 16, 201], [1, 24, 16, 5]  # 10, 3, 1 and 13 blocks: topk is 8
    seqs, base, parts = [], 0, []
    for T, n in zip(lens, news):
        q, k, v, c = inputs(gen, T, hq, hkv, d, dtype)
        nb = SMALL.num_blocks(T)
        junk = inputs(gen, nb * bs - T, hq, hkv, d, dtype)  # the rest of the last page
        parts.append((q[T - n:], *(torch.cat((x, j)) for x, j in zip((k, v, c), junk[1:])), q, k, v, c))
        seqs.append((n, base, T))
        base += nb * bs
    Q = torch.cat([p[0] for p in parts])
    K, V, C = (torch.cat([p[i] for p in parts]) for i in (1, 2, 3))
    sel = select_blocks_prefill_batched(Q, K, C, seqs, SMALL, impl=impl)
    out = sparse_prefill_batched(Q, K, V, C, sel, seqs, bs, impl=impl)
    row = 0
    for (n, _, T), (qq, _, _, _, q, k, v, c) in zip(seqs, parts):
        one = select_blocks_prefill(qq, k, c, SMALL, impl=impl, q_start=T - n)
        assert torch.equal(sel[row:row + n], one), f"sequence of {T}: selections differ"
        o = sparse_prefill_attention(qq, k, v, c, one, bs, impl=impl, q_start=T - n)
        assert torch.equal(out[row:row + n], o), f"sequence of {T}: outputs differ"
        ref = nosa_prefill_attention(q, k, v, c, SMALL)[T - n:]
        assert rel_err(o, ref) < TOL[dtype]
        row += n
    with pytest.raises(KernelArgumentError, match=r"seqs\[1\]"):
        select_blocks_prefill_batched(Q, K, C, [seqs[0], (news[1], 3, lens[1]), *seqs[2:]], SMALL, impl=impl)
    with pytest.raises(KernelArgumentError, match="query rows"):
        sparse_prefill_batched(Q, K, V, C, sel, seqs[:2], bs, impl=impl)
