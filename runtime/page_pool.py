"""PagePool: a serving engine's paged KV pool in NOSA's run layout, which the runtime decodes from in place.

Why: a server (SGLang) keeps every token's K/V in a pool of pages, and a NOSA block is one page of
`block_size` tokens. With the pool laid out as runs (per layer `kv[2, num_pages * Hkv + 1, block_size
* head_dim]`, run id = page * Hkv + kv_head, as the host store and the slot cache are), the decode kernel
reads a selected block straight from its page: NOSA fully on the GPU needs no second copy of the KV
cache. `c` (the eviction bias, float32) sits beside each token in the same layout. The last run is the
trash run (padding writes land there). A token's *location* is page * block_size + offset, SGLang's
`out_cache_loc`.

With `host=True` the K/V storage lives in pinned host memory instead (`alloc_pinned`): then the pool is
the offload runtime's host store (the same run layout), the server's page allocator hands out host
blocks, and GPU memory holds only `c` and what the runtime caches. Tokens reach their host pages through
a zero-copy store (`kernels.token_store`), and sequences come back through the zero-copy gather of whole
runs (`kernels.block_copy`).
"""

from __future__ import annotations

import torch

from nosa_sglang.kernels.block_copy import gather_runs, gather_store_runs
from nosa_sglang.kernels.page_tokens import read_page_tokens, runs_to_tokens
from nosa_sglang.kernels.pinned import alloc_pinned
from nosa_sglang.kernels.token_store import store_tokens

#: the page padding tokens go to (SGLang writes them to location 0 and never hands out page 0)
PADDING_PAGE = 0


class PagePool:
    """K/V/c of `num_pages` pages of every layer, in the run layout.

    Args:
        num_layers, num_kv_heads, head_dim, block_size, dtype: the KV shape.
        num_pages: pages (page 0 included: SGLang writes padding tokens to location 0).
        device: where the storage lives (with host=True: where `c` lives and the tokens come from).
        host: K/V in pinned host memory (plain memory on a machine without CUDA).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 num_pages: int, device: torch.device | str, host: bool = False) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages}: allowed range is >= 1")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.dtype, self.num_pages = block_size, dtype, num_pages
        self.device = torch.device(device)
        self.host = host
        runs = num_pages * num_kv_heads + 1
        shape = (2, num_layers, runs, block_size * head_dim)
        # NOTE: zero-filled so that a never-written token can never leak NaN/Inf through a masked load
        self.kv = alloc_pinned(shape, dtype).zero_() if host else torch.zeros(shape, dtype=dtype, device=self.device)
        self.c = torch.zeros((num_layers, runs, block_size), dtype=torch.float32, device=self.device)
        self.trash_run = runs - 1
        self._heads = torch.arange(num_kv_heads, device=self.device)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the K/V storage (host memory when host=True)."""
        return self.kv.numel() * self.kv.element_size()

    @property
    def page_k_bytes(self) -> int:
        """K bytes of one page, every KV head: what reading a page's K moves (its V as much again)."""
        return self.num_kv_heads * self.block_size * self.head_dim * self.kv.element_size()

    def runs_of(self, pages: torch.Tensor) -> torch.Tensor:
        """[n, Hkv] run of each (page, KV head): page * Hkv + head (flattened: indexed by block * Hkv + head
        when `pages` lists a sequence's pages in order)."""
        return pages.to(self.device, torch.long)[:, None] * self.num_kv_heads + self._heads

    def _runs_and_offsets(self, locs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, Hkv] run of each (token, head) and [n, 1] token offset in its run, in elements."""
        locs = locs.to(self.device, torch.long)
        return self.runs_of(torch.div(locs, self.block_size, rounding_mode="floor")), (locs % self.block_size)[:, None]

    def write_tokens(self, layer: int, locs: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     c: torch.Tensor | None = None) -> None:
        """Store tokens at `locs` [n]: k, v [n, Hkv, d] (cast to the pool dtype), c [n, Hkv] (float32)."""
        runs, off = self._runs_and_offsets(locs)
        store_tokens(self.kv[0, layer], self.kv[1, layer], runs, off.view(-1), k, v)
        if c is not None:
            self.c[layer][runs, off] = c.to(torch.float32)

    def read_tokens(self, layer: int, locs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v [n, Hkv, d], c [n, Hkv] float32) of the tokens at `locs` [n], on `device` (host storage: a
        synchronous host-side gather, for tests and debugging; sequences go through `read_pages`)."""
        runs, off = self._runs_and_offsets(locs)
        d, where = self.head_dim, self.kv.device
        k, v = (self.kv[i, layer].view(-1, self.block_size, d)[runs.to(where), off.to(where)].to(self.device)
                for i in range(2))
        return k, v, self.c[layer][runs, off]

    def read_runs(self, layer: int, runs: torch.Tensor, with_k: bool = True, with_v: bool = True) -> tuple[
            torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(k, v [n, block_size * d], c [n, block_size] float32) of the runs `runs` [n] (run id = page * Hkv
        + head; a negative id reads nothing and answers zeros), on `device`; k or v is None when not
        wanted. Host storage on CUDA: zero-copy gathers over PCIe, of the wanted parts and live ids only,
        with no sync (a fixed-size id list can stay on the GPU)."""
        return self._read_runs(layer, runs, with_k, with_v, skips=True)

    def _read_runs(self, layer: int, runs: torch.Tensor, with_k: bool, with_v: bool, skips: bool):
        """read_runs; skips=False: every id is a run (no masking pass over what was read)."""
        runs = runs.to(self.device, torch.long)
        live = (runs >= 0)[:, None] if skips else None
        safe = runs.clamp(min=0) if skips else runs
        masked = (lambda x: x * live.to(x.device)) if skips else (lambda x: x)  # noqa: E731
        c = masked(self.c[layer][safe])
        wanted = (with_k, with_v)
        if not (self.host and self.device.type == "cuda"):
            return tuple(masked(self.kv[i, layer][safe.to(self.kv.device)].to(self.device)) if want else None
                         for i, want in enumerate(wanted)) + (c,)
        if not (with_k and with_v):  # NOTE: the zero-copy gathers skip negative ids and leave zeros there
            return tuple(gather_store_runs(self.kv[i, layer], runs, self.device) if want else None
                         for i, want in enumerate(wanted)) + (c,)
        n = runs.numel()
        staged = torch.zeros((2, n, self.block_size * self.head_dim), dtype=self.dtype, device=self.device)
        gather_runs(self.kv[0, layer], self.kv[1, layer], runs, staged[0], staged[1],
                    torch.arange(n, device=self.device), mode="zero_copy", validate_ids=False)
        return staged[0], staged[1], c

    def read_pages(self, layer: int, pages: torch.Tensor, n_tokens: int, with_v: bool = True) -> tuple[
            torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(k, v [n, Hkv, d], c [n, Hkv] float32) of the first `n_tokens` tokens of a sequence laid out
        on `pages` [>= ceil(n / block_size)] in order (token i at page i // block_size, offset i % block_size:
        how a paged allocator places a request); v is None when not wanted. Whole runs are gathered: far
        fewer, longer reads than `read_tokens` over the same tokens."""
        if not self.host:  # NOTE: one token-major pass over each run (the gather and transpose below move it twice)
            return read_page_tokens(self.kv[0, layer], self.kv[1, layer] if with_v else None, self.c[layer], pages,
                                    n_tokens, self.num_kv_heads)
        bs, hkv = self.block_size, self.num_kv_heads
        nb = -(-n_tokens // bs)
        k, v, c = self._read_runs(layer, self.runs_of(pages[:nb]).flatten(), True, with_v, skips=False)
        return tuple(None if x is None else runs_to_tokens(x, n_tokens, hkv, bs) for x in (k, v, c))

    def layer_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v [runs, block_size * d], c [runs, block_size]) of one layer: the decode kernel's slots
        (device storage)."""
        return self.kv[0, layer], self.kv[1, layer], self.c[layer]
