import math

import pytest
import torch

import spec_bruteforce as spec
from nosa_sglang.config import NosaConfig
from nosa_sglang.reference import nosa_decode_attention, nosa_prefill_attention, select_blocks_decode
from test_reference_selection import SMALL, random_seq


def dense_with_bias(q, k, v, c):
    """Softmax with bias over all tokens: q [Hq, d], k/v [L, Hkv, d], c [L, Hkv] -> [Hq, d]."""
    hq, d = q.shape
    g = hq // k.shape[1]
    out = []
    for i in range(hq):
        h = i // g
        p = torch.softmax(k[:, h] @ q[i] / math.sqrt(d) + c[:, h], 0)
        out.append(p @ v[:, h])
    return torch.stack(out)


@pytest.mark.parametrize("L", [1, 17, 64, 1000, 4096])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (8, 1)])
def test_decode_is_dense_attention_with_bias_when_at_most_topk_blocks(L, hq, hkv):
    q, k, v, c = random_seq(L, L, hq, hkv, 16)
    out = nosa_decode_attention(q[-1:], k[None], v[None], c[None], torch.tensor([L]), NosaConfig())[0]
    torch.testing.assert_close(out, dense_with_bias(q[-1], k, v, c), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("L", [129, 211, 350])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 1), (8, 1)])
def test_decode_attention_matches_the_spec(seed, L, hq, hkv):
    q, k, v, c = random_seq(seed + L, L, hq, hkv, 8)
    out = nosa_decode_attention(q[-1:], k[None], v[None], c[None], torch.tensor([L]), SMALL)[0]
    blocks = spec.select(q[-1], k, c, L - 1, SMALL)
    torch.testing.assert_close(out, spec.attention(q[-1], k, v, c, L - 1, blocks, SMALL), rtol=1e-10, atol=1e-12)


def test_decode_attention_default_config_sparse_matches_the_spec():
    L = 4500
    q, k, v, c = random_seq(9, L, 4, 2, 16)
    out = nosa_decode_attention(q[-1:], k[None], v[None], c[None], torch.tensor([L]), NosaConfig())[0]
    blocks = spec.select(q[-1], k, c, L - 1, NosaConfig())
    torch.testing.assert_close(out, spec.attention(q[-1], k, v, c, L - 1, blocks, NosaConfig()), rtol=1e-10, atol=1e-12)


def test_decode_batch_with_different_lengths_equals_each_alone():
    lens = [33, 350, 129]
    seqs = [random_seq(i, 350, 8, 2, 8) for i in range(3)]
    q = torch.stack([s[0][L - 1] for s, L in zip(seqs, lens)])
    k, v, c = (torch.stack([s[j] for s in seqs]) for j in (1, 2, 3))
    batch = nosa_decode_attention(q, k, v, c, torch.tensor(lens), SMALL)
    for i, L in enumerate(lens):
        alone = nosa_decode_attention(q[i : i + 1], k[i : i + 1, :L], v[i : i + 1, :L], c[i : i + 1, :L], torch.tensor([L]), SMALL)
        torch.testing.assert_close(batch[i], alone[0], rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [SMALL, NosaConfig()], ids=["small", "default"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_prefill_token_t_equals_decode_at_t(cfg, hq, hkv):
    L = 333 if cfg is SMALL else 4300
    q, k, v, c = random_seq(11, L, hq, hkv, 8)
    pre = nosa_prefill_attention(q, k, v, c, cfg)
    for t in [0, 15, 64, 255, 256, L // 2, L - 1]:
        dec = nosa_decode_attention(q[t : t + 1], k[None, : t + 1], v[None, : t + 1], c[None, : t + 1], torch.tensor([t + 1]), cfg)
        torch.testing.assert_close(pre[t], dec[0], rtol=1e-10, atol=1e-12)


def test_reference_computes_in_float32_for_half_inputs_and_float64_when_given():
    q, k, v, c = random_seq(0, 100, 4, 2, 8, dtype=torch.float32)
    out16 = nosa_prefill_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), c, SMALL)
    assert out16.dtype == torch.float32
    assert nosa_prefill_attention(q.double(), k.double(), v.double(), c.double(), SMALL).dtype == torch.float64


def test_tail_block_is_causal():
    # a key after the query position must not change the output
    q, k, v, c = random_seq(1, 50, 2, 1, 8)
    a = nosa_decode_attention(q[39:40], k[None, :40], v[None, :40], c[None, :40], torch.tensor([40]), SMALL)
    k2 = k.clone()
    k2[40:] = 100.0
    b = nosa_decode_attention(q[39:40], k2[None], v[None], c[None], torch.tensor([40]), SMALL)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_decode_reuses_a_given_selection():
    q, k, v, c = random_seq(2, 300, 4, 2, 8)
    args = (q[-1:], k[None], v[None], c[None], torch.tensor([300]))
    blocks = select_blocks_decode(q[-1:], k[None], c[None], torch.tensor([300]), SMALL)
    torch.testing.assert_close(nosa_decode_attention(*args, SMALL, blocks=blocks), nosa_decode_attention(*args, SMALL))


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: nosa_decode_attention(torch.randn(1, 4, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 4), torch.randn(1, 9, 2), torch.tensor([9]), SMALL), "v_cache"),
        (lambda: nosa_prefill_attention(torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8), torch.randn(9, 3), SMALL), "c"),
        (lambda: nosa_prefill_attention(torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 3, 8), torch.randn(9, 2), SMALL), "v"),
        (lambda: nosa_prefill_attention(torch.randn(9, 4, 8), torch.randn(9, 3, 8), torch.randn(9, 3, 8), torch.randn(9, 3), SMALL), "q"),
        (lambda: nosa_prefill_attention(torch.randn(9, 4, 8), torch.randn(9, 2, 4), torch.randn(9, 2, 4), torch.randn(9, 2), SMALL), "q"),
    ],
)
def test_attention_rejects_bad_arguments_by_name(call, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call()
