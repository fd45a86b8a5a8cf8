"""NosaLlamaForCausalLM for SGLang: stock SGLang Llama whose attention adds the ED-DMA eviction head.

Every layer's attention computes c = A·softplus(Δ·v) from its value vectors (the fused eviction-head
kernel on CUDA) and hands it to the attention backend as `nosa_bias`; the backend stores it beside the
KV cache, selects blocks by it and adds it to the logits. Registered as `NosaLlamaForCausalLM` and as
the authors' `SparseLlamaForCausalLM` — never as `LlamaForCausalLM`, which would replace stock Llama.
Tensor parallelism is not supported yet (the launcher refuses --tp-size > 1).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from sglang.srt.layers.utils import PPMissingLayer
from sglang.srt.models.llama import LlamaAttention, LlamaForCausalLM, LlamaModel

from nosa_sglang.config import NosaConfig
from nosa_sglang.reference.llama_config import CheckpointError

NOSA_TENSORS = ("self_attn.A", "self_attn.delta.weight")


def eviction_bias_of(v: torch.Tensor, A: torch.Tensor, delta: nn.Linear) -> torch.Tensor:
    """c [N, Hkv] float32: the fused kernel on CUDA, the reference math elsewhere (CPU tests)."""
    if v.is_cuda:
        from nosa_sglang.kernels.eviction_head import eviction_bias
    else:
        from nosa_sglang.reference.eviction import eviction_bias
    return eviction_bias(v, A, delta.weight, delta.bias)


class NosaLlamaAttention(nn.Module):
    """A LlamaAttention's projections, rotary embedding and RadixAttention, plus `A` and `delta`."""

    def __init__(self, base: LlamaAttention, bias: bool) -> None:
        super().__init__()
        self.qkv_proj, self.o_proj, self.rotary_emb, self.attn = base.qkv_proj, base.o_proj, base.rotary_emb, base.attn
        self.q_size, self.kv_size = base.q_size, base.kv_size
        self.num_kv_heads, self.head_dim = base.num_kv_heads, base.head_dim
        self.A = nn.Parameter(torch.zeros(self.num_kv_heads))
        self.delta = nn.Linear(self.kv_size, self.num_kv_heads, bias=bias)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch) -> torch.Tensor:
        q, k, v = LlamaAttention.forward_prepare_native(self, positions, hidden_states)  # the same attributes
        # rounded to the model dtype, as the reference model does (its outputs are the contract)
        c = eviction_bias_of(v.view(-1, self.num_kv_heads, self.head_dim), self.A, self.delta).to(v.dtype)
        out = self.attn(q, k, v, forward_batch, nosa_bias=c)
        return self.o_proj(out)[0]


class NosaLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        self.nosa = NosaConfig.from_hf_config(config)  # a malformed NOSA section fails here, naming the field
        super().__init__(config, quant_config=quant_config, prefix=prefix)

    def _init_model(self, config, quant_config=None, prefix: str = ""):
        model = LlamaModel(config, quant_config=quant_config, prefix=prefix)
        bias = bool(getattr(config, "attention_bias", False) or getattr(config, "bias", False))
        for layer in model.layers:
            if not isinstance(layer, PPMissingLayer):
                layer.self_attn = NosaLlamaAttention(layer.self_attn, bias)
        return model

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        """Llama's loader, after checking that every layer's NOSA tensors are present with their shapes."""
        check = NosaTensorCheck({n: tuple(p.shape) for n, p in self.named_parameters()})
        out = super().load_weights(check.passing(weights))
        check.raise_if_missing()
        return out


class NosaTensorCheck:
    """Malformed checkpoints fail by name: a NOSA tensor (A, delta) with a wrong shape, or missing."""

    def __init__(self, param_shapes: dict[str, tuple[int, ...]]) -> None:
        self.expected = {n: s for n, s in param_shapes.items() if n.endswith(NOSA_TENSORS)}
        self.seen: set[str] = set()

    def passing(self, weights: Iterable[tuple[str, torch.Tensor]]):
        for name, tensor in weights:
            if name in self.expected:
                if tuple(tensor.shape) != self.expected[name]:
                    raise CheckpointError(f"tensor {name}: shape {list(tensor.shape)}, expected "
                                          f"{list(self.expected[name])} (from the config)")
                self.seen.add(name)
            yield name, tensor

    def raise_if_missing(self) -> None:
        missing = sorted(set(self.expected) - self.seen)
        if missing:
            raise CheckpointError(f"tensor {missing[0]}: missing from the checkpoint "
                                  f"({len(missing)} NOSA tensors missing; is this a NOSA checkpoint?)")


class SparseLlamaForCausalLM(NosaLlamaForCausalLM):
    """The architecture name of the authors' NOSA checkpoints."""


EntryClass = [NosaLlamaForCausalLM, SparseLlamaForCausalLM]
