import math

import pytest
import torch

from nosa_sglang.reference import eviction_bias


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_eviction_bias_matches_direct_formula(seed, with_bias):
    g = torch.Generator().manual_seed(seed)
    n, hkv, d = 7, 3, 5
    v = torch.randn(n, hkv, d, generator=g, dtype=torch.float64)
    A = torch.rand(hkv, generator=g, dtype=torch.float64) + 0.5
    W = torch.randn(hkv, hkv * d, generator=g, dtype=torch.float64)
    b = torch.randn(hkv, generator=g, dtype=torch.float64) if with_bias else None
    c = eviction_bias(v, A, W, b)
    for j in range(n):
        flat = [float(x) for x in v[j].reshape(-1)]
        for h in range(hkv):
            x = sum(float(W[h, i]) * flat[i] for i in range(hkv * d)) + (float(b[h]) if with_bias else 0.0)
            assert math.isclose(float(c[j, h]), float(A[h]) * math.log1p(math.exp(x)), rel_tol=1e-9)


def test_eviction_bias_computes_in_float32_for_half_inputs():
    v = torch.randn(4, 2, 8).bfloat16()
    c = eviction_bias(v, torch.ones(2), torch.randn(2, 16))
    assert c.dtype == torch.float32 and c.shape == (4, 2)


def test_eviction_bias_keeps_leading_dims():
    c = eviction_bias(torch.randn(2, 5, 2, 4), torch.ones(2), torch.randn(2, 8))
    assert c.shape == (2, 5, 2)


@pytest.mark.parametrize(
    "args,name",
    [
        ((torch.randn(4, 2, 8), torch.ones(3), torch.randn(2, 16)), "A"),
        ((torch.randn(4, 2, 8), torch.ones(2), torch.randn(2, 15)), "delta_weight"),
        ((torch.randn(4, 2, 8), torch.ones(2), torch.randn(2, 16), torch.ones(3)), "delta_bias"),
        ((torch.randn(8), torch.ones(2), torch.randn(2, 16)), "v"),
        ((torch.ones(4, 2, 8, dtype=torch.int64), torch.ones(2), torch.randn(2, 16)), "v"),
    ],
)
def test_eviction_bias_rejects_bad_arguments_by_name(args, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        eviction_bias(*args)
