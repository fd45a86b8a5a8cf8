import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nosa_sglang.config import NosaConfig
from nosa_sglang.reference.checkpoint import TINY_SHAPE, load_checkpoint, make_tiny_checkpoint
from nosa_sglang.reference.llama_config import CheckpointError, LlamaShape
from nosa_sglang.reference.tokenizer import EOS_ID, load_tokenizer

SMALL_SHAPE = LlamaShape(
    vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", SMALL_SHAPE, seed=1)


def rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def copy_ckpt(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_tiny_checkpoint_has_the_authors_layout(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["architectures"] == ["SparseLlamaForCausalLM"] and "nosa" not in cfg
    names = load_file(str(tiny / "model.safetensors"))
    assert names["model.layers.1.self_attn.A"].shape == (2,)
    assert names["model.layers.1.self_attn.delta.weight"].shape == (2, 16)
    assert "model.layers.0.self_attn.delta.bias" not in names
    assert (names["model.layers.0.self_attn.A"] != 0).all()


def test_round_trip_gives_identical_logits_for_both_architectures(tmp_path):
    for arch in ("SparseLlamaForCausalLM", "NosaLlamaForCausalLM"):
        from nosa_sglang.reference.checkpoint import save_checkpoint

        a = make_tiny_checkpoint(tmp_path / arch, SMALL_SHAPE, seed=2, architecture=arch)
        m = load_checkpoint(a)
        save_checkpoint(m, tmp_path / (arch + "-2"), arch)
        m2 = load_checkpoint(tmp_path / (arch + "-2"))
        ids = torch.randint(0, 259, (50,))
        pos = torch.arange(50)
        from nosa_sglang.reference.backend import ReferenceAttentionBackend

        be = ReferenceAttentionBackend(m.nosa)
        be.start(["r"])
        l1 = m._forward(ids, pos, lambda i, q, k, v, c: be.prefill(i, 0, q, k, v, c))
        be.start(["r"])
        l2 = m2._forward(ids, pos, lambda i, q, k, v, c: be.prefill(i, 0, q, k, v, c))
        assert torch.equal(l1, l2)


def test_bias_tensors_exist_exactly_when_attention_bias(tmp_path):
    shape = LlamaShape(**{**SMALL_SHAPE.__dict__, "attention_bias": True})
    p = make_tiny_checkpoint(tmp_path / "b", shape)
    names = load_file(str(p / "model.safetensors"))
    assert "model.layers.0.self_attn.delta.bias" in names and "model.layers.0.self_attn.q_proj.bias" in names
    load_checkpoint(p)


def test_non_default_nosa_constants_round_trip(tmp_path):
    nosa = NosaConfig(block_size=16, kernel_size=8, kernel_stride=4, local_blocks=2, query_blocks=5, topk_blocks=8)
    p = make_tiny_checkpoint(tmp_path / "n", SMALL_SHAPE, nosa=nosa)
    assert load_checkpoint(p).nosa == nosa


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: t.pop("model.layers.1.self_attn.A"), r"tensor model\.layers\.1\.self_attn\.A: missing"),
        (lambda t: t.pop("model.layers.0.self_attn.delta.weight"), r"tensor model\.layers\.0\.self_attn\.delta\.weight: missing"),
        (lambda t: t.update({"model.layers.0.self_attn.A": torch.ones(3)}), r"tensor model\.layers\.0\.self_attn\.A: shape \[3\]"),
        (lambda t: t.update({"model.layers.0.self_attn.delta.weight": torch.ones(2, 8)}), r"delta\.weight: shape \[2, 8\]"),
        (lambda t: t.update({"model.layers.0.self_attn.delta.bias": torch.ones(2)}), r"delta\.bias: unexpected"),
    ],
)
def test_malformed_checkpoint_names_the_tensor(tiny, tmp_path, edit, match):
    p = copy_ckpt(tiny, tmp_path / "bad")
    rewrite(p, edit)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(p)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope_scaling"),
        ({"nosa": {"topk_blocks": 2}}, "topk_blocks"),
    ],
)
def test_malformed_config_names_the_field(tiny, tmp_path, change, match):
    p = copy_ckpt(tiny, tmp_path / "badcfg")
    cfg = json.loads((p / "config.json").read_text())
    cfg.update(change)
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_checkpoint(p)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(SMALL_SHAPE.to_hf_dict()))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path)


def test_tokenizer_works_offline_with_tokenizers_and_transformers(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = "NOSA: ünïcode & bytes\n"
    tok = load_tokenizer(tiny)
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text and max(ids) < TINY_SHAPE.vocab_size
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny))
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.eos_token_id == EOS_ID


def test_greedy_generate_is_deterministic_and_stops_at_eos(tiny):
    m = load_checkpoint(tiny)
    a = m.generate([[5, 6, 7] * 30, [9] * 45], 6)
    b = m.generate([[5, 6, 7] * 30, [9] * 45], 6)
    assert a == b and [len(t) for t in a.tokens] == [6, 6]
    eos = a.tokens[0][1]
    c = m.generate([[5, 6, 7] * 30], 6, eos_token_id=eos)
    assert c.tokens[0][-1] == eos and len(c.tokens[0]) <= 2
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate([[1]], 0)
    with pytest.raises(ValueError, match="prompts"):
        m.generate([[]], 3)


def test_batched_decode_equals_each_prompt_alone(tiny):
    m = load_checkpoint(tiny)
    p1, p2 = [3, 4, 5] * 40, list(range(10, 80))
    both = m.generate([p1, p2], 5).tokens
    assert both == [m.generate([p1], 5).tokens[0], m.generate([p2], 5).tokens[0]]
