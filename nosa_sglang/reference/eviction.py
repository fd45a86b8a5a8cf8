"""The eviction head of ED-DMA: c = A * softplus(delta(v)), a query-agnostic per-token logit bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nosa_sglang.reference._checks import check_tensor, compute_dtype


def eviction_bias(
    v: torch.Tensor,
    A: torch.Tensor,
    delta_weight: torch.Tensor,
    delta_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token, per-KV-head eviction score (NOSA_SPEC.md, "the eviction head").

    Args:
        v: [..., Hkv, d] value vectors (no RoPE).
        A: [Hkv].
        delta_weight: [Hkv, Hkv * d] (nn.Linear layout: out x in).
        delta_bias: [Hkv] or None.
    Returns:
        c: [..., Hkv] in float32 (float64 when any input is float64).
    """
    check_tensor("v", v, tuple(range(2, 8)))
    hkv, d = v.shape[-2], v.shape[-1]
    check_tensor("A", A, 1)
    check_tensor("delta_weight", delta_weight, 2)
    if A.shape[0] != hkv:
        raise ValueError(f"A: expected shape [{hkv}] (Hkv of v), got {tuple(A.shape)}")
    if tuple(delta_weight.shape) != (hkv, hkv * d):
        raise ValueError(f"delta_weight: expected shape [{hkv}, {hkv * d}], got {tuple(delta_weight.shape)}")
    if delta_bias is not None:
        check_tensor("delta_bias", delta_bias, 1)
        if delta_bias.shape[0] != hkv:
            raise ValueError(f"delta_bias: expected shape [{hkv}], got {tuple(delta_bias.shape)}")
    dt = compute_dtype(v, A, delta_weight)
    x = v.to(dt).flatten(-2) @ delta_weight.to(dt).T
    if delta_bias is not None:
        x = x + delta_bias.to(dt)
    return A.to(dt) * F.softplus(x)
