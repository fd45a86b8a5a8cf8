"""`--nosa-model-graphs`: SGLang's decode CUDA graphs with NOSA, full (default without offloading) or breakable.

Full (`runtime.PaddedSteps`): SGLang captures the whole decode forward once per padded batch size, NOSA's
layers included, and replays it as one graph. Decoding from the pool's pages in place needs no copy or
host decision inside a step: the backend uploads the step's plan before the replay
(`init_forward_metadata_out_graph`) and `end_full_graph_step` (an AFTER hook on the runner's `execute`)
closes the step after it. Offloaded, a layer's misses are copied between its selection and its attention
under the host's control, which a single graph cannot hold; there the graphs are breakable.

Breakable: without SGLang's decode graphs every decode step runs the model's norms, projections and MLP
eagerly (the dense server replays them as one graph). SGLang 0.5.17's *breakable* graphs capture the
model as segments that break at
functions marked `eager_on_graph`, which run eagerly at replay with the captured tensors (their result
copied into the captured output). The backend marks its decode attention that way
(`NosaAttnBackend.decode_break`), so the runtime keeps planning each step and replaying its own
per-layer segments while the rest of the model replays as SGLang's graphs.

What a replay (either kind) needs and SGLang does not hand to attention backends: the batch's request ids (the
replay metadata view has the padded `req_pool_indices` and `seq_lens` but no rids, and req_pool_indices
are reused by later requests). `stash_decode_rids` (an AROUND hook on the runner's `load_batch`, which
sees the real batch first) gives them to the backend.

What SGLang 0.5.17's breakable backend cannot hold: a causal LM's decode output. It keeps a captured
output in a shared buffer of tensors, tuples or PP proxies, and raises on the `LogitsProcessorOutput`
every causal LM returns (the first GPU run stopped there). `capture_logits_as_tuple` hands it the
output's tensors as a tuple; `replay_logits_output` builds the `LogitsProcessorOutput` back.
"""

from __future__ import annotations

_RUNNER = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"
#: the SGLang method that loads a decode batch into the graph runner's buffers before a replay
LOAD_BATCH = f"{_RUNNER}.load_batch"
#: the runner's decode step through its graphs (load_batch, then the replay)
EXECUTE = f"{_RUNNER}.execute"
_BCG = "sglang.srt.model_executor.runner_backend.breakable_cuda_graph_backend.BreakableCudaGraphBackend"
#: the breakable backend's capture of one batch size, and its replay
CAPTURE_ONE, REPLAY = f"{_BCG}.capture_one", f"{_BCG}.replay"
#: the LogitsProcessorOutput fields a decode replay hands on (DecodeCudaGraphRunner.execute slices these)
_TENSOR_FIELDS = ("next_token_logits", "hidden_states", "full_logits")


def stash_decode_rids(original, runner, forward_batch, *args, **kwargs):
    """AROUND hook of DecodeCudaGraphRunner.load_batch: the NOSA backend learns the real batch's rids."""
    from nosa_sglang.backend import NosaAttnBackend

    backend = getattr(runner, "attn_backend", None)
    if isinstance(backend, NosaAttnBackend):
        backend.pending_rids = list(forward_batch.rids)
    return original(runner, forward_batch, *args, **kwargs)


def end_full_graph_step(result, runner, *args, **kwargs):
    """AFTER hook of DecodeCudaGraphRunner.execute: a full graph's replay ran the step's layers; the NOSA
    backend closes the step (its sequence lengths, counters and knobs)."""
    from nosa_sglang.backend import NosaAttnBackend

    backend = getattr(runner, "attn_backend", None)
    if isinstance(backend, NosaAttnBackend):
        backend.end_graph_step()
    return result


def capture_logits_as_tuple(original, backend, shape_key, forward_fn, *args, **kwargs):
    """AROUND hook of BreakableCudaGraphBackend.capture_one: the captured forward answers the tensors of
    its LogitsProcessorOutput as a tuple (None where unset), which the backend's output buffer holds."""
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    def forward_tensors():
        out = forward_fn()
        if not isinstance(out, LogitsProcessorOutput):
            return out
        if out.customized_info is not None:
            raise RuntimeError("--nosa-model-graphs: a decode output with customized_info cannot be captured")
        tuple_keys.add(shape_key)
        return tuple(getattr(out, f) for f in _TENSOR_FIELDS)

    tuple_keys = backend.__dict__.setdefault("nosa_tuple_keys", set())
    return original(backend, shape_key, forward_tensors, *args, **kwargs)


def replay_logits_output(original, backend, shape_key, *args, **kwargs):
    """AROUND hook of BreakableCudaGraphBackend.replay: a graph captured by `capture_logits_as_tuple`
    answers a LogitsProcessorOutput again."""
    out = original(backend, shape_key, *args, **kwargs)
    if shape_key not in backend.__dict__.get("nosa_tuple_keys", ()):
        return out
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    return LogitsProcessorOutput(**dict(zip(_TENSOR_FIELDS, out)))
