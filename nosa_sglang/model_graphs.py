"""`--nosa-model-graphs on` (experimental, not yet run on a GPU): SGLang's breakable decode graphs with NOSA.

Why: without SGLang's decode graphs every decode step runs the model's norms, projections and MLP eagerly
(the dense server replays them as one graph). A whole-step graph cannot hold the NOSA runtime's
host-side plan, but SGLang 0.5.17's *breakable* graphs capture the model as segments that break at
functions marked `eager_on_graph`, which run eagerly at replay with the captured tensors (their result
copied into the captured output). The backend marks its decode attention that way
(`NosaAttnBackend.decode_break`), so the runtime keeps planning each step and replaying its own
per-layer segments while the rest of the model replays as SGLang's graphs.

What the replay needs and SGLang does not hand to attention backends: the batch's request ids (the
replay metadata view has the padded `req_pool_indices` and `seq_lens` but no rids, and req_pool_indices
are reused by later requests). `stash_decode_rids` (an AROUND hook on the runner's `load_batch`, which
sees the real batch first) gives them to the backend.
"""

from __future__ import annotations

#: the SGLang method that loads a decode batch into the graph runner's buffers before a replay
LOAD_BATCH = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.load_batch"


def stash_decode_rids(original, runner, forward_batch, *args, **kwargs):
    """AROUND hook of DecodeCudaGraphRunner.load_batch: the NOSA backend learns the real batch's rids."""
    from nosa_sglang.backend import NosaAttnBackend

    backend = getattr(runner, "attn_backend", None)
    if isinstance(backend, NosaAttnBackend):
        backend.pending_rids = list(forward_batch.rids)
    return original(runner, forward_batch, *args, **kwargs)
