"""Where the reference model's attention layers send q, k, v, c: the seam that offloading plugs into.

`ReferenceAttentionBackend` keeps the whole KV cache in plain tensors and calls the reference math;
`nosa_sglang.reference.offload_backend.OffloadAttentionBackend` drives the offload runtime instead.
Both must give the same tokens: that is the promise "offloading changes nothing".
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from nosa_sglang.config import NosaConfig
from nosa_sglang.reference.attention import (
    nosa_decode_attention,
    nosa_prefill_attention,
    select_blocks_decode,
)


class AttentionBackend(ABC):
    """Attention of a batch of sequences that are prefilled one by one, then decoded together."""

    @abstractmethod
    def start(self, request_ids: list[str]) -> None:
        """A new batch begins; request i of later calls is request_ids[i]."""

    @abstractmethod
    def prefill(self, layer: int, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Causal NOSA attention of request `index`'s prompt; keeps its KV.

        q [T, Hq, d], k/v [T, Hkv, d] (post-RoPE k), c [T, Hkv] -> [T, Hq, d].
        """

    @abstractmethod
    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Append one token per request, then attend with it: q [B, Hq, d], k/v [B, Hkv, d], c [B, Hkv]."""

    def finish(self) -> None:
        """The batch is done: free what it holds (a no-op where nothing is held)."""

    def last_selection(self, layer: int) -> torch.Tensor | None:
        """[B, Hkv, topk_blocks] blocks the last decode step attended in `layer` (None if unknown)."""
        return None


class ReferenceAttentionBackend(AttentionBackend):
    """Full KV per request and layer in plain tensors; attention by the reference functions."""

    def __init__(self, config: NosaConfig) -> None:
        self.config = config
        self._kv: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._selection: dict[int, torch.Tensor] = {}
        self._batch = 0

    def start(self, request_ids: list[str]) -> None:
        self._kv.clear()
        self._selection.clear()
        self._batch = len(request_ids)

    def prefill(self, layer, index, q, k, v, c):
        self._kv[(layer, index)] = [k, v, c]
        return nosa_prefill_attention(q, k, v, c, self.config)

    def decode(self, layer, q, k, v, c):
        caches = []
        for i in range(self._batch):
            entry = self._kv[(layer, i)]
            for j, new in enumerate((k[i : i + 1], v[i : i + 1], c[i : i + 1])):
                entry[j] = torch.cat([entry[j], new])
            caches.append(entry)
        seq_lens = torch.tensor([e[0].shape[0] for e in caches])
        L = int(seq_lens.max())
        k_cache, v_cache, c_cache = (
            torch.stack([torch.nn.functional.pad(e[j], (0, 0) * (e[j].dim() - 1) + (0, L - e[j].shape[0])) for e in caches])
            for j in range(3)
        )
        blocks = select_blocks_decode(q, k_cache, c_cache, seq_lens, self.config)
        self._selection[layer] = blocks
        return nosa_decode_attention(q, k_cache, v_cache, c_cache, seq_lens, self.config, blocks=blocks)

    def finish(self) -> None:
        self._kv.clear()

    def last_selection(self, layer):
        return self._selection.get(layer)
