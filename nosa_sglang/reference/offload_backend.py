"""OffloadAttentionBackend: the reference model's attention through the offload runtime.

`generate(..., backend=OffloadAttentionBackend(runtime))` prefills each prompt with the sparse prefill
kernel (its own attention) and hands the prompt's KV to `NosaRuntime.begin_request` once its last layer
is done; decode steps go through `decode` (append + attend in one call), with `step_boundary()` after the
last layer.
It must produce the same tokens as ReferenceAttentionBackend: offloading changes nothing.
"""

from __future__ import annotations

import torch

from nosa_sglang.kernels.sparse_prefill import select_blocks_prefill, sparse_prefill_attention
from nosa_sglang.reference.backend import AttentionBackend
from nosa_sglang.runtime.knobs import OffloadKnobs
from nosa_sglang.runtime.nosa_runtime import NosaRuntime
from nosa_sglang.runtime.types import ModelShape


class OffloadAttentionBackend(AttentionBackend):
    """Drives a NosaRuntime; one generate() batch at a time."""

    def __init__(self, runtime: NosaRuntime) -> None:
        self.runtime = runtime
        self._ids: list[str] = []
        self._prompt: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def start(self, request_ids: list[str]) -> None:
        self._ids = list(request_ids)
        self._prompt.clear()

    def prefill(self, layer, index, q, k, v, c):
        rt = self.runtime
        c32 = c.float()
        impl = rt.impl
        blocks = select_blocks_prefill(q, k, c32, rt.config, impl=impl)
        o = sparse_prefill_attention(q, k, v, c32, blocks, rt.config.block_size, impl=impl)
        layers = self._prompt.setdefault(index, [])
        assert len(layers) == layer, f"prefill of request {index}: layer {layer} out of order"
        layers.append((k, v, c32))
        if layer == rt.shape.num_layers - 1:
            ks, vs, cs = zip(*self._prompt.pop(index))
            rt.begin_request(self._ids[index], ks, vs, cs)
        return o

    def decode(self, layer, q, k, v, c):
        rt = self.runtime
        o = rt.decode(layer, self._ids, q, k, v, c)
        if layer == rt.shape.num_layers - 1:
            rt.step_boundary()
        return o

    def finish(self) -> None:
        for rid in self._ids:
            if rid in self.runtime.running_requests:
                self.runtime.abort_request(rid)  # also valid inside a step an exception interrupted
        self.runtime.step_boundary()  # publish the final counters (the numbers stay readable)
        self._prompt.clear()

    def last_selection(self, layer):
        return self.runtime.last_selection(layer)


def runtime_for_model(
    model,
    knobs: OffloadKnobs | None = None,
    device: str | torch.device | None = None,
    max_requests: int = 8,
    max_seq_len: int | None = None,
    host_capacity_bytes: int | None = None,
    **kwargs,
) -> NosaRuntime:
    """A NosaRuntime sized for a reference model (NosaLlamaForCausalLM): its shape, dtype and device;
    host capacity defaults to max_requests full-length sequences."""
    s = model.shape
    p = next(model.parameters())
    shape = ModelShape(s.num_hidden_layers, s.num_attention_heads, s.num_key_value_heads, s.head_dim, p.dtype)
    max_seq_len = max_seq_len or s.max_position_embeddings
    if host_capacity_bytes is None:
        blocks = max_requests * model.nosa.num_blocks(max_seq_len)
        host_capacity_bytes = blocks * shape.kv_bytes(model.nosa.block_size)
    return NosaRuntime(shape, model.nosa, knobs, device=device or p.device, host_capacity_bytes=host_capacity_bytes,
                       max_requests=max_requests, max_seq_len=max_seq_len, **kwargs)
