"""NosaKVPool: SGLang's token-to-KV pool for NOSA models, in NOSA's run layout, with `c` beside every token.

Why a pool of our own: SGLang's MHATokenToKVPool stores `[token, head, d]` per layer; NOSA's kernels read
a block of one KV head as one contiguous run (`runtime.PagePool`). With a page of 64 tokens = a NOSA
block, the run layout lets decode read the selected blocks straight from the pages (no second copy of
the KV cache when decoding fully on the GPU) and gives the eviction bias `c` a home beside its token.
The pool keeps SGLang's contract otherwise: locations are `out_cache_loc` (page * page_size + offset),
page 0 is the padding page, `size` tokens plus one page are allocated. Only the `nosa` attention
backend reads it.

The plugin swaps it in for MHATokenToKVPool when NOSA is enabled (`build_mha_pool`); it sizes itself from
SGLang's token budget, so `c` (4 bytes per token, layer and KV head: 1/128 of the K/V at d = 128 in
bf16) comes out of the memory SGLang leaves free.

Offloading (`--nosa-offload on`), the K/V storage is pinned host memory: the pool is the runtime's host
store, SGLang's page allocator hands out host blocks, and the token budget is host memory
(`host_kv_budget`, SGLang's KV sizing hook), not GPU memory: GPU memory is then the runtime's cache.
"""

from __future__ import annotations

import os

import torch
from sglang.srt.mem_cache.memory_pool import KVCache, unwrap_write_loc

from nosa_sglang.runtime.page_pool import PagePool
from nosa_sglang.server_flags import NosaServerFlags

GiB = 1 << 30


class NosaKVPool(KVCache):
    """MHATokenToKVPool's constructor arguments (the ones NOSA uses; the rest are accepted and ignored:
    alternate streams, KV copies for speculative decoding and FP4 are refused by the launcher), and
    `host`: K/V in pinned host memory (default: whether the NOSA flags offload)."""

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, head_num: int, head_dim: int, layer_num: int,
                 device: str, enable_memory_saver: bool, v_head_dim: int | None = None,
                 start_layer: int | None = None, end_layer: int | None = None, host: bool | None = None,
                 **_ignored) -> None:
        super().__init__(size, page_size, dtype, layer_num, device, enable_memory_saver, start_layer, end_layer)
        if v_head_dim not in (None, head_dim):
            raise ValueError(f"v_head_dim={v_head_dim}: NOSA needs K and V of one head_dim ({head_dim})")
        if size % page_size:
            raise ValueError(f"size={size}: must be a multiple of page_size={page_size}")
        self.head_num, self.head_dim = head_num, head_dim
        if host is None:
            flags = NosaServerFlags.from_env()
            host = flags is not None and flags.offload
        self.pages = PagePool(layer_num, head_num, head_dim, page_size, dtype, size // page_size + 1, device,
                              host=host)
        self._finalize_allocation_log(size)

    # -- NOSA's access ---------------------------------------------------------------------------------
    def store(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> None:
        """Tokens' k, v [n, Hkv, d] and eviction bias c [n, Hkv] at locations loc [n]."""
        self.pages.write_tokens(layer_id - self.start_layer, loc, k, v, c)

    def sequence_pages(self, loc: torch.Tensor) -> torch.Tensor:
        """The pages of a request's first n tokens, loc = its req_to_token row [:n]: SGLang's paged
        allocator places token i at offset i % page_size of the request's (i // page_size)-th page."""
        return torch.div(loc[:: self.page_size], self.page_size, rounding_mode="floor")

    def read_pages(self, layer_id: int, pages: torch.Tensor, n_tokens: int, with_v: bool = True) -> tuple[
            torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(k, v [n, Hkv, d], c [n, Hkv] float32) of the first n_tokens of the sequence on `pages` (whole page
        runs gathered, PagePool.read_pages); v is None when not wanted."""
        return self.pages.read_pages(layer_id - self.start_layer, pages, n_tokens, with_v)

    # -- SGLang's KVCache interface ----------------------------------------------------------------------
    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        """[num_pages * Hkv + 1, page_size * head_dim]: K runs (run id = page * Hkv + head), not SGLang's
        [token, head, d]."""
        return self.pages.kv[0, layer_id - self.start_layer]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.pages.kv[1, layer_id - self.start_layer]

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_key_buffer(layer_id), self.get_value_buffer(layer_id)

    def set_kv_buffer(self, layer, loc_info, cache_k: torch.Tensor, cache_v: torch.Tensor, k_scale=None, v_scale=None,
                      layer_id_override: int | None = None, **_ignored) -> None:
        """SGLang's generic write (no bias: the nosa backend calls `store`)."""
        loc, _, _ = unwrap_write_loc(loc_info)
        layer_id = layer.layer_id if layer_id_override is None else layer_id_override
        hkv, d = self.head_num, self.head_dim
        self.pages.write_tokens(layer_id - self.start_layer, loc, cache_k.view(-1, hkv, d), cache_v.view(-1, hkv, d))

    def get_kv_size_bytes(self) -> tuple[int, int]:
        half = self.pages.kv_bytes // 2
        return half, half + self.pages.c.numel() * 4  # c counted with V


#: the SGLang method that builds the plain MHA pool (the plugin wraps it with `build_mha_pool`)
BUILD_MHA_POOL = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool"


def build_mha_pool(original, configurator, *, max_total_num_tokens: int, mha_pool_class: type, quant_method=None):
    """An AROUND hook: SGLang builds a NosaKVPool where it would build its MHA pool, with the same sizes."""
    return original(configurator, max_total_num_tokens=max_total_num_tokens, mha_pool_class=NosaKVPool,
                    quant_method=quant_method)


#: the SGLang method that sizes the KV pool in bytes of GPU memory (the plugin wraps it with `host_kv_budget`)
KV_BUDGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._profile_available_bytes"
#: offloading without --nosa-host-memory-gb: at most this share of the machine's RAM for the pool
DEFAULT_HOST_SHARE = 0.5


def physical_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_kv_budget(original, configurator, *args, **kwargs) -> int:
    """An AROUND hook: offloading, SGLang's KV budget is the host pool: --nosa-host-memory-gb, or by default
    what SGLang would have given the KV cache in GPU memory, capped at half of the machine's RAM. The GPU
    memory SGLang sized for KV is left to the runtime's slot caches and selection state."""
    gpu_budget = original(configurator, *args, **kwargs)
    flags = NosaServerFlags.from_env()
    if flags is None or not flags.offload:
        return gpu_budget
    if flags.host_memory_gb is not None:
        return int(flags.host_memory_gb * GiB)
    return min(gpu_budget, int(DEFAULT_HOST_SHARE * physical_ram_bytes()))
