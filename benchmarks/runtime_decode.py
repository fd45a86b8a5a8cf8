"""RuntimeDecode: greedy decoding of a random reference NOSA-Llama through NosaRuntime, one step per
call, for benchmarks that need the real runtime decoding (benchmarks/grpc_load.py).

The reference model's own attention runs through `OffloadAttentionBackend`: the prompt is prefilled
once with the sparse prefill kernel and handed to the runtime, then every step appends and attends
through the host store and the GPU slot cache, as `nosa-sglang demo --offload` does.
"""

from __future__ import annotations

import torch

from nosa_sglang.reference.checkpoint import TINY_SHAPE
from nosa_sglang.reference.llama_config import LlamaShape
from nosa_sglang.reference.model import NosaLlamaForCausalLM, init_random_
from nosa_sglang.reference.offload_backend import OffloadAttentionBackend, runtime_for_model
from nosa_sglang.runtime.nosa_runtime import NosaRuntime

#: random NOSA-Llama shapes: "tiny" is the demo checkpoint's; "1b" has the attention stack of the
#: 1B-like model of docs/runtime.md (28 layers, Hq 16, Hkv 2, d 128)
MODEL_SHAPES = {
    "tiny": TINY_SHAPE,
    "1b": LlamaShape(vocab_size=32000, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=2, head_dim=128, max_position_embeddings=131072),
}
#: first token id of the random prompts (0-2 are the byte tokenizer's specials)
_FIRST_PROMPT_ID = 3


class RuntimeDecode:
    """One request decoded greedily, one step per `step()` call (batch 1).

    A request about to pass the runtime's max_seq_len is ended and the prompt prefilled again as a new
    request, so `step()` works for as many steps as a benchmark runs (that one step also pays a prefill).
    """

    def __init__(self, model: NosaLlamaForCausalLM, runtime: NosaRuntime, prompt_ids: torch.Tensor,
                 label: str) -> None:
        self.model, self.runtime, self.prompt_ids, self.label = model, runtime, prompt_ids, label
        self.backend = OffloadAttentionBackend(runtime)
        self.device = prompt_ids.device
        self.requests = 0
        self._begin()

    @torch.no_grad()
    def _begin(self) -> None:
        self.requests += 1
        self.request_id = f"bench-{self.requests}"
        self.backend.start([self.request_id])
        positions = torch.arange(len(self.prompt_ids), device=self.device)
        logits = self.model._forward(self.prompt_ids, positions,
                                     lambda i, q, k, v, c: self.backend.prefill(i, 0, q, k, v, c))
        self.token = logits[-1:].argmax(-1)  # [1] on the device: no host read-back per step
        self.position = len(self.prompt_ids)

    @torch.no_grad()
    def step(self) -> None:
        """One decode step; returns when the device has finished it."""
        if self.runtime.seq_len(self.request_id) + 1 > self.runtime.max_seq_len:
            self.backend.finish()
            self._begin()
        positions = torch.tensor([self.position], device=self.device)
        self.token = self.model._forward(self.token, positions, self.backend.decode).argmax(-1)
        self.position += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def close(self) -> None:
        """End the request (the runtime publishes its final counters)."""
        self.backend.finish()


def build_runtime_decode(model: str = "tiny", device: str = "auto", prompt_tokens: int = 8192,
                         restart_every: int = 16384, seed: int = 0) -> RuntimeDecode:
    """A random `model` (bf16 on CUDA except "tiny", else fp32) on `device` ("auto": CUDA if available),
    a NosaRuntime sized for one request of at most prompt_tokens + restart_every tokens, and the
    prompt (random ids) prefilled."""
    if model not in MODEL_SHAPES:
        raise ValueError(f"model={model!r}: allowed values are {list(MODEL_SHAPES)}")
    shape = MODEL_SHAPES[model]
    if prompt_tokens < 1 or restart_every < 1 or prompt_tokens + restart_every > shape.max_position_embeddings:
        raise ValueError(f"prompt_tokens={prompt_tokens}, restart_every={restart_every}: both >= 1, sum allowed "
                         f"range is <= {shape.max_position_embeddings} (the model's max_position_embeddings)")
    dev = torch.device(device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" and model != "tiny" else torch.float32
    with dev:  # NOTE: the constructor's own init (discarded) is seconds per 1B parameters on a CPU
        net = NosaLlamaForCausalLM(shape)
    init_random_(net, seed)
    net = net.to(device=dev, dtype=dtype).eval()
    runtime = runtime_for_model(net, max_requests=1, max_seq_len=prompt_tokens + restart_every)
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(_FIRST_PROMPT_ID, shape.vocab_size, (prompt_tokens,), generator=g).to(dev)
    nosa, blocks = net.nosa, net.nosa.num_blocks(prompt_tokens)
    label = (f"NosaRuntime decoding a random {model} NOSA-Llama ({shape.num_hidden_layers} layers, "
             f"Hq {shape.num_attention_heads}, Hkv {shape.num_key_value_heads}, d {shape.head_dim}, "
             f"{str(dtype).removeprefix('torch.')}) on {dev}, batch 1, eager; prompt {prompt_tokens} tokens = "
             f"{blocks} blocks (topk {nosa.topk_blocks}: {'sparse' if blocks > nosa.topk_blocks else 'dense'}), "
             f"gpu_slots {runtime.knobs().gpu_slots}, {runtime.knobs().transfer_mode}")
    return RuntimeDecode(net, runtime, prompt_ids, label)
