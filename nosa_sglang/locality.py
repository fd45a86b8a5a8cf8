"""Locality of a selection stream: how many blocks enter the selected set from one decode step to the next.

NOSA's promise (NOSA_SPEC.md, "Why it offloads"): at most query_blocks - forced + 1 per step per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def entering_blocks(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Blocks in `cur` that were not in `prev`, per row. prev, cur: [..., topk] ids, -1 = padding -> [...]."""
    hit = (cur[..., :, None] == prev[..., None, :]).any(-1)
    return ((cur >= 0) & ~hit).sum(-1)


@dataclass
class LocalityTracker:
    """Accumulates entering-block counts over decode steps, per (layer, request, KV head)."""

    steps: int = 0
    total_entering: int = 0
    rows: int = 0
    max_entering: int = 0
    selected_sum: int = 0

    def __post_init__(self) -> None:
        self._prev: dict[int, torch.Tensor] = {}

    def update(self, layer: int, selection: torch.Tensor) -> None:
        sel = selection.detach().cpu()
        prev = self._prev.get(layer)
        if prev is not None and prev.shape == sel.shape:
            ent = entering_blocks(prev, sel)
            self.total_entering += int(ent.sum())
            self.rows += ent.numel()
            self.max_entering = max(self.max_entering, int(ent.max()))
            self.selected_sum += int((sel >= 0).sum())
        self._prev[layer] = sel

    def reset_interval(self) -> None:
        self.total_entering = self.rows = self.max_entering = self.selected_sum = 0

    @property
    def mean_entering(self) -> float:
        return self.total_entering / self.rows if self.rows else 0.0

    @property
    def mean_selected(self) -> float:
        return self.selected_sum / self.rows if self.rows else 0.0
