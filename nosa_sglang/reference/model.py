"""A small NOSA-Llama in plain torch: Llama blocks whose attention adds the ED-DMA eviction head.

Readable over fast: it exists to define what the SGLang model must compute and to drive the demo.
Attention itself is delegated to an AttentionBackend (reference math, or the offload runtime).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nosa_sglang.config import NosaConfig
from nosa_sglang.reference.backend import AttentionBackend, ReferenceAttentionBackend
from nosa_sglang.reference.eviction import eviction_bias
from nosa_sglang.reference.llama_config import LlamaShape


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama rotary embedding (rotate-half form). x [N, H, d], positions [N]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d))
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class NosaAttention(nn.Module):
    """Llama attention + eviction head (`A`, `delta`): c = A * softplus(delta(v))."""

    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.shape = shape
        h, d, hq, hkv = shape.hidden_size, shape.head_dim, shape.num_attention_heads, shape.num_key_value_heads
        bias = shape.attention_bias
        self.q_proj = nn.Linear(h, hq * d, bias=bias)
        self.k_proj = nn.Linear(h, hkv * d, bias=bias)
        self.v_proj = nn.Linear(h, hkv * d, bias=bias)
        self.o_proj = nn.Linear(hq * d, h, bias=bias)
        self.A = nn.Parameter(torch.zeros(hkv))
        self.delta = nn.Linear(hkv * d, hkv, bias=bias)

    def qkvc(self, x: torch.Tensor, positions: torch.Tensor):
        s = self.shape
        n = x.shape[0]
        q = self.q_proj(x).view(n, s.num_attention_heads, s.head_dim)
        k = self.k_proj(x).view(n, s.num_key_value_heads, s.head_dim)
        v = self.v_proj(x).view(n, s.num_key_value_heads, s.head_dim)
        c = eviction_bias(v, self.A, self.delta.weight, self.delta.bias).to(x.dtype)
        return rope(q, positions, s.rope_theta), rope(k, positions, s.rope_theta), v, c


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = NosaAttention(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        return m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))


@dataclass(frozen=True)
class Generation:
    """Greedy output of one batch: new token ids per request (prompt excluded)."""

    tokens: list[list[int]]


class NosaLlamaForCausalLM(nn.Module):
    """The reference NOSA-Llama (HF names: model.layers.N.self_attn.{A, delta.weight}, ...)."""

    def __init__(self, shape: LlamaShape, nosa: NosaConfig | None = None) -> None:
        super().__init__()
        self.shape = shape
        self.nosa = nosa or NosaConfig()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.num_hidden_layers))
        self.model.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """Logits of every position. `attend(layer, q, k, v, c) -> o` is the attention of one layer."""
        x = self.model.embed_tokens(ids)
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            q, k, v, c = attn.qkvc(layer.input_layernorm(x), positions)
            o = attend(i, q, k, v, c)
            x = x + attn.o_proj(o.to(x.dtype).flatten(1))
            x = x + layer.mlp_forward(layer.post_attention_layernorm(x))
        return self.lm_head(self.model.norm(x))

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        backend: AttentionBackend | None = None,
        eos_token_id: int | None = None,
        on_step=None,
    ) -> Generation:
        """Greedy decoding: each prompt is prefilled alone, then all decode in one batch.

        `on_step(step, backend)` is called after every decode step (the demo's table hooks in here).
        A finished request (eos) keeps decoding in the batch but its later tokens are dropped.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts: expected a non-empty list of non-empty token lists")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: allowed range is >= 1")
        backend = backend or ReferenceAttentionBackend(self.nosa)
        device = self.lm_head.weight.device
        backend.start([f"req-{i}" for i in range(len(prompts))])
        try:
            last = []
            for idx, p in enumerate(prompts):
                ids = torch.tensor(p, device=device)
                pos = torch.arange(len(p), device=device)
                logits = self._forward(ids, pos, lambda i, q, k, v, c, idx=idx: backend.prefill(i, idx, q, k, v, c))
                last.append(int(logits[-1].argmax()))
            out = [[t] for t in last]
            done = [eos_token_id is not None and t == eos_token_id for t in last]
            lengths = [len(p) for p in prompts]
            for step in range(1, max_new_tokens):
                ids = torch.tensor([o[-1] for o in out], device=device)
                pos = torch.tensor([n + len(o) - 1 for n, o in zip(lengths, out)], device=device)
                logits = self._forward(ids, pos, backend.decode)
                for b, t in enumerate(logits.argmax(-1).tolist()):
                    if not done[b]:
                        out[b].append(t)
                        done[b] = eos_token_id is not None and t == eos_token_id
                if on_step is not None:
                    on_step(step, backend)
                if all(done):
                    break
            return Generation(tokens=out)
        finally:
            backend.finish()


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_random_(model: NosaLlamaForCausalLM, seed: int) -> None:
    """Random weights for a generated checkpoint; A is nonzero so eviction scores never tie."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.data = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith(".A"):
            p.data = 0.5 + torch.rand(p.shape, generator=g)
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.data = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
