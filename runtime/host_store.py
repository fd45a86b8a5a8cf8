"""HostKVStore: the KV of every token of every layer, in pinned host memory, in refcounted blocks.

Why this layout: one (block, KV head) of K or of V is one contiguous *run* of block_size x head_dim
elements, so a miss is two runs that a zero-copy kernel or one DMA moves without gathering. Per layer
the store is `k[num_blocks * Hkv, block_size * head_dim]` (host run id = block_id * Hkv + kv_head) and
the same for V (the layout contract of `kernels.block_copy`). A block id names the same tokens in
every layer, so a request owns one list of block ids, and prefix sharing (the radix cache) maps
several requests onto the same ids through reference counts.

The store may also be a server's page pool in pinned memory (`storage=`): then the server allocates
its blocks and the store only counts the runtime's references (`adopt`).

Allocation is all-or-nothing: `allocate` either returns every block asked for or raises
`HostMemoryExhausted` (back-pressure for the scheduler) and changes nothing. On a machine without CUDA
the store lives in plain memory (named CPU mode, `pinned_mode() == "cpu"`): same logic, tested in CI.
"""

from __future__ import annotations

import threading

import torch

from nosa_sglang.kernels.pinned import alloc_pinned, pinned_mode


class HostMemoryExhausted(RuntimeError):
    """Not enough free host blocks for an all-or-nothing allocation (back-pressure, not a bug).

    Attributes: requested_blocks, free_blocks (usable under the capacity limit at the time).
    """

    def __init__(self, requested_blocks: int, free_blocks: int, what: str = "") -> None:
        super().__init__(
            f"host KV store exhausted: {what + ' needs ' if what else ''}{requested_blocks} block(s), "
            f"{free_blocks} free under the capacity limit"
        )
        self.requested_blocks = requested_blocks
        self.free_blocks = free_blocks


class HostKVStore:
    """Pinned K/V runs of `num_blocks` blocks for every layer, with a refcounting block allocator.

    Args:
        num_layers, num_kv_heads, head_dim, block_size: the model's KV shape.
        dtype: KV element type (the model's).
        capacity_bytes: bytes of K + V to allocate; num_blocks = capacity_bytes // block_bytes.
        buffer: optional preallocated flat host tensor (any dtype, >= the bytes needed) to carve the
            store from, e.g. one pinned allocation reused by several benchmark configurations.
        storage: optional [2, num_layers, R, block_size * head_dim] host tensor that *is* the store (a
            server's page pool in pinned memory, `PagePool(host=True).kv`): num_blocks = R // Hkv, and
            its blocks belong to the server's allocator: `allocate` refuses, `adopt` / `release` only
            count the references the runtime holds (capacity_bytes ignored).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        capacity_bytes: int,
        buffer: torch.Tensor | None = None,
        storage: torch.Tensor | None = None,
    ) -> None:
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.head_dim, self.block_size, self.dtype = head_dim, block_size, dtype
        self.run_elems = block_size * head_dim
        elem = torch.empty((), dtype=dtype).element_size()
        self.run_bytes = self.run_elems * elem
        #: bytes one block occupies over all layers, K and V
        self.block_bytes = 2 * num_layers * num_kv_heads * self.run_bytes
        self.external = storage is not None
        if self.external:
            shape = (2, num_layers, storage.shape[2] if storage.dim() == 4 else -1, self.run_elems)
            if storage.dim() != 4 or tuple(storage.shape) != shape or storage.dtype != dtype \
                    or storage.device.type != "cpu" or storage.shape[2] < num_kv_heads:
                raise ValueError(f"storage: expected a host tensor [2, {num_layers}, >= {num_kv_heads}, "
                                 f"{self.run_elems}] of {dtype}, got {list(storage.shape)} {storage.dtype} on "
                                 f"{storage.device}")
            capacity_bytes = storage.shape[2] // num_kv_heads * self.block_bytes
        if capacity_bytes < self.block_bytes:
            raise ValueError(
                f"capacity_bytes={capacity_bytes}: allowed range is >= one block of every layer "
                f"({self.block_bytes} bytes)"
            )
        self.num_blocks = capacity_bytes // self.block_bytes
        shape = (2, num_layers, self.num_blocks * num_kv_heads, self.run_elems)
        if self.external:
            self._kv = storage
        elif buffer is None:
            self._kv = alloc_pinned(shape, dtype)
        else:
            need = self.num_blocks * self.block_bytes
            have = buffer.numel() * buffer.element_size()
            if buffer.device.type != "cpu" or not buffer.is_contiguous() or have < need:
                raise ValueError(f"buffer: expected a contiguous host tensor of >= {need} bytes, got {have} "
                                 f"bytes on {buffer.device}")
            self._kv = buffer.view(torch.uint8)[:need].view(dtype).view(shape)
        self._layer_kv = [(self._kv[0, layer], self._kv[1, layer]) for layer in range(num_layers)]  # views, made once
        self.mode = pinned_mode()  # "cupy" | "torch" | "cpu" (named CPU mode: plain memory)
        self._lock = threading.Lock()
        self._refcount = [0] * self.num_blocks
        # a stack: block 0 is handed out first (external storage: the server allocates, nothing is free here)
        self._free = [] if self.external else list(range(self.num_blocks - 1, -1, -1))
        self._adopted = 0  # external storage: blocks the runtime holds references to
        self._limit_blocks = self.num_blocks

    # -- memory ------------------------------------------------------------------------------------
    def layer_k(self, layer: int) -> torch.Tensor:
        """[num_blocks * Hkv, block_size * head_dim] host K runs of `layer` (run id = block * Hkv + h)."""
        return self._layer_kv[layer][0]

    def layer_v(self, layer: int) -> torch.Tensor:
        return self._layer_kv[layer][1]

    def run_ids(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Host run ids [..., Hkv] of blocks [...]: block * Hkv + kv_head."""
        heads = torch.arange(self.num_kv_heads, device=block_ids.device, dtype=block_ids.dtype)
        return block_ids[..., None] * self.num_kv_heads + heads

    # -- capacity ----------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        """Bytes usable now (the allocation, or less under `set_limit_bytes`)."""
        return self._limit_blocks * self.block_bytes

    @property
    def allocated_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def set_limit_bytes(self, limit_bytes: int) -> None:
        """Cap the blocks in use (the `host_capacity_bytes` knob; 0 = everything allocated).

        Blocks already in use above a lowered cap stay valid; only new allocations wait.
        """
        blocks = self.num_blocks if limit_bytes <= 0 else min(self.num_blocks, limit_bytes // self.block_bytes)
        with self._lock:
            self._limit_blocks = blocks

    @property
    def used_blocks(self) -> int:
        return self._adopted if self.external else self.num_blocks - len(self._free)

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation may take now (free and under the capacity limit)."""
        with self._lock:
            return self._free_under_limit()

    def _free_under_limit(self) -> int:
        return max(0, min(len(self._free), self._limit_blocks - (self.num_blocks - len(self._free))))

    # -- allocation --------------------------------------------------------------------------------
    def try_allocate(self, n: int) -> list[int] | None:
        """`n` fresh blocks (refcount 1), or None when they do not fit; nothing changes on None."""
        if n < 0:
            raise ValueError(f"n={n}: allowed range is >= 0")
        if self.external and n:
            raise ValueError("allocate: the blocks of an external storage belong to the server's allocator "
                             "(adopt the ones it hands out)")
        with self._lock:
            if n > self._free_under_limit():
                return None
            ids = [self._free.pop() for _ in range(n)]
            for b in ids:
                assert self._refcount[b] == 0, f"block {b} on the free list has refcount {self._refcount[b]}"
                self._refcount[b] = 1
            return ids

    def allocate(self, n: int, what: str = "") -> list[int]:
        """`n` fresh blocks or HostMemoryExhausted (all-or-nothing; every counter unchanged on failure)."""
        ids = self.try_allocate(n)
        if ids is None:
            raise HostMemoryExhausted(n, self.free_blocks, what)
        return ids

    def share(self, block_ids: list[int]) -> None:
        """One more reference to each of `block_ids` (a prefix another request reuses)."""
        with self._lock:
            for b in block_ids:
                if not 0 <= b < self.num_blocks or self._refcount[b] < 1:
                    raise ValueError(f"block_ids: {b} is not an allocated block of [0, {self.num_blocks})")
            for b in block_ids:
                self._refcount[b] += 1

    def adopt(self, block_ids: list[int]) -> None:
        """External storage: one more reference to each of the server's blocks `block_ids`."""
        if not self.external:
            raise ValueError("adopt: only for an external storage (allocate or share this store's blocks)")
        with self._lock:
            for b in block_ids:
                if not 0 <= b < self.num_blocks:
                    raise ValueError(f"block_ids: {b} is not a block of [0, {self.num_blocks})")
            for b in block_ids:
                self._adopted += self._refcount[b] == 0
                self._refcount[b] += 1

    def release(self, block_ids: list[int]) -> int:
        """Drop one reference to each block; blocks reaching zero return to the pool. Returns how many."""
        freed = 0
        with self._lock:
            for b in block_ids:
                assert 0 <= b < self.num_blocks and self._refcount[b] > 0, f"release of unowned block {b}"
                self._refcount[b] -= 1
                if self._refcount[b] == 0:
                    if self.external:
                        self._adopted -= 1
                    else:
                        self._free.append(b)
                    freed += 1
        return freed

    def refcount(self, block_id: int) -> int:
        return self._refcount[block_id]

    # -- CPU-side writes (prompts, tests) ------------------------------------------------------------
    def write_block_tokens(self, layer: int, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store whole blocks of one layer: k, v [len(block_ids) * block_size, Hkv, d] (any device;
        a CUDA source is copied synchronously: for prompts and tests, not the decode path)."""
        n, bs, hkv, d = len(block_ids), self.block_size, self.num_kv_heads, self.head_dim
        assert k.shape == (n * bs, hkv, d) and v.shape == k.shape, f"k/v: expected [{n * bs}, {hkv}, {d}]"
        rows = self.run_ids(torch.tensor(block_ids, dtype=torch.long)).reshape(-1)
        for dst, src in ((self.layer_k(layer), k), (self.layer_v(layer), v)):
            runs = src.reshape(n, bs, hkv, d).transpose(1, 2).reshape(n * hkv, bs * d)
            dst.index_copy_(0, rows, runs.to(device="cpu", dtype=self.dtype))

    def read_block_tokens(self, layer: int, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of write_block_tokens (tests and debugging): ([n * bs, Hkv, d], same)."""
        n, bs, hkv, d = len(block_ids), self.block_size, self.num_kv_heads, self.head_dim
        rows = self.run_ids(torch.tensor(block_ids, dtype=torch.long)).reshape(-1)
        out = []
        for src in (self.layer_k(layer), self.layer_v(layer)):
            out.append(src.index_select(0, rows).reshape(n, hkv, bs, d).transpose(1, 2).reshape(n * bs, hkv, d))
        return out[0], out[1]
