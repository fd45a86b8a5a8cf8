"""PaddedSteps: decode steps inside a caller's CUDA graph of a fixed, padded batch size.

Why: SGLang's *full* decode graph captures the whole model forward, NOSA's attention included, once
per padded batch size, and replays it for every step of any batch that pads to that size. Decoding
from the pool's pages in place (`pool_backed`), no copy or read-back happens inside a step, so the
runtime's layers can be part of that graph: the host work between layers (segment-graph launches,
input copies, the plan lookups: ~0.2-0.5 ms a layer) goes, and a step costs one graph launch.

What makes one capture fit every step of `batch` rows (`build_step_plan(fixed=True)`):
- the plan is uploaded before each replay into one static buffer per batch size (never evicted: the
  caller's graphs hold its address), and the layers read only it and persistent state;
- the running requests are exactly the real rows 0..n-1 (the runtime keeps rows compact); rows n..batch-1
  are padding: they decode position 0 of an unused row, write their token to pool page 0 (never
  allocated: SGLang's padding page) and are counted nowhere (`StepPlan.real`);
- the batch stays in the caller's order and every kernel finds a request's state through the plan's
  rows (no permutation of the inputs and the output, no row-range views), and the chunk completion
  always runs under its mask, so no host flag picks a code path.
The capture itself runs on a plan with no real rows (`begin((), batch, ...)`), which touches only unused
rows and page 0. After a replay, `end()` does the host bookkeeping the layers would have done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nosa_sglang.runtime.step_plan import StepPlan, packed_len
from nosa_sglang.runtime.types import RuntimeUsageError

if TYPE_CHECKING:
    from nosa_sglang.runtime.nosa_runtime import NosaRuntime


class PaddedSteps:
    """begin (host, before a capture or replay) -> decode per layer (captured) -> end (host, after)."""

    def __init__(self, rt: "NosaRuntime") -> None:
        if not rt.pool_backed:
            raise ValueError("PaddedSteps: only a runtime decoding from a page pool in place (gpu_only with "
                             "page_pool): offloading copies blocks between layers")
        self.rt = rt
        self._buffers: dict[int, torch.Tensor] = {}  # batch size -> static plan buffer
        self.plan: StepPlan | None = None

    def begin(self, request_ids, batch: int, token_locs: torch.Tensor) -> StepPlan:
        """Plan a step of `request_ids` (every running request; none for a capture) padded to `batch`
        rows. token_locs [n]: the pool location of each request's new token (caller order)."""
        rt = self.rt
        ids = tuple(request_ids)
        rt._require_no_open_step("PaddedSteps.begin")
        if set(ids) != set(rt.running_requests) or len(set(ids)) != len(ids):
            raise RuntimeUsageError(f"PaddedSteps.begin: request_ids={ids} must be the running requests "
                                    f"{rt.running_requests}, each once (padding rows take the unused rows)")
        n = len(ids)
        if not max(n, 1) <= batch <= rt.max_requests:
            raise ValueError(f"batch={batch}: allowed range is [{max(n, 1)}, {rt.max_requests}] (the requests, "
                             "at most max_requests rows)")
        if tuple(token_locs.shape) != (n,):
            raise ValueError(f"token_locs: expected [{n}] pool locations, got {list(token_locs.shape)}")
        if batch not in self._buffers:
            self._buffers[batch] = torch.zeros(packed_len(batch, rt.shape.num_kv_heads), dtype=torch.long,
                                               device=rt.device)
        p = rt._build_plan(ids, [rt._req(r) for r in ids], token_locs, pad_to=batch, static=self._buffers[batch])
        if n:
            rt._plans[ids] = p
        self.plan = p
        return p

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """One layer of the begun step, all `batch` rows in the caller's order ([batch, Hq, d] out):
        device work only, reading the plan's static buffer (what a capture records)."""
        rt, p = self.rt, self.plan
        if p is None:
            raise RuntimeUsageError(f"PaddedSteps.decode(layer={layer}): no step begun")
        rt.in_step_graph = True
        try:
            o = rt._decoder.decode(layer, p, q, k, v, c)
        finally:
            rt.in_step_graph = False
        p.appended.add(layer)
        p.attended.add(layer)
        return o

    def end(self) -> None:
        """After the step ran (eagerly or as a replay): close it. A capture's plan ends as nothing ran."""
        p, self.plan = self.plan, None
        if p is None or not p.request_ids:
            return
        L = range(self.rt.shape.num_layers)
        p.appended.update(L)
        p.attended.update(L)
        self.rt.step_boundary()
