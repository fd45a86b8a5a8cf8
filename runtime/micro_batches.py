"""MicroBatches: one decode step's batch cut into contiguous parts, each decoded on its own CUDA stream.

Why: within a layer the copies cannot overlap that layer's compute (the misses are known only after the
selection, and the attention needs them at once); across two parts of the batch they can, when each part
runs on its own stream (NosaRuntime.decode, "Micro-batches"). This is the loop the throughput benchmark
times and the equivalence tests check against one batch, so both run the same code.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from nosa_sglang.runtime.nosa_runtime import NosaRuntime


class Part(NamedTuple):
    request_ids: list[str]
    rows: slice  # of the batch tensors
    stream: torch.cuda.Stream | None  # None: the current stream (CPU, or one part)


class MicroBatches:
    """`parts` contiguous parts of `request_ids` (fewer if the batch is smaller), with a stream each on CUDA."""

    def __init__(self, rt: NosaRuntime, request_ids: list[str], parts: int = 1) -> None:
        self.rt = rt
        n = len(request_ids)
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        cuda = rt.device.type == "cuda" and parts > 1
        self.parts = [Part(request_ids[lo:hi], slice(lo, hi), torch.cuda.Stream(rt.device) if cuda else None)
                      for lo, hi in zip(bounds, bounds[1:]) if hi > lo]

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
               split_append: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One layer of every part (`decode`, or `append` then `attend`), inputs for the whole batch made on
        the current stream: [(output, last_selection)] per part, each ready on its part's stream."""
        main = torch.cuda.current_stream() if self.parts[0].stream is not None else None
        out = []
        for part in self.parts:
            with torch.cuda.stream(part.stream) if part.stream is not None else contextlib.nullcontext():
                if part.stream is not None:
                    part.stream.wait_stream(main)  # NOTE: the layer's inputs are made on the main stream
                    for t in (q, k, v, c):
                        t.record_stream(part.stream)  # NOTE: and read on this one
                ids, sl = part.request_ids, part.rows
                if split_append:
                    self.rt.append(layer, ids, k[sl], v[sl], c[sl])
                    o = self.rt.attend(layer, ids, q[sl])
                else:
                    o = self.rt.decode(layer, ids, q[sl], k[sl], v[sl], c[sl])
                out.append((o, self.rt.last_selection(layer)))
        return out
