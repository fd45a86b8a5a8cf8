"""LayerDecoder: the per-layer tensor work of a decode step, cut into capturable segments.

append:  [host: wait for H2D / write-back] -> segment "append" (open blocks, write the token, ring,
         biases, completed chunks) -> [host: write-back of tails that filled]
attend:  segment "select" (selection kernels, residency diff, bias gather, counters, packed miss
         list) -> [host: fetch, compute waits for the copies] -> segment "attend" (sparse attention,
         prefetch plan) -> [host: queue the prefetch]
decode:  append + attend with "append" and "select" captured as one segment ("decode").
Segments are fixed-shape tensor code that reads the step plan, the inputs and the persistent state at
fixed addresses; with `cuda_graphs=True` they are captured and replayed (SegmentGraphs), otherwise run
eagerly. The eager path is the same code, so the CPU tests check what the graphs replay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nosa_sglang.kernels.selection import decode_block_scores, eviction_block_scores, select_topk
from nosa_sglang.kernels.sparse_decode import sparse_decode_attention
from nosa_sglang.kernels.table_runs import table_run_ids
from nosa_sglang.kernels.token_write import TokenBuffers, write_token
from nosa_sglang.kernels.topk import forced_and_existing
from nosa_sglang.runtime.graph_cache import SegmentGraphs
from nosa_sglang.runtime.slot_cache import fetch_list
from nosa_sglang.runtime.step_plan import StepPlan, packed_len

if TYPE_CHECKING:
    from nosa_sglang.runtime.nosa_runtime import NosaRuntime


#: static buffer sets kept (graph mode); each belongs to one (batch size, first row)
MAX_STATIC = 8


class _Static:
    """Fixed-address inputs of one batch shape (graph mode)."""

    def __init__(self, rt: "NosaRuntime", B: int) -> None:
        s, dev = rt.shape, rt.device
        self.plan = torch.zeros(packed_len(B, s.num_kv_heads), dtype=torch.long, device=dev)
        self.q = torch.zeros((B, s.num_q_heads, s.head_dim), dtype=s.dtype, device=dev)
        self.k = torch.zeros((B, s.num_kv_heads, s.head_dim), dtype=s.dtype, device=dev)
        self.v = torch.zeros_like(self.k)
        self.c = torch.zeros((B, s.num_kv_heads), dtype=torch.float32, device=dev)
        self.last_step = rt._step  # the last step that used the set (eviction order)


class LayerDecoder:
    """append / attend of one layer for a NosaRuntime."""

    def __init__(self, rt: "NosaRuntime", cuda_graphs: bool) -> None:
        self.rt = rt
        self.graphs = SegmentGraphs() if cuda_graphs else None
        self._static: dict[tuple[int, int], _Static] = {}  # by (batch, first row): one per micro-batch

    def static_plan_buffer(self, rows: list[int]) -> torch.Tensor | None:
        """Where the step plan of the batch on `rows` is uploaded (graph mode), else None. Two
        micro-batches of one size get separate buffers: both are in flight at once."""
        if self.graphs is None:
            return None
        key = (len(rows), min(rows))
        if key not in self._static:
            self._evict_static()
            self._static[key] = _Static(self.rt, len(rows))
        static = self._static[key]
        static.last_step = self.rt._step
        return static.plan

    def _evict_static(self) -> None:
        """Keep at most MAX_STATIC buffer sets: a server whose batches keep changing would otherwise
        hold one per (size, first row) ever seen. A set goes with the graphs captured against it
        (they would read freed memory), and never while this step uses it."""
        old = sorted((k for k, st in self._static.items() if st.last_step < self.rt._step),
                     key=lambda k: self._static[k].last_step)
        for key in old[: max(0, len(self._static) + 1 - MAX_STATIC)]:
            B, lo = key
            self.graphs.drop_shape((B, (lo, lo + B)))
            del self._static[key]
            self.rt.graph_generation += 1  # NOTE: step graphs captured against the set go too

    def _segment_graphs(self, p: StepPlan) -> bool:
        """Whether this batch's segments are captured on their own: graph mode, contiguous rows, and not
        inside a step graph (there the segments are part of the caller's capture)."""
        return self.graphs is not None and p.row_range is not None and not self.rt.in_step_graph

    def _run(self, p: StepPlan, key: tuple, fn):
        if not self._segment_graphs(p):
            return fn()
        return self.graphs.run((len(p.rows), p.row_range), key, fn)

    def _inputs(self, p: StepPlan, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Row-order inputs; in graph mode copied into the static buffers the segments read (not in a
        step graph: the caller's inputs are at fixed addresses already)."""
        out = {}
        for name, t in tensors.items():
            if p.perm is not None:
                t = t[p.perm]
            if self._segment_graphs(p):
                buf = getattr(self._static[(len(p.rows), p.row_range[0])], name)
                buf.copy_(t)
                t = buf
            out[name] = t
        return out

    # -- append ---------------------------------------------------------------------------------------
    def append(self, layer: int, p: StepPlan, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> None:
        x = self._inputs(p, k=k, v=v, c=c)
        self._wait_before_opening(layer, p)
        self._run(p, ("append", layer, p.any_open, p.any_complete, self.rt._victims.name),
                  lambda: self._append_segment(layer, p, x))
        self._write_back(layer, p)

    def _wait_before_opening(self, layer: int, p: StepPlan) -> None:
        if p.any_open and not self.rt.gpu_only:
            self.rt.transfer.wait_h2d(layer)  # NOTE: the victim slot may be a prefetch target in flight
            self.rt.transfer.wait_writeback(layer)  # NOTE: wait before the tail slot is reused

    def _append_segment(self, layer: int, p: StepPlan, x: dict[str, torch.Tensor]) -> None:
        rt = self.rt
        if p.any_open and not rt.gpu_only:
            view = rt.slots.rows_view(layer, p.rows, p.row_range)
            rt.slots.start_tail_block(layer, view, p.tail_blocks, p.opens, rt._victims, rt._step_t, p.slot_base)
            rt.slots.commit(layer, view)
        write_token(TokenBuffers(*rt.slots.token_views(layer), *rt.selection.token_views(layer)), p.token_slots,
                    p.offsets, p.rows, p.pos, x["k"], x["v"], x["c"], impl=rt.impl)
        if p.any_complete:
            rt.selection.complete_chunks(layer, p.rows, p.pos, p.completes, p.chunk_ids, impl=rt.impl)

    def _write_back(self, layer: int, p: StepPlan) -> None:
        if p.wb_src is None:
            return
        transfer = self.rt.transfer
        # NOTE: a captured step reads the device lists at fixed addresses, padded with -1 (the graph
        # ends after its write-backs). An eager step on CUDA must not: its write-back stream may run
        # after the next step's plan upload overwrote them (StepGraphs runs each new kind of step
        # eagerly once), and the block never reaches the host. CPU copies are synchronous.
        if self.rt.in_step_graph and (transfer.capturing() or not transfer.cuda):
            transfer.write_back(layer, p.wb_padded[0], p.wb_padded[1], runs=p.wb_src.numel())
        else:
            transfer.write_back(layer, p.wb_src, p.wb_dst)

    # -- attend ---------------------------------------------------------------------------------------
    def attend(self, layer: int, p: StepPlan, q: torch.Tensor) -> torch.Tensor:
        x = self._inputs(p, q=q)
        nosa, state = self.rt.selection_policy == "nosa", {}
        key = ("select", layer, p.num_blocks, self.rt._victims.name)
        selected = self._run(p, key, lambda: self._select(layer, p, x["q"], nosa, state))
        return self._fetch_and_attend(layer, p, x, key, selected, nosa, state)

    # -- append + attend --------------------------------------------------------------------------------
    def decode(self, layer: int, p: StepPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               c: torch.Tensor) -> torch.Tensor:
        """append then attend with the append and select segments as one: a graph launch and a host
        point fewer per layer. The write-back of a tail that filled moves after the select segment:
        selection reads no slot data, and the write-back stream still waits for the token's write."""
        x = self._inputs(p, q=q, k=k, v=v, c=c)
        self._wait_before_opening(layer, p)
        nosa, state = self.rt.selection_policy == "nosa", {}
        if self._inline(nosa):
            return self._decode_inline(layer, p, x, nosa, state)

        def segment():
            self._append_segment(layer, p, x)
            return self._select(layer, p, x["q"], nosa, state)

        key = ("decode", layer, p.any_open, p.any_complete, p.num_blocks, self.rt._victims.name)
        selected = self._run(p, key, segment)
        self._write_back(layer, p)
        return self._fetch_and_attend(layer, p, x, key, selected, nosa, state)

    def _inline(self, nosa: bool) -> bool:
        """Whether decode() gathers inside its segment: asked for, offloading in zero-copy (or CPU) mode,
        and no prefetch to overlap (it needs the copy stream)."""
        rt = self.rt
        return (rt.inline_gather and not rt.gpu_only and rt.transfer.mode in ("zero_copy", "cpu")
                and not self._prefetching(nosa))

    def _prefetching(self, nosa: bool) -> bool:
        rt = self.rt
        return (not rt.gpu_only and nosa and rt._knobs.prefetch and rt._victims.uses_scores
                and rt.slots.active > rt.config.topk_blocks
                and (not rt.transfer.cuda or rt.transfer.mode == "zero_copy"))  # see transfer.py

    def _decode_inline(self, layer: int, p: StepPlan, x: dict[str, torch.Tensor], nosa: bool,
                       state: dict) -> torch.Tensor:
        """The whole layer as one segment: append, select, the gather on this stream, attention."""
        rt = self.rt
        rt.transfer.wait_writeback(layer)  # NOTE: a miss may re-fetch a block whose write-back is in flight
        rt.transfer.wait_for_layer(layer)  # NOTE: a prefetch from before a knob change turned it off may be in flight

        def segment():
            self._append_segment(layer, p, x)
            sel, slot_ids, packed, _ = self._select(layer, p, x["q"], nosa, state)
            rt.transfer.gather_inline(layer, packed)
            o = self._attention(layer, p, x, sel, slot_ids)
            rt.slots.commit(layer, state.get("view") or rt.slots.rows_view(layer, p.rows, p.row_range))
            return sel, o

        sel, o = self._run(p, ("decode-inline", layer, p.any_open, p.any_complete, p.num_blocks,
                               rt._victims.name), segment)
        self._write_back(layer, p)
        return self._in_caller_order(layer, p, sel, o)

    def _fetch_and_attend(self, layer: int, p: StepPlan, x: dict[str, torch.Tensor], select_key: tuple,
                          selected: tuple, nosa: bool, state: dict) -> torch.Tensor:
        """Fetch the misses, then the "attend" segment. Its key contains the key of the segment that
        produced `selected`: a captured attend reads that segment's output buffers, so each select
        variant needs its own attend graph (a decode segment keyed by any_open would otherwise feed
        an attend captured against another variant's buffers)."""
        rt = self.rt
        sel, slot_ids, packed, E = selected
        prefetch = self._prefetching(nosa)
        # NOTE: under LRU a prefetch may only fill empty slots, which the warm start leaves none of, so
        # it is skipped (docs/runtime.md, "Victim policy")
        if not rt.gpu_only:
            rt.transfer.fetch(layer, packed)
            rt.transfer.wait_for_layer(layer)

        def attend():
            o = self._attention(layer, p, x, sel, slot_ids)
            pf = None
            if not rt.gpu_only:
                view = state.get("view") or rt.slots.rows_view(layer, p.rows, p.row_range)
                if prefetch:
                    pf = self._prefetch(layer, p, E, view)
                rt.slots.commit(layer, view)
            return o, pf

        o, pf = self._run(p, ("attend", select_key, prefetch), attend)
        if pf is not None:
            rt.transfer.fetch(layer, pf, prefetch=True)
        return self._in_caller_order(layer, p, sel, o)

    def _attention(self, layer: int, p: StepPlan, x: dict[str, torch.Tensor], sel: torch.Tensor,
                   slot_ids: torch.Tensor) -> torch.Tensor:
        rt = self.rt
        return sparse_decode_attention(x["q"], rt.slots.k_slots(layer), rt.slots.v_slots(layer),
                                       rt.slots.c_slots(layer), slot_ids, sel, p.seq_lens, impl=rt.impl)

    def _in_caller_order(self, layer: int, p: StepPlan, sel: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Record the layer's selection and return the output, both in the caller's batch order."""
        self.rt._last_selection[layer] = sel if p.inv is None else sel[p.inv]
        return o if p.inv is None else o[p.inv]

    def _select(self, layer: int, p: StepPlan, q: torch.Tensor, nosa: bool, state: dict):
        rt = self.rt
        cfg = rt.config
        ck, ce, rows = rt.selection.batch(layer, p.rows, p.row_range)
        E = eviction_block_scores(ce, p.n_chunks, p.seq_lens, cfg, impl=rt.impl, num_blocks=p.num_blocks, rows=rows)
        S = decode_block_scores(q, ck, p.n_chunks, p.seq_lens, cfg, impl=rt.impl, num_blocks=p.num_blocks, rows=rows)
        sel = select_topk(S, E if nosa else None, p.seq_lens, cfg, rt.selection_policy, impl=rt.impl)
        if rt.gpu_only:
            # NOTE: the attention masks the slots of unselected entries (sel -1), so none are masked here
            if rt.pool_backed:  # the slot list and the selected-block counts in one launch
                slots = table_run_ids(rt.host_table, p.rows, sel, impl=rt.impl, counts=rt.counters.selected(layer))
            else:
                slots = p.slot_base + sel
                rt.counters.note_selected(layer, p.rows, p.row_range, sel)
            if layer == rt.shape.num_layers - 1:
                rt.counters.add_selected(p.rows, p.row_range, p.real)
            return sel, slots, None, E
        view = rt.slots.rows_view(layer, p.rows, p.row_range)
        if view.rows is not None:
            state["view"] = view  # gathered copies (eager only): committed after attention
        diff = rt.slots.resolve(layer, view, sel, E, rt._victims, rt._step_t, p.slot_base,
                                bias=(rt.selection.c_layer(layer), p.rows), host=(rt.host_table, p.rows),
                                tally=rt.counters.diff_tally(layer, p.rows))
        return sel, diff.slot_ids, diff.fetch, E

    def _prefetch(self, layer: int, p: StepPlan, E: torch.Tensor, view) -> torch.Tensor:
        """Plan, one step ahead, the best eviction-score blocks the next step may select (its
        query-agnostic part) into slots this step did not select; returns the packed copy list."""
        rt = self.rt
        cfg = rt.config
        exists, forced = forced_and_existing(p.seq_lens + 1, E.shape[-1], cfg)
        tail = torch.div(p.seq_lens - 1, cfg.block_size, rounding_mode="floor").view(-1, 1, 1)
        b = torch.arange(E.shape[-1], device=E.device)
        cand = E.masked_fill(forced | ~exists | (b >= tail), float("-inf"))
        n_cand = cfg.eviction_blocks + cfg.free_query_blocks
        plan = rt.slots.plan_prefetch(layer, view, cand, n_cand, E, rt._victims, rt._step_t, p.slot_base)
        rt.slots.copy_block_biases(layer, rt.selection.c_layer(layer), p.rows, plan.blocks, plan.dst_slots)
        rt.counters.add_prefetch(layer, plan.ok)
        return fetch_list(rt.host_runs(p, plan.blocks), plan.ok, plan.dst_slots)
