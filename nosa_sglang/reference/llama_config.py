"""LlamaShape: the fields of a NOSA-Llama config.json the model needs, validated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

ARCHITECTURES = ("SparseLlamaForCausalLM", "NosaLlamaForCausalLM")


class CheckpointError(ValueError):
    """A checkpoint is malformed; the message names the file, field or tensor."""


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any]) -> "LlamaShape":
        arch = cfg.get("architectures") or []
        if not any(a in ARCHITECTURES for a in arch):
            raise CheckpointError(f"config.json: architectures={arch!r}; expected one of {list(ARCHITECTURES)}")
        rs = cfg.get("rope_scaling")
        if rs not in (None, {}) and (rs.get("rope_type") or rs.get("type")) not in ("default", None):
            raise CheckpointError(f"config.json: rope_scaling={rs!r} is not supported (only none/default)")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        for name in required:
            if not isinstance(cfg.get(name), int) or cfg[name] < 1:
                raise CheckpointError(f"config.json: {name}={cfg.get(name)!r}; expected a positive integer")
        hq = cfg["num_attention_heads"]
        hkv = cfg.get("num_key_value_heads", hq)
        if not isinstance(hkv, int) or hkv < 1 or hq % hkv:
            raise CheckpointError(
                f"config.json: num_key_value_heads={hkv!r}; expected a positive divisor of num_attention_heads={hq}"
            )
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // hq
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: cfg[k] for k in known if k in cfg and cfg[k] is not None}
        values.update(num_key_value_heads=hkv, head_dim=head_dim)
        return cls(**values)

    def to_hf_dict(self, architecture: str = "SparseLlamaForCausalLM") -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(architectures=[architecture], model_type="llama", hidden_act="silu", torch_dtype="float32")
        return d
