"""NOSA_SPEC.md transcribed literally, one query token at a time, in float64 loops.

A second, deliberately naive reading of the spec used only by tests to check the vectorised reference.
"""

from __future__ import annotations

import math

import torch

from nosa_sglang.config import NosaConfig

INF = float("inf")


def chunk_means(x: torch.Tensor, L: int, cfg: NosaConfig) -> list[torch.Tensor]:
    n = 0 if L < cfg.kernel_size else (L - cfg.kernel_size) // cfg.kernel_stride + 1
    return [x[cfg.kernel_stride * i : cfg.kernel_stride * i + cfg.kernel_size].double().mean(0) for i in range(n)]


def block_scores(chunk_scores: list[float], n_blocks: int, cfg: NosaConfig) -> list[float]:
    r = cfg.block_size // cfg.kernel_stride
    out = []
    for b in range(n_blocks):
        window = [chunk_scores[i] for i in range(r * b - 1, r * b + r) if 0 <= i < len(chunk_scores)]
        out.append(max(window) if window else -INF)
    return out


def top(scores: list[float], k: int) -> list[int]:
    # ties to the lower block id (the reference's documented tie rule)
    return sorted(range(len(scores)), key=lambda b: (-scores[b], b))[:k]


def select(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, t: int, cfg: NosaConfig) -> dict[int, list[int]]:
    """Selected blocks per KV head for the query at position t. q [Hq, d], k [>t, Hkv, d], c [>t, Hkv]."""
    L = t + 1
    hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    n_blocks = -(-L // cfg.block_size)
    qb = t // cfg.block_size
    ck = chunk_means(k[:L], L, cfg)
    ce = chunk_means(c[:L], L, cfg)
    out = {}
    for h in range(hkv):
        s = [0.0] * len(ck)
        for gi in range(g):
            qq = q[h * g + gi].double()
            logits = [float(qq @ ck[i][h]) / math.sqrt(d) for i in range(len(ck))]
            if logits:
                m = max(logits)
                z = sum(math.exp(x - m) for x in logits)
                for i, x in enumerate(logits):
                    s[i] += math.exp(x - m) / z
        S = block_scores(s, n_blocks, cfg)
        E = block_scores([float(e[h]) for e in ce], n_blocks, cfg)
        if n_blocks <= cfg.topk_blocks:
            out[h] = list(range(n_blocks))
            continue
        for b in range(n_blocks):
            if b < cfg.init_blocks or qb - cfg.local_blocks <= b <= qb:
                S[b] = INF
        Q = set(top(S, cfg.query_blocks))
        for b in Q:
            E[b] = INF
        out[h] = sorted(top(E, cfg.topk_blocks))
    return out


def attention(q, k, v, c, t: int, blocks: dict[int, list[int]], cfg: NosaConfig) -> torch.Tensor:
    """o for the query at position t over the tokens <= t of the given blocks, with bias c. -> [Hq, d]."""
    hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.zeros(hq, d, dtype=torch.float64)
    for h in range(hkv):
        toks = [j for b in blocks[h] for j in range(b * cfg.block_size, (b + 1) * cfg.block_size) if j <= t]
        kk, vv, cc = k[toks, h].double(), v[toks, h].double(), c[toks, h].double()
        for gi in range(g):
            qq = q[h * g + gi].double()
            p = torch.softmax(kk @ qq / math.sqrt(d) + cc, 0)
            out[h * g + gi] = p @ vv
    return out
