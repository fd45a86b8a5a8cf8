"""RuntimeRequests: keeps the NOSA runtime's running requests equal to SGLang's decode batch.

SGLang owns a request's lifecycle (admission, prefill in chunks, radix-cache prefix hits, retraction,
abort, finish) and its pages; NosaRuntime owns the decode state. Before each decode forward, `sync`
makes the runtime hold exactly the batch's requests:
* a runtime request absent from the batch has finished, been aborted or been retracted: it ends (its
  GPU row and page references are released; a retracted one comes back as a new request);
* a request new to decode (or whose length no longer matches: re-prefilled) begins with its pages
  (its req_to_token row, page by page) and its prompt's K/c read from the pool for its compressed keys
  (and, offloaded, the warm start of its slots).
The pages are the runtime's blocks in both modes (fully on the GPU it decodes from them; offloaded they
are its host store), so requests that share a radix-cache prefix share its blocks with no bookkeeping
here. Ends run before begins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nosa_sglang.runtime.nosa_runtime import NosaRuntime


class PoolPrompt:
    """One request's tokens in the pool, read one layer at a time: `.k`, `.v`, `.c` are sequences over
    layers (what `NosaRuntime.begin_request` takes) that call `read(layer)` when one of them is indexed
    and keep only that layer. The runtime loads a prompt layer by layer; all layers at once would be L
    times one layer (17 GiB of K and V for an 8B model at 128K). With a page pool the runtime never
    reads `.v` (its pages hold V), so `read` may answer None for it; `.v` still declares its shape."""

    def __init__(self, num_layers: int, read, n: int, num_kv_heads: int, head_dim: int) -> None:
        """read(layer) -> (k, v, c) of the request's n tokens in that layer."""
        self.num_layers, self.read = num_layers, read
        self._layer, self._kvc = -1, ()
        self.k, self.v = (_LayerView(self, i, (n, num_kv_heads, head_dim)) for i in range(2))
        self.c = _LayerView(self, 2, (n, num_kv_heads))

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not 0 <= layer < self.num_layers:
            raise IndexError(layer)
        if layer != self._layer:
            self._layer, self._kvc = layer, ()  # NOTE: drop the previous layer before reading the next
            self._kvc = self.read(layer)
        return self._kvc


class _LayerView(Sequence):
    def __init__(self, prompt: PoolPrompt, index: int, layer_shape: tuple[int, ...]) -> None:
        self.prompt, self.index, self.layer_shape = prompt, index, layer_shape

    def __len__(self) -> int:
        return self.prompt.num_layers

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.prompt.layer(layer)[self.index]


class RuntimeRequests:
    """Begins and ends runtime requests so that they match each decode batch (see the module doc)."""

    def __init__(self, runtime: NosaRuntime, kv_pool, req_to_token: torch.Tensor) -> None:
        self.runtime, self.kv_pool, self.req_to_token = runtime, kv_pool, req_to_token
        self.begun = 0  # requests begun since start (a retracted request counts again)

    def sync(self, rids: list[str], req_pool_indices: torch.Tensor, seq_lens: list[int]) -> tuple[str, ...]:
        """Make the runtime hold exactly these requests, each with seq_len - 1 tokens (the token being
        decoded is appended by the forward). Returns the ids in batch order.

        `req_pool_indices` (the batch's rows of req_to_token, on the device) is read back only when a
        request begins: a steady decode step never waits for the GPU here."""
        rt = self.runtime
        want = dict(zip(rids, seq_lens))
        stale = {rid for rid in rt.running_requests if rid in want and rt.seq_len(rid) != want[rid] - 1}
        self.end_all_but(want.keys() - stale)
        running = set(rt.running_requests)
        new = [i for i, rid in enumerate(rids) if rid not in running]
        if new:
            rows = req_pool_indices.tolist()
            for i in new:
                self._begin(rids[i], rows[i], seq_lens[i] - 1)
        return tuple(rids)

    def end(self, rid: str) -> None:
        self.runtime.abort_request(rid)  # valid even inside a step an exception interrupted

    def end_all_but(self, keep: set[str]) -> None:
        for rid in self.runtime.running_requests:
            if rid not in keep:
                self.end(rid)

    def _begin(self, rid: str, req_pool_idx: int, n_tokens: int) -> None:
        rt = self.runtime
        pages = self.kv_pool.sequence_pages(self.req_to_token[req_pool_idx, :n_tokens])
        s = rt.shape
        # NOTE: no V: the runtime computes the compressed keys from K, and an offloaded warm start reads
        # the runs it installs from their pages (`prompt.v[layer]` is None)
        prompt = PoolPrompt(s.num_layers, lambda layer: self.kv_pool.read_pages(layer, pages, n_tokens, with_v=False),
                            n_tokens, s.num_kv_heads, s.head_dim)
        rt.begin_request(rid, prompt.k, prompt.v, prompt.c, pages=pages.tolist())
        self.begun += 1
