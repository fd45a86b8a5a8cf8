"""SlotBuffers: the GPU memory of the slot cache: K, V and bias runs, one slot = one (block, KV head).

Per layer `k`/`v [num_slots + 1, block_size * head_dim]` (the run layout of `kernels.block_copy`, viewed
as `[num_slots + 1, block_size, head_dim]` by the decode kernel) and `c [num_slots + 1, block_size]`
float32. Slots are grouped by request *row*: row r owns slots [r * slots_per_row, (r + 1) * slots_per_row),
so moving a request to another row is a slice copy. The last slot is a *trash* slot: vectorised writes
aim their padding entries at it instead of branching on the host.
"""

from __future__ import annotations

import torch


class SlotBuffers:
    """K/V/c slot memory of every layer for `max_rows` request rows.

    Args:
        num_layers, num_kv_heads, head_dim, block_size, dtype: the KV shape.
        max_rows: request rows (running requests at most).
        slots_per_head: slots each (row, KV head) owns.
        device: where the buffers live (CUDA, or CPU in the named CPU mode).
    """

    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        num_kv_heads: int,
        slots_per_head: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers, self.max_rows, self.num_kv_heads = num_layers, max_rows, num_kv_heads
        self.block_size, self.head_dim, self.dtype, self.device = block_size, head_dim, dtype, device
        self.slots_per_head = slots_per_head
        self.slots_per_row = num_kv_heads * slots_per_head
        self.num_slots = max_rows * self.slots_per_row
        self.trash_slot = self.num_slots
        run = block_size * head_dim
        # NOTE: zero-filled so that a never-written slot can never leak NaN/Inf through a masked load.
        self.kv = torch.zeros((2, num_layers, self.num_slots + 1, run), dtype=dtype, device=device)
        self.c = torch.zeros((num_layers, self.num_slots + 1, block_size), dtype=torch.float32, device=device)
        # NOTE: per-layer views made once: indexing the buffers per call costs ~3 us a select on the
        # hot path (the transfer engine and the kernels ask for them for every layer of every step)
        self._k_runs = [self.kv[0, layer] for layer in range(num_layers)]
        self._v_runs = [self.kv[1, layer] for layer in range(num_layers)]
        self._k_slots = [t.view(-1, block_size, head_dim) for t in self._k_runs]
        self._v_slots = [t.view(-1, block_size, head_dim) for t in self._v_runs]
        self._c_slots = [self.c[layer] for layer in range(num_layers)]
        self.heads = torch.arange(num_kv_heads, device=device)

    @property
    def gpu_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.c.numel() * 4

    # -- views ---------------------------------------------------------------------------------------
    def k_runs(self, layer: int) -> torch.Tensor:
        """[num_slots + 1, block_size * head_dim] (block_copy's layout)."""
        return self._k_runs[layer]

    def v_runs(self, layer: int) -> torch.Tensor:
        return self._v_runs[layer]

    def k_slots(self, layer: int) -> torch.Tensor:
        """[num_slots + 1, block_size, head_dim] (the decode kernel's layout)."""
        return self._k_slots[layer]

    def v_slots(self, layer: int) -> torch.Tensor:
        return self._v_slots[layer]

    def c_slots(self, layer: int) -> torch.Tensor:
        """[num_slots + 1, block_size] float32."""
        return self._c_slots[layer]

    def copy_block_biases(self, layer: int, c: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor,
                          dst_slots: torch.Tensor) -> None:
        """c_slots[dst_slots] = the per-token biases of (row, head, block) for every entry.

        c: [R, Hkv, max_tokens] float32 of the layer; rows: [B] long; blocks, dst_slots: [B, Hkv, K] long
        (-1 blocks read block 0, so aim those entries at the trash slot). No data-dependent shapes."""
        bs = self.block_size
        tok = blocks.clamp(min=0)[..., None] * bs + torch.arange(bs, device=self.device)
        vals = c[rows.view(-1, 1, 1, 1), self.heads.view(1, -1, 1, 1), tok]
        self.c[layer].index_copy_(0, dst_slots.flatten(), vals.flatten(0, 2))

    def slot_id(self, row: int, head: int, local: int) -> int:
        """Global slot of (row, KV head, local slot index): host arithmetic, no device access."""
        return (row * self.num_kv_heads + head) * self.slots_per_head + local

    def slot_base(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, 1] global slot of local index 0 of each (row, head)."""
        return ((rows.view(-1, 1) * self.num_kv_heads + self.heads.view(1, -1)) * self.slots_per_head)[..., None]

    # -- writes ----------------------------------------------------------------------------------------
    def token_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv [2, S, block_size * d], c [S, block_size]) of `layer`: where a decode token is written
        (kernels.token_write, with the selection state's views)."""
        return self.kv[:, layer], self.c[layer]

    def write_runs(
        self, layer: int, slots: torch.Tensor, k_runs: torch.Tensor, v_runs: torch.Tensor, c_runs: torch.Tensor
    ) -> None:
        """Store whole blocks: slots [n] long, k_runs/v_runs [n, block_size * d], c_runs [n, block_size]."""
        self.kv[0, layer][slots] = k_runs.to(self.dtype)
        self.kv[1, layer][slots] = v_runs.to(self.dtype)
        self.c[layer][slots] = c_runs.to(torch.float32)

    def copy_slots(self, layer: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """GPU-local copy of K, V and c from slots src [n] to dst [n] (dst may repeat the trash slot)."""
        self.kv[:, layer, dst] = self.kv[:, layer, src]
        self.c[layer][dst] = self.c[layer][src]

    def move_row_data(self, src_row: int, dst_row: int) -> None:
        """Copy every slot of row `src_row` onto row `dst_row` (all layers)."""
        n = self.slots_per_row
        s, d = src_row * n, dst_row * n
        self.kv[:, :, d : d + n] = self.kv[:, :, s : s + n]
        self.c[:, d : d + n] = self.c[:, s : s + n]
