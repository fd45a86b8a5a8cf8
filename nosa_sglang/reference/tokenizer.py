"""A byte-level tokenizer that needs no download: 3 specials + the 256 byte symbols, no merges.

Written as tokenizer.json (the `tokenizers` format) + tokenizer_config.json, so both
`tokenizers.Tokenizer.from_file` and transformers' AutoTokenizer (what SGLang uses) load it offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ("<unk>", "<s>", "</s>")
BOS_ID, EOS_ID = 1, 2


def build_byte_tokenizer() -> Tokenizer:
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def write_byte_tokenizer(path: str | os.PathLike, model_max_length: int) -> None:
    root = Path(path)
    build_byte_tokenizer().save(str(root / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "model_max_length": model_max_length,
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (root / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n"
    )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
