"""SelectionState: what selection needs on the GPU for every running request, per layer.

- `ck [L, R, Cmax, Hkv, d]` compressed keys K~ (float32 by default: the reference averages in fp32)
  and `ce [L, R, Cmax, Hkv]` float32 eviction chunk means: one entry per kernel_stride tokens.
- `c [L, R, Hkv, max_tokens]` float32, the per-token bias: attention gathers it into the slots of
  missed blocks (GPU-local, so a miss moves only K and V over PCIe).
- `ring [L, R, kernel_size, Hkv, d]` the last kernel_size keys, from which a completed chunk's K~ is
  averaged (the older keys of the window may already live only in the host store).

Rows are the runtime's request rows; the selection kernels take `[B, Cmax, ...]` batches, which are
views when the batch is a contiguous range of rows (the runtime keeps running rows compact) and
gathered copies otherwise.
"""

from __future__ import annotations

import torch

from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels.compress import complete_chunks, compress_windows


class SelectionState:
    """Per-row compressed keys, eviction chunk means, token biases and recent keys of every layer."""

    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        num_kv_heads: int,
        head_dim: int,
        max_tokens: int,
        config: NosaConfig,
        dtype: torch.dtype,
        device: torch.device,
        ck_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.config = config
        self.max_tokens = max_tokens
        self.max_chunks = max(1, config.num_chunks(max_tokens))
        L, R, H, d, ks = num_layers, max_rows, num_kv_heads, head_dim, config.kernel_size
        self.ck = torch.zeros((L, R, self.max_chunks, H, d), dtype=ck_dtype, device=device)
        self.ce = torch.zeros((L, R, self.max_chunks, H), dtype=torch.float32, device=device)
        self.c = torch.zeros((L, R, H, max_tokens), dtype=torch.float32, device=device)
        self.ring = torch.zeros((L, R, ks, H, d), dtype=dtype, device=device)

    @property
    def gpu_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ck, self.ce, self.c, self.ring))

    # -- prompts --------------------------------------------------------------------------------------
    def load_prompts(self, layer: int, k: torch.Tensor, c: torch.Tensor, plan) -> None:
        """Whole-prompt K~, chunk means, biases and recent keys of one or several requests, read as one
        sequence k [N, Hkv, d], c [N, Hkv] with each prompt starting at a block boundary
        (`prompt.PromptLayout`: its windows are then the sequence's windows from its first block on, the
        same means as alone); a few launches whatever their number."""
        ck, ce = compress_windows(k, self.config), compress_windows(c, self.config)
        self.ck[layer][plan.chunk_rows, plan.chunk_ids] = ck[plan.chunk_src].to(self.ck.dtype)
        self.ce[layer][plan.chunk_rows, plan.chunk_ids] = ce[plan.chunk_src]
        self.c[layer].transpose(1, 2)[plan.token_rows, plan.token_ids] = c[plan.token_src].to(torch.float32)
        self.ring[layer][plan.ring_rows, plan.ring_ids] = k[plan.ring_src].to(self.ring.dtype)

    # -- decode ---------------------------------------------------------------------------------------
    def token_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ring [R, kernel_size, Hkv, d], c [R, Hkv, max_tokens]) of `layer`: where a decode token's key
        and bias are recorded (kernels.token_write, with the slot buffers' views)."""
        return self.ring[layer], self.c[layer]

    def complete_chunks(self, layer: int, rows: torch.Tensor, pos: torch.Tensor, completes: torch.Tensor,
                        chunk_ids: torch.Tensor, impl: str = "auto") -> None:
        """After the token at pos [B] of rows [B] was recorded (token_views): requests with completes[b]
        (0/1) append chunk chunk_ids[b] (its K~ = mean of the recent-key ring, its chunk mean = mean of the
        last kernel_size biases); the others write nothing (fixed shapes, no host branch)."""
        complete_chunks(self.ck[layer], self.ce[layer], self.ring[layer], self.c[layer], rows, pos, completes,
                        chunk_ids, self.config, impl=impl)

    def batch(self, layer: int, rows: torch.Tensor, row_range: tuple[int, int] | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(ck, ce, rows) for the selection kernels: views [B, Cmax, ...] and None for a contiguous row
        range, else the layer's whole state [R, Cmax, ...] and the batch's rows, read in place (a gathered
        copy of K~ would move as many bytes as the scores read)."""
        if row_range is not None:
            lo, hi = row_range
            return self.ck[layer, lo:hi], self.ce[layer, lo:hi], None
        return self.ck[layer], self.ce[layer], rows

    def c_layer(self, layer: int) -> torch.Tensor:
        """[R, Hkv, max_tokens] float32 per-token biases of `layer` (a view)."""
        return self.c[layer]

    # -- rows -----------------------------------------------------------------------------------------
    def move_row(self, src_row: int, dst_row: int) -> None:
        for t in (self.ck, self.ce, self.c, self.ring):
            t[:, dst_row] = t[:, src_row]
