"""Extend groups: a forward's extends of a few tokens over cached prefixes, attended together.

Why: after a radix-cache hit (a repeated prompt, the next turn of a chat) each request extends its last
page or so over a long cached prefix. One request at a time, every layer costs ~35 launches of small
work per request (the prefix read, its compressed keys, the scores, the top-k, the block union, the
attention), which kept the GPU a fifth busy in the 32 x 32K profile. Grouped, their pages are read as one
sequence and each kernel runs once per layer for all of them (`select_blocks_prefill_batched`,
`sparse_prefill_batched`), with the same results as one call per request. Long extends (a prompt's
chunks) stay one request at a time: their work is in the kernels, not in the launches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels.prefill_selection import SCORE_BUDGET_FLOATS, upload_ints

#: extends of at most this many new tokens are grouped
GROUPED_NEW_TOKENS = 64
#: K bytes of one group's sequences (read as one per layer), at most
GROUP_K_BYTES = 256 << 20


@dataclass
class ExtendGroup:
    rows: torch.Tensor  # [E] long: the group's query rows in the forward
    pages: torch.Tensor  # [P] long: its sequences' pages, one sequence after another
    seqs: list[tuple[int, int, int]]  # (new tokens, first token in `pages`, tokens) per sequence
    row_blocks: torch.Tensor  # [E, 1, 1] long: first block of each row's sequence in `pages`

    @property
    def n_tokens(self) -> int:
        return self.seqs[-1][1] + self.seqs[-1][2]


def plan_groups(extends: list[tuple[int, int, int, torch.Tensor]], config: NosaConfig, num_kv_heads: int,
                page_k_bytes: int, device: torch.device) -> list[ExtendGroup]:
    """Groups of `extends` [(first query row, prefix, new tokens, the sequence's pages)], each within the
    K-byte and score budgets (a request alone may exceed them: it still forms a group)."""
    groups, members, blocks, nb_max = [], [], 0, 0
    for e in extends:
        nb = e[3].numel()
        rows = sum(m[2] for m in members) + e[2]
        if members and ((blocks + nb) * page_k_bytes > GROUP_K_BYTES
                        or rows * max(nb_max, nb) * num_kv_heads > SCORE_BUDGET_FLOATS):
            groups.append(_group(members, config, device))
            members, blocks, nb_max = [], 0, 0
        members.append(e)
        blocks, nb_max = blocks + nb, max(nb_max, nb)
    if members:
        groups.append(_group(members, config, device))
    return groups


def _group(members, config: NosaConfig, device: torch.device) -> ExtendGroup:
    rows, seqs, row_blocks, base = [], [], [], 0
    for start, prefix, n, pages in members:
        rows += range(start, start + n)
        seqs.append((n, base, prefix + n))
        row_blocks += [base // config.block_size] * n
        base += pages.numel() * config.block_size
    return ExtendGroup(upload_ints(rows, device), torch.cat([m[3] for m in members]), seqs,
                       upload_ints(row_blocks, device).view(-1, 1, 1))
