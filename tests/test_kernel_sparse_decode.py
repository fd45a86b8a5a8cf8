"""Sparse decode attention over a slot pool equals nosa_sglang.reference.nosa_decode_attention.

The slot pool is built from a reference KV cache by scattering the reference-selected blocks of every
(request, KV head) into random slots, listed in random order with extra -1 padding entries.
CPU: the Triton kernel under TRITON_INTERPRET=1 (tests/conftest.py) and the torch path; GPU: marked.
"""

from __future__ import annotations


import pytest
import torch

from kernel_checks import SMALL, TOL, poisoned_allocations, rel_err

from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.kernels.sparse_decode import sparse_decode_attention
from nosa_sglang.reference import nosa_decode_attention, select_blocks_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GARBAGE = 1e3  # slot contents outside the valid tokens: large, finite (masked, never NaN in math)


def randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def build_case(gen, seq_lens, hq, hkv, d, dtype, cfg=SMALL, extra_pad=3):
    """Reference cache + selection, and the slot-pool view of the same selection."""
    B, L, bs, topk = len(seq_lens), max(seq_lens), cfg.block_size, cfg.topk_blocks
    q = randn(gen, B, hq, d, dtype=dtype)
    k = randn(gen, B, L, hkv, d, dtype=dtype)
    v = randn(gen, B, L, hkv, d, dtype=dtype)
    c = randn(gen, B, L, hkv, scale=0.5)  # nonzero bias (A != 0)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    blocks = select_blocks_decode(q, k, c, sl, cfg)  # [B, Hkv, topk] long, -1 padded
    ref = nosa_decode_attention(q, k, v, c, sl, cfg, blocks=blocks)

    n_slots = B * hkv * topk + 7
    k_slots = randn(gen, n_slots, bs, d, dtype=dtype, scale=GARBAGE)
    v_slots = randn(gen, n_slots, bs, d, dtype=dtype, scale=GARBAGE)
    c_slots = randn(gen, n_slots, bs, scale=GARBAGE)
    slot_of = torch.randperm(n_slots, generator=gen)[: B * hkv * topk].view(B, hkv, topk).to(DEVICE)
    valid = blocks >= 0
    tok = (blocks.clamp(min=0)[..., None] * bs + torch.arange(bs, device=DEVICE)).clamp(max=L - 1)
    bi = torch.arange(B, device=DEVICE)[:, None, None, None]
    hi = torch.arange(hkv, device=DEVICE)[None, :, None, None]
    k_slots[slot_of[valid]] = k[bi, tok, hi][valid]
    v_slots[slot_of[valid]] = v[bi, tok, hi][valid]
    c_slots[slot_of[valid]] = c[bi, tok, hi][valid]

    # the list in random order, with extra padding entries carrying garbage block ids
    slots = torch.cat([torch.where(valid, slot_of, -1), torch.full((B, hkv, extra_pad), -1, device=DEVICE)], -1)
    blks = torch.cat([blocks, torch.randint(0, 50, (B, hkv, extra_pad), generator=gen).to(DEVICE)], -1)
    order = torch.argsort(torch.rand(slots.shape, generator=gen), dim=-1).to(DEVICE)
    slots = slots.gather(-1, order).to(torch.int32)
    blks = blks.gather(-1, order).to(torch.int32)
    return dict(q=q, k_slots=k_slots, v_slots=v_slots, c_slots=c_slots, slot_ids=slots, block_ids=blks,
                seq_lens=sl), ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_matches_reference(gen, dtype, impl):
    # lengths: partial tail blocks, not multiples of 16, a sequence shorter than one block
    args, ref = build_case(gen, [77, 130, 9], hq=8, hkv=2, d=64, dtype=dtype)
    with poisoned_allocations():
        out = sparse_decode_attention(**args, impl=impl)
    assert out.dtype == dtype and out.shape == ref.shape
    assert not out.isnan().any()
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_gqa_groups(gen, hq, hkv):
    args, ref = build_case(gen, [101, 64], hq=hq, hkv=hkv, d=64, dtype=torch.float32)
    with poisoned_allocations():
        out = sparse_decode_attention(**args)
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_split_k_matches_single_pass(gen, num_splits):
    args, ref = build_case(gen, [150, 41], hq=4, hkv=2, d=64, dtype=torch.float32)
    with poisoned_allocations():
        out = sparse_decode_attention(**args, num_splits=num_splits)
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("entries", [1, 2, 4])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_loop_variants_match_reference(gen, monkeypatch, entries, num_splits):
    """Every entries-per-step variant the benchmarks sweep (a split's last step reads past its end,
    masked)."""
    from nosa_sglang.kernels import sparse_decode

    monkeypatch.setattr(sparse_decode, "ENTRIES_PER_STEP", entries)
    args, ref = build_case(gen, [150, 41, 97], hq=8, hkv=2, d=64, dtype=torch.float32)
    want = sparse_decode_attention(**args, return_lse=True, impl="torch")
    with poisoned_allocations():
        got = sparse_decode_attention(**args, return_lse=True, num_splits=num_splits, impl="triton")
    assert rel_err(got.o, ref) <= 1e-4
    torch.testing.assert_close(got.lse, want.lse, rtol=1e-5, atol=1e-5)


def test_head_dim_128_block_64(gen):
    cfg = NosaConfig(block_size=64, kernel_stride=16, kernel_size=32, init_blocks=1, local_blocks=1,
                     query_blocks=3, topk_blocks=4)
    args, ref = build_case(gen, [300, 200], hq=4, hkv=1, d=128, dtype=torch.bfloat16, cfg=cfg)
    with poisoned_allocations():
        out = sparse_decode_attention(**args)
    assert rel_err(out, ref) <= 1e-2


def test_lse_equals_logsumexp_of_biased_logits(gen):
    args, _ = build_case(gen, [90, 33], hq=4, hkv=2, d=64, dtype=torch.float32)
    want = sparse_decode_attention(**args, return_lse=True, impl="torch")
    with poisoned_allocations():
        got = sparse_decode_attention(**args, return_lse=True, num_splits=2)
    assert got.lse.dtype == torch.float32 and got.lse.shape == (2, 4)
    torch.testing.assert_close(got.lse, want.lse, rtol=1e-5, atol=1e-5)
    assert rel_err(got.o, want.o) <= 1e-4


def test_all_padding_row_gives_zeros_and_minus_inf_lse(gen):
    args, _ = build_case(gen, [40, 40], hq=4, hkv=2, d=64, dtype=torch.float32)
    args["slot_ids"][1] = -1
    for impl in ("torch", "triton"):
        with poisoned_allocations():
            o, lse = sparse_decode_attention(**args, return_lse=True, impl=impl, num_splits=2)
        assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.isneginf(lse[1]).all()


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=torch.zeros(2, 4, 64, dtype=torch.int32)), r"^q: dtype"),
        (dict(k_slots=torch.zeros(5, 16, 32)), r"^k_slots: expected shape"),
        (dict(v_slots=torch.zeros(5, 16, 64, dtype=torch.float16)), r"^v_slots: dtype"),
        (dict(c_slots=torch.zeros(5, 16, dtype=torch.float16)), r"^c_slots:"),
        (dict(slot_ids=torch.zeros(2, 3, 4, dtype=torch.int32)), r"^q: Hq=4 must be a positive multiple of Hkv=3"),
        (dict(slot_ids=torch.zeros(2, 2, 4)), r"^slot_ids: dtype"),
        (dict(block_ids=torch.zeros(2, 2, 5, dtype=torch.int32)), r"^block_ids: expected shape"),
        (dict(seq_lens=torch.zeros(3, dtype=torch.int32)), r"^seq_lens: expected shape"),
        (dict(num_splits=0), r"^num_splits:"),
        (dict(sm_scale=float("nan")), r"^sm_scale:"),
        (dict(impl="cuda"), r"^impl:"),
    ],
)
def test_argument_errors_name_the_argument(change, match):
    args = dict(q=torch.zeros(2, 4, 64), k_slots=torch.zeros(5, 16, 64), v_slots=torch.zeros(5, 16, 64),
                c_slots=torch.zeros(5, 16), slot_ids=torch.zeros(2, 2, 4, dtype=torch.int32),
                block_ids=torch.zeros(2, 2, 4, dtype=torch.int32), seq_lens=torch.ones(2, dtype=torch.int32))
    args.update(change)
    with pytest.raises(KernelArgumentError, match=match):
        sparse_decode_attention(**args)


def test_triton_head_dim_must_be_power_of_two():
    args = dict(q=torch.zeros(1, 2, 48), k_slots=torch.zeros(3, 16, 48), v_slots=torch.zeros(3, 16, 48),
                c_slots=torch.zeros(3, 16), slot_ids=torch.zeros(1, 1, 2, dtype=torch.int32),
                block_ids=torch.zeros(1, 1, 2, dtype=torch.int32), seq_lens=torch.ones(1, dtype=torch.int32))
    args = {name: t.to(DEVICE) for name, t in args.items()}
    with pytest.raises(KernelArgumentError, match=r"^q: head_dim"):
        sparse_decode_attention(**args, impl="triton")
    sparse_decode_attention(**args, impl="torch")  # the torch path takes any head_dim


@pytest.mark.parametrize("pdl", [False, True])
def test_programmatic_merge_launch_changes_nothing(gen, monkeypatch, pdl):
    """Decode and split merge as programmatic dependent launches (kernels/pdl.py, each waiting before
    its loads): the same outputs bit for bit. On CPU the switch must fall back to plain launches (the
    interpreter runs no PTX); the GPU twin: test_gpu_programmatic_launches_at_real_sizes."""
    from nosa_sglang.kernels import pdl as pdl_module

    args, ref = build_case(gen, [150, 41, 97], hq=8, hkv=2, d=64, dtype=torch.float32)
    want = sparse_decode_attention(**args, return_lse=True, num_splits=3)
    monkeypatch.setattr(pdl_module, "ENABLED", pdl)
    with poisoned_allocations():
        got = sparse_decode_attention(**args, return_lse=True, num_splits=3)
    assert torch.equal(got.o, want.o) and torch.equal(got.lse, want.lse) and rel_err(got.o, ref) <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 16])
def test_gpu_programmatic_launches_at_real_sizes(gen, monkeypatch, batch):
    """The 1B-like layer (Hq 16, Hkv 2, d 128, bf16, 16K tokens) whose batch 16 pays two launches for
    16 us of bytes: decode and merge as programmatic dependent launches equal plain ones bit for bit."""
    from nosa_sglang.kernels import pdl as pdl_module

    lens = [16384 - 37 * i for i in range(batch)]
    args, ref = build_case(gen, lens, hq=16, hkv=2, d=128, dtype=torch.bfloat16, cfg=NosaConfig())
    want = sparse_decode_attention(**args, return_lse=True)
    monkeypatch.setattr(pdl_module, "ENABLED", True)
    assert pdl_module.options(args["q"])["WAIT"]  # an H100/H200: the real thing
    for _ in range(3):
        with poisoned_allocations():
            got = sparse_decode_attention(**args, return_lse=True)
        assert torch.equal(got.o, want.o) and torch.equal(got.lse, want.lse)
    assert rel_err(got.o, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,num_splits", [(1, None), (3, None), (3, 1)])
def test_gpu_real_sizes(gen, dtype, batch, num_splits):
    """d 128, block 64, default NOSA config, 16K context, 8B-like heads."""
    lens = [16384, 16000 + 37, 9000 + 5][:batch]
    args, ref = build_case(gen, lens, hq=32, hkv=8, d=128, dtype=dtype, cfg=NosaConfig())
    with poisoned_allocations():
        out = sparse_decode_attention(**args, num_splits=num_splits)
    torch.cuda.synchronize()
    assert rel_err(out, ref) <= 1e-2
