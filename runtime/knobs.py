"""OffloadKnobs: the runtime settings that never change a model output, only speed and memory.

Frozen and validated; a change is a new object (`with_changes`) that the runtime swaps in at the next
step boundary. The NOSA selection constants are not knobs: they are the model's (NosaConfig).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

TRANSFER_MODES = ("zero_copy", "copy_engine")
VICTIM_POLICIES = ("eviction_score", "lru")
#: upper bound on GPU slots per (request, layer, KV head): 64 blocks of 64 tokens = 4K tokens is the
#: selection; 1024 slots = 64K tokens per head is far past the point where every block hits.
MAX_GPU_SLOTS = 1024
#: upper bound on the host capacity knob (1 PiB): a sanity limit, not a machine's size
MAX_HOST_CAPACITY_BYTES = 1 << 50


class KnobError(ValueError):
    """A knob value is invalid; `field` names it and the message gives the allowed range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class OffloadKnobs:
    """Tunable offload settings.

    Attributes:
        gpu_slots: GPU slots per (request, layer, KV head); >= topk_blocks (checked against the model
            by `validate_for`), <= MAX_GPU_SLOTS. More slots turn misses into hits.
        transfer_mode: "zero_copy" (Triton reads pinned host memory) or "copy_engine" (DMA).
        prefetch: fetch the query-agnostic part of the next step's selection one step ahead (zero-copy
            mode, eviction-score victims). Off by default: it never raised the measured hit rate, and its
            planning is ~80 small kernels a layer (an 8B 128K step took 5.3x as long, docs/runtime.md).
        host_capacity_bytes: cap on pinned host KV bytes (0 = as allocated at start).
        victim_policy: which non-selected resident block gives up its slot on a miss.
    """

    gpu_slots: int = 64
    transfer_mode: str = "zero_copy"
    prefetch: bool = False
    host_capacity_bytes: int = 0
    victim_policy: str = "lru"  # measured better than "eviction_score" above topk slots (docs/runtime.md)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, topk_blocks: int = 1) -> None:
        """Raise KnobError naming the field and the allowed range."""
        _validate(self.to_dict(), topk_blocks)

    def validate_for(self, topk_blocks: int) -> "OffloadKnobs":
        """Check the knobs against a model's topk_blocks (slots must hold one whole selection)."""
        self.validate(topk_blocks)
        return self

    def with_changes(self, changes: Mapping[str, Any], topk_blocks: int = 1) -> "OffloadKnobs":
        """A new, validated OffloadKnobs; unknown fields are an error and `self` never changes."""
        known = {f.name for f in dataclasses.fields(self)}
        for name in changes:
            if name not in known:
                raise KnobError(name, f"unknown knob {name!r}; known knobs: {sorted(known)}")
        merged = {**self.to_dict(), **dict(changes)}
        _validate(merged, topk_blocks)  # before construction, so ranges name the model's bound
        return dataclasses.replace(self, **dict(changes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validate(values: Mapping[str, Any], topk_blocks: int) -> None:
    _check_int("gpu_slots", values["gpu_slots"], max(1, topk_blocks), MAX_GPU_SLOTS)
    if values["transfer_mode"] not in TRANSFER_MODES:
        raise KnobError(
            "transfer_mode",
            f"transfer_mode={values['transfer_mode']!r}: allowed values are {list(TRANSFER_MODES)}",
        )
    if not isinstance(values["prefetch"], bool):
        raise KnobError("prefetch", f"prefetch={values['prefetch']!r}: must be a bool (true/false)")
    _check_int("host_capacity_bytes", values["host_capacity_bytes"], 0, MAX_HOST_CAPACITY_BYTES)
    if values["victim_policy"] not in VICTIM_POLICIES:
        raise KnobError(
            "victim_policy",
            f"victim_policy={values['victim_policy']!r}: allowed values are {list(VICTIM_POLICIES)}",
        )


def _check_int(field: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KnobError(field, f"{field}={value!r}: must be an integer in [{lo}, {hi}]")
    if not lo <= value <= hi:
        raise KnobError(field, f"{field}={value}: allowed range is [{lo}, {hi}]")
