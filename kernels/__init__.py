"""NOSA Triton kernels (imported as nosa_sglang.kernels), one concern per module.

Attention: sparse_decode (slot-cache decode with the ED-DMA bias, split-K), sparse_prefill.
Selection: selection (stage-1 scores + block max-pool), prefill_selection, topk, compress (incremental K̃).
Eviction head: eviction_head (c = A·softplus(Δ·v), one read of v).
Movement: block_copy (zero-copy / copy-engine gather and scatter of (block, KV head) runs), copy_engine,
pinned (device-accessible host memory).

Exports resolve lazily (PEP 562) so importing one kernel does not compile or import the others.
"""

from __future__ import annotations

from nosa_sglang._lazy import lazy_exports

_EXPORTS = {
    "KernelArgumentError": "_checks",
    "TransferMode": "block_copy",
    "TransferResult": "block_copy",
    "gather_runs": "block_copy",
    "scatter_runs": "block_copy",
    "NewChunk": "compress",
    "append_new_chunks": "compress",
    "chunk_completes": "compress",
    "compress_new_chunks": "compress",
    "eviction_bias": "eviction_head",
    "alloc_pinned": "pinned",
    "pinned_mode": "pinned",
    "register_host_tensor": "pinned",
    "select_blocks_prefill": "prefill_selection",
    "decode_block_scores": "selection",
    "eviction_block_scores": "selection",
    "max_blocks_for_chunks": "selection",
    "DecodeAttention": "sparse_decode",
    "sparse_decode_attention": "sparse_decode",
    "sparse_prefill_attention": "sparse_prefill",
    "select_topk": "topk",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
