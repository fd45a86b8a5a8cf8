"""`nosa-sglang demo`: greedy decoding of a tiny generated NOSA model on a prompt long enough that
selection is really sparse, with a table of throughput and selection locality every N steps.

The front door of the project: later layers (kernels, offload runtime, gRPC) are routed through it.
With `grpc_port` set it also serves the control API over the offload runtime and decodes round after
round (a fresh request each time, so the runtime never runs past its max_seq_len) until stopped.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from nosa_sglang.control.runtime_provider import RuntimeProvider
from nosa_sglang.control.server import DEFAULT_HOST as DEFAULT_GRPC_HOST
from nosa_sglang.control.process_server import start_control_process
from nosa_sglang.control.server import start_control_server
from nosa_sglang.locality import LocalityTracker
from nosa_sglang.reference.backend import AttentionBackend, ReferenceAttentionBackend
from nosa_sglang.reference.checkpoint import load_checkpoint, make_tiny_checkpoint
from nosa_sglang.reference.tokenizer import load_tokenizer
from nosa_sglang.runtime.knobs import MAX_GPU_SLOTS

DEFAULT_CHECKPOINT = Path(".nosa") / "tiny-nosa-llama"
PROMPT_SEED_TEXT = (
    "NOSA keeps most of the KV cache in host memory: the eviction score does not move with the query, "
    "so the blocks a request attends change slowly from one decode step to the next. "
)
#: gpu_slots may be raised over gRPC up to this many times topk_blocks (256 slots with the default
#: constants): room for the tuning example to turn every miss of the demo's prompt into a hit
MAX_GPU_SLOTS_PER_TOPK = 4
#: tokens per round while serving: long enough that the next round's prefill (seconds on a CPU)
#: is a small share of the time, so the served numbers keep moving
SERVE_ROUND_STEPS = 4096
#: the generated text is shown up to this many characters (a serving round makes thousands)
MAX_SHOWN_CHARS = 200


class _Stopped(Exception):
    """Raised from the step callback to end a round early when the stop event is set."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs.

    Attributes:
        steps: tokens generated (per round while serving).
        offload: decode through the offload runtime (host store + GPU slot cache).
        grpc_port: serve the control API on this port (0: a free one) and decode rounds until
            stopped; needs `offload`.
        grpc_host, grpc_token: address to bind and the bearer token of the control API.
        grpc_in_process: serve from threads of this process (default: a child process,
            `start_control_process`, so that handlers never hold the decode loop's GIL).
    """

    checkpoint: Path = DEFAULT_CHECKPOINT
    prompt_tokens: int = 6000
    steps: int = 64
    report_every: int = 16
    offload: bool = False
    seed: int = 0
    grpc_port: int | None = None
    grpc_host: str = DEFAULT_GRPC_HOST
    grpc_token: str | None = None
    grpc_in_process: bool = False

    def __post_init__(self) -> None:
        if self.grpc_port is None:
            return
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port={self.grpc_port}: allowed range is [0, 65535] (0 picks a free port)")
        if not self.offload:
            raise ValueError("grpc_port: the control API serves the offload runtime; needs offload=True")


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

    # NOTE: one request at a time; the slots allocated beyond the gpu_slots in force are what the
    # control API's UpdateConfig may grow into.
    max_gpu_slots = min(MAX_GPU_SLOTS, MAX_GPU_SLOTS_PER_TOPK * model.nosa.topk_blocks)
    runtime = runtime_for_model(model, max_requests=1, max_gpu_slots=max_gpu_slots)
    return OffloadAttentionBackend(runtime), runtime


class _Session(NamedTuple):
    """What every round decodes with."""

    model: object  # NosaLlamaForCausalLM
    tokenizer: object
    prompt: list[int]
    backend: AttentionBackend
    runtime: object | None  # NosaRuntime when offloading


def run_demo(opts: DemoOptions, print_fn=print, stop: threading.Event | None = None) -> list[int]:
    """Run the demo; returns the tokens generated (of the last whole round while serving).

    While serving (`opts.grpc_port`), rounds repeat until `stop` is set or KeyboardInterrupt; the
    control server has stopped when this returns.
    """
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
    if runtime is not None and len(prompt) + opts.steps - 1 > runtime.max_seq_len:
        raise ValueError(f"prompt_tokens + steps - 1 = {len(prompt) + opts.steps - 1}: allowed range is "
                         f"<= {runtime.max_seq_len} (the runtime's max_seq_len)")
    session = _Session(model, tok, prompt, backend, runtime)
    if opts.grpc_port is None:
        return _generate_with_table(opts, session, print_fn, stop=None)
    return _serve(opts, session, print_fn, stop or threading.Event())


def _serve(opts: DemoOptions, session: _Session, print_fn, stop: threading.Event) -> list[int]:
    """Serve the control API (from a child process, or this process's threads) while this thread
    decodes rounds."""
    provider = RuntimeProvider(session.runtime)
    start = start_control_server if opts.grpc_in_process else start_control_process
    server = start(provider, opts.grpc_host, opts.grpc_port, token=opts.grpc_token)
    print_fn(f"[demo] control API on {server.address}{' with a token' if opts.grpc_token else ''} "
             f"(try: nosa-ctl --target {server.address} stats); decoding rounds of {opts.steps} tokens "
             "until interrupted (Ctrl-C)")
    tokens: list[int] = []
    try:
        while not stop.is_set():
            tokens = _generate_with_table(opts, session, print_fn, stop)
    except (_Stopped, KeyboardInterrupt):
        pass  # the normal end of serving: generate() already aborted the round's request
    finally:
        server.stop(grace_s=1.0)
        print_fn("[demo] control API stopped")
    return tokens


def _generate_with_table(opts: DemoOptions, session: _Session, print_fn,
                         stop: threading.Event | None) -> list[int]:
    """One generate() of opts.steps tokens with the locality (and offload) table; raises _Stopped
    after a step once `stop` is set."""
    model, runtime = session.model, session.runtime
    cfg = model.nosa
    tracker = LocalityTracker()
    header = f"{'step':>5} {'tok/s':>8} {'sel/head':>9} {'enter/step':>11} {'max enter':>10} {'bound':>6}"
    if runtime is not None:
        header += f" {'hit rate':>9} {'H2D MiB':>9}"
    print_fn(header)
    clock = {"t": time.perf_counter(), "step": 0}  # rate counts decode steps only, not the prefill

    def on_step(step: int, be: AttentionBackend) -> None:
        if stop is not None and stop.is_set():
            raise _Stopped
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

    gen = model.generate([session.prompt], opts.steps, backend=session.backend, on_step=on_step)
    text = session.tokenizer.decode(gen.tokens[0])
    shown = text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "..."
    print_fn(f"[demo] generated {len(gen.tokens[0])} tokens: {shown!r}")
    return gen.tokens[0]
