"""The reference model's generate() through the offload runtime gives the tokens of the reference backend."""

from __future__ import annotations

import os

import pytest
import torch

from kernel_checks import SMALL

from nosa_sglang.reference.backend import ReferenceAttentionBackend
from nosa_sglang.reference.llama_config import LlamaShape
from nosa_sglang.reference.model import NosaLlamaForCausalLM, init_random_
from nosa_sglang.reference.offload_backend import OffloadAttentionBackend, runtime_for_model
from nosa_sglang.runtime import OffloadKnobs


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int) -> NosaLlamaForCausalLM:
    shape = LlamaShape(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    model = NosaLlamaForCausalLM(shape, SMALL)
    init_random_(model, seed)
    return model.eval()


@pytest.mark.parametrize("slots", [8, 16])
def test_generate_with_offload_equals_reference(slots):
    seed = int.from_bytes(os.urandom(2), "little")
    print(f"seed={seed}")
    model = tiny_model(seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (260, 201)]
    ref = model.generate(prompts, 24, backend=ReferenceAttentionBackend(SMALL)).tokens
    rt = runtime_for_model(model, OffloadKnobs(gpu_slots=slots), max_requests=2, max_seq_len=512)
    out = model.generate(prompts, 24, backend=OffloadAttentionBackend(rt)).tokens
    assert out == ref
    snap = rt.snapshot()
    assert snap.totals.hits > 0 and snap.running_requests == 0 and rt.host.used_blocks == 0
    if slots == SMALL.topk_blocks:
        assert snap.totals.misses > 0
