"""Small shared types of the runtime: the model shape it serves, admission results, its errors.

Expected "no room" conditions (host blocks, GPU rows) are back-pressure: `NosaRuntime.can_admit`
reports them as a value, `begin_request` raises `HostMemoryExhausted` / `GpuSlotsExhausted` and
changes nothing. A request that needs more host blocks than the store holds at all can never be
admitted, so waiting must not be the answer: `RequestTooLarge` (a ValueError) and `Admission.never`.
Broken caller invariants (unknown request, wrong batch) raise `RuntimeUsageError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of the model the runtime serves (one entry for all layers)."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelShape.{name}={value!r}: allowed range is an int >= 1")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelShape.num_q_heads={self.num_q_heads}: must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"ModelShape.dtype={self.dtype}: allowed values are float16, bfloat16, float32")

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def kv_bytes(self, tokens: int) -> int:
        """K and V of `tokens` tokens in every layer and KV head (tokens = block_size: one host block)."""
        return 2 * self.num_layers * self.num_kv_heads * tokens * self.head_dim * self.dtype_bytes


class GpuSlotsExhausted(RuntimeError):
    """Every GPU row (slot cache of one running request) is taken: back-pressure, not a bug."""

    def __init__(self, max_requests: int) -> None:
        super().__init__(f"no GPU slots: all {max_requests} request rows of the slot cache are in use")
        self.max_requests = max_requests


class RequestTooLarge(ValueError):
    """A request needs more host blocks than the host store holds in all: reject it, do not wait."""

    def __init__(self, tokens: int, needed: int, total: int) -> None:
        super().__init__(f"prompt of {tokens} tokens needs {needed} host block(s); the host store holds "
                         f"{total} in all (host_capacity_bytes): this request can never be admitted")
        self.tokens, self.needed, self.total = tokens, needed, total


class RuntimeUsageError(RuntimeError):
    """The caller broke the runtime's protocol (unknown request, batch changed mid-step, ...)."""


class Admission(NamedTuple):
    """Whether a request of `prompt_tokens` could begin now, and if not why (`reason`)."""

    ok: bool
    host_blocks_needed: int
    host_blocks_free: int
    gpu_rows_free: int
    reason: str = ""
    never: bool = False  #: no amount of waiting helps (too long for max_seq_len or for the whole store)


class Admitted(NamedTuple):
    """What `begin_request` set up: the request's host block ids (block i holds tokens [64i, 64i+64))."""

    request_id: str
    host_blocks: tuple[int, ...]
    seq_len_tokens: int
