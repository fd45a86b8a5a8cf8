"""Load and write NOSA-Llama checkpoints in the authors' layout (config.json + safetensors).

Names are Llama's plus, per layer, `model.layers.N.self_attn.A` [Hkv] and
`model.layers.N.self_attn.delta.weight` [Hkv, Hkv*d] (`.bias` exactly when attention_bias).
A malformed checkpoint fails before any weight is used, naming the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nosa_sglang.config import HF_CONFIG_KEY, NosaConfig
from nosa_sglang.reference.llama_config import CheckpointError, LlamaShape
from nosa_sglang.reference.model import NosaLlamaForCausalLM, init_random_
from nosa_sglang.reference.tokenizer import write_byte_tokenizer

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(path: str | os.PathLike) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (a checkpoint directory needs config.json)")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or of the shards listed in model.safetensors.index.json."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{root}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(root / f)))
    return tensors


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], tied: bool) -> None:
    """Raise CheckpointError naming the first missing, misshapen or unexpected tensor."""
    for name, ref in expected.items():
        if name not in found:
            if tied and name == "lm_head.weight":
                continue
            raise CheckpointError(f"tensor {name}: missing from the checkpoint (expected shape {list(ref.shape)})")
        if tuple(found[name].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"tensor {name}: shape {list(found[name].shape)} does not match the config (expected {list(ref.shape)})"
            )
    for name in found:
        if name not in expected and not name.endswith(IGNORED_SUFFIXES):
            raise CheckpointError(f"tensor {name}: unexpected in a NOSA-Llama checkpoint")


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> NosaLlamaForCausalLM:
    """Build the reference model from a checkpoint directory."""
    cfg = read_config(path)
    shape = LlamaShape.from_hf_dict(cfg)
    model = NosaLlamaForCausalLM(shape, NosaConfig.from_hf_config(cfg))
    tensors = read_tensors(path)
    check_state_dict(model.state_dict(), tensors, shape.tie_word_embeddings)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}, strict=False)
    return model.to(dtype).eval()


def save_checkpoint(
    model: NosaLlamaForCausalLM, path: str | os.PathLike, architecture: str = "SparseLlamaForCausalLM"
) -> None:
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    cfg = model.shape.to_hf_dict(architecture)
    if model.nosa != NosaConfig():
        cfg[HF_CONFIG_KEY] = model.nosa.to_dict()
    cfg.update(bos_token_id=1, eos_token_id=2)
    (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.shape.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})


TINY_SHAPE = LlamaShape(
    vocab_size=259,  # 3 specials + 256 byte symbols
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    rope_theta=10000.0,
    max_position_embeddings=65536,
)


def make_tiny_checkpoint(
    path: str | os.PathLike,
    shape: LlamaShape = TINY_SHAPE,
    nosa: NosaConfig | None = None,
    seed: int = 0,
    architecture: str = "SparseLlamaForCausalLM",
) -> Path:
    """Write a random-initialised NOSA-Llama (nonzero A) with a byte-level tokenizer that works offline."""
    if shape.vocab_size < 259:
        raise ValueError(f"shape.vocab_size={shape.vocab_size}: allowed range is >= 259 (byte tokenizer)")
    model = NosaLlamaForCausalLM(shape, nosa)
    init_random_(model, seed)
    save_checkpoint(model, path, architecture)
    write_byte_tokenizer(path, shape.max_position_embeddings)
    return Path(path)
