"""`nosa-sglang demo`: greedy decoding of a tiny generated NOSA model on a prompt long enough that
selection is really sparse, with a table of throughput and selection locality every N steps.

The front door of the project: later layers (kernels, offload runtime, gRPC) are routed through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nosa_sglang.locality import LocalityTracker
from nosa_sglang.reference.backend import AttentionBackend, ReferenceAttentionBackend
from nosa_sglang.reference.checkpoint import load_checkpoint, make_tiny_checkpoint
from nosa_sglang.reference.tokenizer import load_tokenizer

DEFAULT_CHECKPOINT = Path(".nosa") / "tiny-nosa-llama"
PROMPT_SEED_TEXT = (
    "NOSA keeps most of the KV cache in host memory: the eviction score does not move with the query, "
    "so the blocks a request attends change slowly from one decode step to the next. "
)


@dataclass(frozen=True)
class DemoOptions:
    checkpoint: Path = DEFAULT_CHECKPOINT
    prompt_tokens: int = 6000
    steps: int = 64
    report_every: int = 16
    offload: bool = False
    seed: int = 0


def build_prompt(tokenizer, n_tokens: int) -> list[int]:
    ids = tokenizer.encode(PROMPT_SEED_TEXT).ids
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


def ensure_checkpoint(path: Path, seed: int) -> Path:
    if not (path / "config.json").is_file():
        print(f"[demo] writing a tiny NOSA-Llama checkpoint to {path}")
        make_tiny_checkpoint(path, seed=seed)
    return path


def make_backend(opts: DemoOptions, model) -> tuple[AttentionBackend, object | None]:
    """The attention backend, and the offload runtime behind it (None for the reference backend)."""
    if not opts.offload:
        return ReferenceAttentionBackend(model.nosa), None
    from nosa_sglang.reference.offload_backend import OffloadAttentionBackend, runtime_for_model

    runtime = runtime_for_model(model)
    return OffloadAttentionBackend(runtime), runtime


def run_demo(opts: DemoOptions, print_fn=print) -> list[int]:
    torch.manual_seed(opts.seed)
    path = ensure_checkpoint(opts.checkpoint, opts.seed)
    model = load_checkpoint(path)
    tok = load_tokenizer(path)
    cfg = model.nosa
    prompt = build_prompt(tok, opts.prompt_tokens)
    n_blocks = cfg.num_blocks(len(prompt))
    mode = "offload runtime" if opts.offload else "reference"
    print_fn(
        f"[demo] {path}: {model.shape.num_hidden_layers} layers, Hq {model.shape.num_attention_heads}, "
        f"Hkv {model.shape.num_key_value_heads}, d {model.shape.head_dim}; prompt {len(prompt)} tokens = "
        f"{n_blocks} blocks of {cfg.block_size} (topk {cfg.topk_blocks}: "
        f"{'sparse' if n_blocks > cfg.topk_blocks else 'dense'}); attention: {mode}"
    )
    backend, runtime = make_backend(opts, model)
    tracker = LocalityTracker()
    header = f"{'step':>5} {'tok/s':>8} {'sel/head':>9} {'enter/step':>11} {'max enter':>10} {'bound':>6}"
    if runtime is not None:
        header += f" {'hit rate':>9} {'H2D MiB':>9}"
    print_fn(header)
    clock = {"t": time.perf_counter(), "step": 0}  # rate counts decode steps only, not the prefill

    def on_step(step: int, be: AttentionBackend) -> None:
        for layer in range(model.shape.num_hidden_layers):
            sel = be.last_selection(layer)
            if sel is not None:
                tracker.update(layer, sel)
        if step == 1:
            print_fn(f"[demo] prefill + first decode step: {time.perf_counter() - clock['t']:.2f} s")
            clock.update(t=time.perf_counter(), step=1)
            return
        if step % opts.report_every == 0 or step == opts.steps - 1:
            dt = time.perf_counter() - clock["t"]
            n = step - clock["step"]
            row = (
                f"{step:>5} {n / dt:>8.1f} {tracker.mean_selected:>9.1f} {tracker.mean_entering:>11.2f} "
                f"{tracker.max_entering:>10} {cfg.max_entering_blocks:>6}"
            )
            if runtime is not None:
                snap = runtime.snapshot()
                row += f" {snap.totals.hit_rate:>9.3f} {snap.totals.bytes_h2d / 2**20:>9.2f}"
            print_fn(row)
            tracker.reset_interval()
            clock.update(t=time.perf_counter(), step=step)

    gen = model.generate([prompt], opts.steps, backend=backend, on_step=on_step)
    text = tok.decode(gen.tokens[0])
    print_fn(f"[demo] generated {len(gen.tokens[0])} tokens: {text!r}")
    return gen.tokens[0]
