"""PoolResidency: `gpu_only` decode straight from a server's page pool (no copy of the KV cache).

The slot of (row, KV head, block) is the pool run of the page that holds the block: page * Hkv + head,
with the page taken from the runtime's block table (`NosaRuntime.host_table`, which in this mode maps a
request's blocks to pool pages). The server writes every token to its page; the runtime's token write
stores the decode token there too (with its bias), so the pool is the one copy. Rows hold no KV, so
moving a request to another row moves only its table row.
"""

from __future__ import annotations

import torch

from nosa_sglang.runtime.full_residency import WholeRows
from nosa_sglang.runtime.page_pool import PagePool


class PoolResidency(WholeRows):
    """The slot interface of FullResidency over a PagePool."""

    def __init__(self, pool: PagePool, max_rows: int) -> None:
        self.pool = pool
        self.num_layers, self.num_kv_heads = pool.num_layers, pool.num_kv_heads
        self.block_size, self.head_dim, self.device = pool.block_size, pool.head_dim, pool.device
        self.trash_slot = pool.trash_run
        bs, d = pool.block_size, pool.head_dim
        self._views = [pool.layer_views(layer) for layer in range(pool.num_layers)]
        self._k_slots = [k.view(-1, bs, d) for k, _, _ in self._views]
        self._v_slots = [v.view(-1, bs, d) for _, v, _ in self._views]
        self._blocks_per_row = [0] * max_rows

    gpu_bytes = 0  # the pool is the server's memory, not the runtime's

    def k_slots(self, layer: int) -> torch.Tensor:
        """[runs, block_size, head_dim]: the pool's K of `layer` (slot id = run id)."""
        return self._k_slots[layer]

    def v_slots(self, layer: int) -> torch.Tensor:
        return self._v_slots[layer]

    def c_slots(self, layer: int) -> torch.Tensor:
        return self._views[layer][2]

    def token_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.kv[:, layer], self.pool.c[layer]

    def slot_id(self, row: int, head: int, block: int) -> int:
        """Not known on the host (the page is in the device table): the trash slot, which the runtime
        replaces by the table's run before any write (NosaRuntime._map_token_pages)."""
        return self.trash_slot
