"""The decode benchmarks' inputs and step timing: the query stream (`Workload`, under the query models
decode_throughput.py names) and how a configuration's steps are warmed up and timed. Shared by
decode_throughput.py, grpc_load.py and scripts/profile_runtime.py."""

from __future__ import annotations

import math
import time

import torch

from nosa_sglang.runtime import ModelShape

BANK = 8  # distinct random k/v/c tensors cycled through (q draws fresh noise every call)


class Workload:
    """Random decode inputs for B requests: k/v/c from a small bank, q from the query model.

    `steps` given: every query of that many steps is drawn up front (q [steps, L, B, Hq, d]), so that a
    step enqueues nothing but the runtime's own work. Drawing them per call cost four launches per layer
    (~0.1 ms of host time a layer, 3-4 ms a step at 28 layers, in every configuration alike), which a
    real model's projections, captured in its CUDA graph, do not; it shrank every ratio. Past `steps`
    the stream starts over (for drift, one iid-like jump). Without `steps` (the gRPC load test, which
    runs for minutes) q draws fresh noise on every call.

    NOTE: q must change every call. An earlier version took it from the bank too, and with 28 layers per
    step the bank index cycled through 2 values per layer, so "iid" alternated between two queries and
    "drift" settled into a 2-cycle: hit rates far too high (found 2026-11-28)."""

    def __init__(self, shape: ModelShape, B: int, query_model: str, rho: float, device, seed: int = 0,
                 steps: int | None = None) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        L, Hq, H, d, dt = shape.num_layers, shape.num_q_heads, shape.num_kv_heads, shape.head_dim, shape.dtype
        self.k = torch.randn((BANK, B, H, d), generator=g, device=device).to(dt)
        self.v = torch.randn((BANK, B, H, d), generator=g, device=device).to(dt)
        self.c = torch.rand((BANK, B, H), generator=g, device=device)
        self.q = torch.randn((L, B, Hq, d), generator=g, device=device).to(dt)
        self.eps = torch.empty((B, Hq, d), device=device)
        self.g, self.model, self.rho, self.i = g, query_model, rho, 0
        self.steps_drawn = None
        if steps is not None:
            self.steps_drawn = torch.stack([torch.stack([self._draw(layer).clone() for layer in range(L)])
                                            for _ in range(steps)])
            self.calls = [0] * L

    def _draw(self, layer: int) -> torch.Tensor:
        eps = torch.randn(self.eps.shape, generator=self.g, device=self.eps.device, out=self.eps)
        if self.model == "iid":
            return eps.to(self.q.dtype)
        return self.q[layer].mul_(self.rho).add_(eps.to(self.q.dtype), alpha=math.sqrt(1 - self.rho ** 2))

    def next_step_into(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> None:
        """Write every layer's next (q, k, v, c) into [L, ...] buffers: what L calls of `next` return,
        in four copies (a captured step reads its inputs from fixed buffers). Needs `steps`."""
        L = q.shape[0]
        step = self.calls[0] % len(self.steps_drawn)
        assert all(n == self.calls[0] for n in self.calls), "next_step_into: layers were drawn one by one"
        q.copy_(self.steps_drawn[step])
        j = torch.arange(self.i + 1, self.i + L + 1, device=self.k.device) % BANK
        torch.index_select(self.k, 0, j, out=k)
        torch.index_select(self.v, 0, j, out=v)
        torch.index_select(self.c, 0, j, out=c)
        self.i += L
        self.calls = [n + 1 for n in self.calls]

    def next(self, layer: int):
        """(q, k, v, c) of `layer` for this step."""
        self.i += 1
        j = self.i % BANK
        if self.steps_drawn is None:
            q = self._draw(layer)
        else:
            q = self.steps_drawn[self.calls[layer] % len(self.steps_drawn), layer]
            self.calls[layer] += 1
        return q, self.k[j], self.v[j], self.c[j]


def warm_up(args, step) -> float:
    """Run the warm-up steps; return the host's ms to enqueue one step onto an idle GPU (the fastest of
    the warm-up steps after the first two, which capture the graphs). Beside "step ms" it tells a
    host-bound step (about equal) from a GPU-bound one (host well below): timed steps cannot, since a
    full launch queue blocks the host too."""
    for _ in range(min(2, args.warmup)):
        step()
    host = []
    for _ in range(args.warmup - 2):
        sync(args)
        t0 = time.perf_counter()
        step()
        host.append(1e3 * (time.perf_counter() - t0))
    sync(args)
    return min(host, default=float("nan"))


def sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def wall_of_steps(args, step) -> float:
    """Seconds for `args.steps` steps, until the GPU has finished them."""
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args)
    return time.perf_counter() - t0


def timed_steps(args, step, B: int) -> dict:
    """Warm up, then time `args.steps` steps of B tokens each (the dense configurations)."""
    host_ms = warm_up(args, step)
    wall = wall_of_steps(args, step)
    return {"tok_s": B * args.steps / wall, "step_ms": 1e3 * wall / args.steps, "host_ms": host_ms}
