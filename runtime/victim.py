"""Victim policies: which resident, non-selected block gives up its GPU slot to a miss.

A policy only orders slots by a float *key* (lowest evicted first); the slot cache adds the tiers
that never change (empty slots first, selected and tail slots never). Keys are per slot, so both
policies are a gather and a `torch.where` on the GPU: no host round trip on the hot path.

- "eviction_score": key = E_b, the query-agnostic eviction block score of the slot's block (NOSA's
  own ranking: the blocks E ranks high are the ones the fill-by-E part selects again).
- "lru": key = the decode step that last selected the block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


def sortable(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
    bits = x.contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


class VictimPolicy(ABC):
    """Orders the slots of each (request, KV head): lower key = evicted first."""

    name: str
    uses_scores: bool  # whether it reads eviction scores (else stored_e need not be kept)

    @abstractmethod
    def keys(
        self, slot_block: torch.Tensor, E: torch.Tensor | None, stored_e: torch.Tensor, last_step: torch.Tensor
    ) -> torch.Tensor:
        """Eviction keys of the slots, as int32 (order-preserving; lower = evicted first).

        Args:
            slot_block: [B, Hkv, S] int32, block held by each slot (-1 = empty; the caller tiers those).
            E: [B, Hkv, NB] float32 eviction block scores now (None when unknown, e.g. at append).
            stored_e: [B, Hkv, S] float32, E of each slot's block when it was last selected or loaded.
            last_step: [B, Hkv, S] int32, the decode step that last selected (or loaded) the block.
        Returns:
            [B, Hkv, S] int32.
        """


class EvictionScoreVictims(VictimPolicy):
    """Lowest eviction score first: keeps the blocks NOSA's query-agnostic ranking will pick again."""

    name = "eviction_score"
    uses_scores = True

    def keys(self, slot_block, E, stored_e, last_step):
        if E is None:
            return sortable(stored_e)
        return sortable(E.gather(-1, slot_block.long().clamp(0, E.shape[-1] - 1)))


class LruVictims(VictimPolicy):
    """Least recently selected first."""

    name = "lru"
    uses_scores = False

    def keys(self, slot_block, E, stored_e, last_step):
        return last_step


_POLICIES: dict[str, type[VictimPolicy]] = {"eviction_score": EvictionScoreVictims, "lru": LruVictims}


def make_victim_policy(name: str) -> VictimPolicy:
    """The policy named by the `victim_policy` knob."""
    if name not in _POLICIES:
        raise ValueError(f"victim_policy={name!r}: allowed values are {sorted(_POLICIES)}")
    return _POLICIES[name]()
