"""StepPlan: everything about one decode step that the host already knows, uploaded once.

A decode step appends one token to each request of the batch, in every layer. Which requests open a
new block (their tail slot must be freed), which fill their tail (write-back), which complete a
compressed-key chunk, where each new token goes: all of this depends only on sequence lengths, which
the host tracks. The plan computes it once per step as full-batch tensors (masks, not subsets, so
every layer runs the same fixed-shape ops: capturable in a CUDA graph), packs them into one pinned
tensor of a fixed layout and copies it to the device with a single non-blocking copy (into a static
buffer when graphs are used). Batch tensors are in *row order* (rows ascending), so that a batch of all
running requests is a contiguous row range and per-row state can be read through views.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nosa_sglang.config import NosaConfig
from nosa_sglang.runtime.plan_streams import PlanStreams

#: per-request int64 fields of the packed layout, in order (then token_slots and slot_base, Hkv each)
FIELDS = ("rows", "pos", "seq_lens", "n_chunks", "offsets", "tail_blocks", "opens", "completes", "chunk_ids", "perm",
          "inv", "real")
#: per-(request, KV head) int64 fields after them: the token's slot, local slot 0's global id, and the
#: write-back of a tail that fills (slot, host run; -1 where the tail does not fill)
HEAD_FIELDS = ("token_slots", "slot_base", "wb_src", "wb_dst")


@dataclass
class StepPlan:
    """One decode step of a fixed batch (built by `build_step_plan`). Device tensors unless noted."""

    request_ids: tuple[str, ...]
    rows: torch.Tensor  # [B] long, row order
    pos: torch.Tensor  # [B] long, position of the new token
    seq_lens: torch.Tensor  # [B] long, pos + 1
    n_chunks: torch.Tensor  # [B] long, compressed keys after the token
    offsets: torch.Tensor  # [B] long, pos % block_size
    tail_blocks: torch.Tensor  # [B] long, pos // block_size (the block the token lands in)
    opens: torch.Tensor  # [B] long 0/1, the token opens a new block
    completes: torch.Tensor  # [B] long 0/1, the token completes a compressed-key chunk
    chunk_ids: torch.Tensor  # [B] long, that chunk (a valid index elsewhere, rewritten unchanged)
    perm: torch.Tensor | None  # [B] caller index of each row-order position (None: same order)
    inv: torch.Tensor | None  # caller index -> row-order index
    real: torch.Tensor  # [B] long 1, or 0 for a padding row (PaddedSteps: counted nowhere)
    token_slots: torch.Tensor  # [B, Hkv] long, slot the new token is written to
    slot_base: torch.Tensor  # [B, Hkv, 1] long, global slot of local slot 0 of each (row, head)
    row_range: tuple[int, int] | None  # (lo, hi) when the rows are exactly lo..hi-1
    any_open: bool  # host copies of the masks' any()
    any_complete: bool
    wb_src: torch.Tensor | None  # CPU long [n * Hkv] tail slots that fill with this token
    wb_dst: torch.Tensor | None  # CPU long [n * Hkv] their host runs
    wb_padded: torch.Tensor  # [2, B * Hkv] device long: the same for every (row, head), -1 where none fills
    num_blocks: int  # NB of the selection
    table_update: list[tuple[int, int, int]] = field(default_factory=list)  # (row, block, host block)
    appended: set[int] = field(default_factory=set)
    attended: set[int] = field(default_factory=set)
    streams: PlanStreams | None = None  # CUDA: the streams that ran its layers (ordered by the runtime)


def packed_len(batch: int, num_kv_heads: int) -> int:
    return batch * (len(FIELDS) + len(HEAD_FIELDS) * num_kv_heads)


def build_step_plan(
    request_ids: tuple[str, ...],
    rows: list[int],
    seq_lens: list[int],
    tail_host_blocks: list[int | None],
    token_slot_fn,
    tail_slot_fn,
    slot_base_fn,
    num_kv_heads: int,
    config: NosaConfig,
    device: torch.device,
    num_blocks: int | None = None,
    static: torch.Tensor | None = None,
    real: int | None = None,
    fixed: bool = False,
) -> StepPlan:
    """Plan the step in which request i (row rows[i], seq_lens[i] tokens so far) appends a token.

    tail_host_blocks[i]: host block of the block the new token lands in (offload), else None (no
    write-back). token_slot_fn(row, head, block), tail_slot_fn(row, head), slot_base_fn(row, head):
    global slot ids (host arithmetic). num_blocks: NB of the selection (default: the batch's longest).
    static: a device buffer of packed_len(B, Hkv) int64 to upload into (CUDA graphs need fixed addresses).
    real: the first `real` requests are real, the rest padding (default: all real).
    fixed: for a graph that serves every step of B rows (PaddedSteps): the host-side flags are constants
    (the caller's order kept and the rows always read through `rows`, never as a row range; the chunk
    completion always run under its mask), so one capture fits every step.
    """
    bs, ks, st = config.block_size, config.kernel_size, config.kernel_stride
    B, H = len(rows), num_kv_heads
    order = list(range(B)) if fixed else sorted(range(B), key=lambda i: rows[i])
    r = [rows[i] for i in order]
    pos = [seq_lens[i] for i in order]
    completes = [p + 1 >= ks and (p + 1 - ks) % st == 0 for p in pos]
    n_ch = [config.num_chunks(p + 1) for p in pos]
    inv = [0] * B
    for j, i in enumerate(order):
        inv[i] = j
    cols = {
        "rows": r, "pos": pos, "seq_lens": [p + 1 for p in pos], "n_chunks": n_ch,
        "offsets": [p % bs for p in pos], "tail_blocks": [p // bs for p in pos],
        "opens": [int(p % bs == 0) for p in pos], "completes": [int(c) for c in completes],
        "chunk_ids": [max(n - 1, 0) for n in n_ch], "perm": order, "inv": inv,
        "real": [int(i < (B if real is None else real)) for i in order],
    }
    full = [p % bs == bs - 1 and tail_host_blocks[order[j]] is not None for j, p in enumerate(pos)]
    heads = [(j, h) for j in range(B) for h in range(H)]
    flat = [x for name in FIELDS for x in cols[name]]
    flat += [token_slot_fn(r[j], h, pos[j] // bs) for j, h in heads]
    flat += [slot_base_fn(r[j], h) for j, h in heads]
    flat += [tail_slot_fn(r[j], h) if full[j] else -1 for j, h in heads]
    flat += [tail_host_blocks[order[j]] * H + h if full[j] else -1 for j, h in heads]
    host = torch.tensor(flat, dtype=torch.long)
    if device.type == "cuda":
        host = host.pin_memory()
    if static is not None:
        dev = static[: host.numel()]
        dev.copy_(host, non_blocking=True)
    else:
        dev = host.to(device, non_blocking=True)
    parts = dict(zip(FIELDS, dev[: B * len(FIELDS)].view(len(FIELDS), B)))
    per_head = dev[B * len(FIELDS) :].view(len(HEAD_FIELDS), B * H)
    tok, base = per_head[0].view(B, H), per_head[1].view(B, H, 1)
    identity = order == list(range(B))
    wb_src = wb_dst = None
    if any(full):
        host_wb = host[B * len(FIELDS) + 2 * B * H :].view(2, B * H)
        keep = host_wb[0] >= 0
        wb_src, wb_dst = host_wb[0][keep], host_wb[1][keep]
    return StepPlan(
        request_ids=request_ids, rows=parts["rows"], pos=parts["pos"], seq_lens=parts["seq_lens"],
        n_chunks=parts["n_chunks"], offsets=parts["offsets"], tail_blocks=parts["tail_blocks"],
        opens=parts["opens"], completes=parts["completes"], chunk_ids=parts["chunk_ids"],
        perm=None if identity else parts["perm"], inv=None if identity else parts["inv"], real=parts["real"],
        token_slots=tok, slot_base=base,
        row_range=(r[0], r[0] + B) if r == list(range(r[0], r[0] + B)) and not fixed else None,
        any_open=fixed or any(cols["opens"]), any_complete=fixed or any(completes), wb_src=wb_src, wb_dst=wb_dst,
        wb_padded=per_head[2:],
        num_blocks=num_blocks or max(config.num_blocks(p + 1) for p in pos),
    )
