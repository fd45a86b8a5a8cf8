"""The NOSA reference: pure-torch math of NOSA_SPEC.md (the contract) and a small NOSA-Llama model.

Kernels and the offload runtime are tested against these functions, never against each other.
"""

from nosa_sglang.reference.attention import (
    nosa_decode_attention,
    nosa_prefill_attention,
    select_blocks_decode,
    select_blocks_prefill,
    token_mask,
)
from nosa_sglang.reference.eviction import eviction_bias
from nosa_sglang.reference.selection import (
    block_max_pool,
    chunk_query_scores,
    compress_eviction,
    compress_keys,
    select_blocks_for_positions,
    select_from_block_scores,
)

__all__ = [
    "block_max_pool",
    "chunk_query_scores",
    "compress_eviction",
    "compress_keys",
    "eviction_bias",
    "nosa_decode_attention",
    "nosa_prefill_attention",
    "select_blocks_decode",
    "select_blocks_for_positions",
    "select_blocks_prefill",
    "select_from_block_scores",
    "token_mask",
]
