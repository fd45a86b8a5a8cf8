"""FullResidency: the `gpu_only` mode: every block of every running request has its own GPU slot.

Slot of (row, KV head, block) = (row * Hkv + head) * max_blocks + block: no maps, no misses, no host
tier. It is NOSA fully on the GPU (benchmark configuration (c)): the same selection and the same
attention kernel as the offload mode, with the full KV cache in HBM.
"""

from __future__ import annotations

import torch

from nosa_sglang.runtime.slot_buffers import SlotBuffers


class WholeRows:
    """Residency bookkeeping when every block of a row is resident: blocks per row, known on the host.
    A subclass sets `_blocks_per_row`, `num_layers`, `num_kv_heads` and `device`."""

    _blocks_per_row: list[int]

    def set_blocks(self, row: int, n_blocks: int) -> None:
        self._blocks_per_row[row] = n_blocks

    def clear_row(self, row: int) -> None:
        self._blocks_per_row[row] = 0

    def move_row(self, src_row: int, dst_row: int) -> None:
        self._blocks_per_row[dst_row] = self._blocks_per_row[src_row]

    def resident_per_row(self) -> torch.Tensor:
        """[rows] (layer, KV head, block) triples resident per row (the counters' unit), uploaded without
        a sync."""
        n = torch.tensor(self._blocks_per_row, dtype=torch.long) * (self.num_layers * self.num_kv_heads)
        if self.device.type == "cuda":
            n = n.pin_memory().to(self.device, non_blocking=True)  # NOTE: pageable H2D would sync
        return n


class FullResidency(WholeRows, SlotBuffers):
    """All `max_blocks` blocks of each (layer, row, KV head) resident."""

    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        num_kv_heads: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        max_blocks: int,
        device: torch.device,
    ) -> None:
        super().__init__(num_layers, max_rows, num_kv_heads, max_blocks, block_size, head_dim, dtype, device)
        self.max_blocks = max_blocks
        self._blocks_per_row = [0] * max_rows  # host-known residency (blocks per row, any layer/head)

    def block_slot_id(self, row: int, head: int, block: int) -> int:
        return self.slot_id(row, head, block)

    def move_row(self, src_row: int, dst_row: int) -> None:
        super().move_row(src_row, dst_row)
        self.move_row_data(src_row, dst_row)
