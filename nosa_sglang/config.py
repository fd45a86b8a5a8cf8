"""NosaConfig: the NOSA selection constants of one model (NOSA_SPEC.md, "Shapes and defaults").

They are part of the model (it was trained with them), so the config is frozen and validated once;
the runtime's tunable knobs live elsewhere (`nosa_sglang.runtime.knobs`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

#: key under which our own NOSA fields may appear in a checkpoint's config.json
HF_CONFIG_KEY = "nosa"


class NosaConfigError(ValueError):
    """A NOSA config field is out of its allowed range; the message names the field."""


@dataclass(frozen=True)
class NosaConfig:
    """Selection constants, per attention layer and per KV head.

    Attributes:
        block_size: tokens per KV block: the unit of selection, caching and transfer.
        kernel_size: tokens averaged into one compressed key (and one eviction chunk score).
        kernel_stride: distance in tokens between consecutive compressed-key windows.
        init_blocks: sink blocks always selected.
        local_blocks: blocks *before* the current one that are always selected.
        query_blocks: blocks chosen by the query-aware score, forced blocks included.
        topk_blocks: blocks attended per KV head (query part filled up by eviction score).
    """

    block_size: int = 64
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    local_blocks: int = 16
    query_blocks: int = 33
    topk_blocks: int = 64

    def __post_init__(self) -> None:
        self.validate()

    # -- derived values -------------------------------------------------------------------------
    @property
    def forced_blocks(self) -> int:
        """Sink + current + local blocks: always selected once they exist."""
        return self.init_blocks + self.local_blocks + 1

    @property
    def free_query_blocks(self) -> int:
        """Blocks the query score picks freely (beyond the forced ones)."""
        return self.query_blocks - self.forced_blocks

    @property
    def eviction_blocks(self) -> int:
        """Blocks filled by the query-agnostic eviction score."""
        return self.topk_blocks - self.query_blocks

    @property
    def chunks_per_block(self) -> int:
        """r = block_size / kernel_stride: compressed-key windows starting inside one block."""
        return self.block_size // self.kernel_stride

    @property
    def max_entering_blocks(self) -> int:
        """Locality bound: blocks that may enter the selection between consecutive decode steps."""
        return self.free_query_blocks + 1

    def num_chunks(self, seq_len: int) -> int:
        """Compressed keys that exist for a sequence of `seq_len` tokens (complete windows only)."""
        if seq_len < self.kernel_size:
            return 0
        return (seq_len - self.kernel_size) // self.kernel_stride + 1

    def num_blocks(self, seq_len: int) -> int:
        """KV blocks that hold `seq_len` tokens (the last one may be partial)."""
        return -(-seq_len // self.block_size)

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise NosaConfigError naming the field, its value and the allowed range."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise NosaConfigError(
                    f"NosaConfig.{f.name}={value!r}: must be an int (allowed range: >= 1)"
                )
            if value < 1:
                raise NosaConfigError(f"NosaConfig.{f.name}={value}: allowed range is >= 1")
        if self.block_size % self.kernel_stride:
            raise NosaConfigError(
                f"NosaConfig.block_size={self.block_size}: must be a multiple of "
                f"kernel_stride={self.kernel_stride}"
            )
        if self.kernel_size < self.kernel_stride:
            raise NosaConfigError(
                f"NosaConfig.kernel_size={self.kernel_size}: allowed range is >= "
                f"kernel_stride={self.kernel_stride}"
            )
        if self.query_blocks < self.forced_blocks:
            raise NosaConfigError(
                f"NosaConfig.query_blocks={self.query_blocks}: allowed range is >= forced blocks "
                f"(init_blocks + local_blocks + 1 = {self.forced_blocks})"
            )
        if self.topk_blocks < self.query_blocks:
            raise NosaConfigError(
                f"NosaConfig.topk_blocks={self.topk_blocks}: allowed range is >= "
                f"query_blocks={self.query_blocks}"
            )

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "NosaConfig":
        """Build from a mapping; unknown keys are an error (a typo must not silently default)."""
        if not isinstance(values, Mapping):
            raise NosaConfigError(f"NosaConfig: expected an object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise NosaConfigError(
                f"NosaConfig: unknown field(s) {unknown}; allowed fields: {sorted(known)}"
            )
        return cls(**dict(values))

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "NosaConfig":
        """NOSA constants of a checkpoint.

        The authors' checkpoints carry no NOSA fields (their constants are our defaults), so only
        an optional `nosa` object (our own key) in config.json overrides them. Accepts a path to a
        checkpoint dir or config.json, a dict, or an object with attributes (HF PretrainedConfig).
        """
        if isinstance(hf_config, (str, os.PathLike)):
            path = os.fspath(hf_config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, encoding="utf-8") as f:
                hf_config = json.load(f)
        if isinstance(hf_config, Mapping):
            values = hf_config.get(HF_CONFIG_KEY)
        else:
            values = getattr(hf_config, HF_CONFIG_KEY, None)
        return cls() if values is None else cls.from_dict(values)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
