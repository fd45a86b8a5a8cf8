"""The dense baselines of decode_throughput.py: (d) torch SDPA over a bf16 cache, eager, and (dg) the
same attention as a server runs it, each step one CUDA graph through our decode kernel over every block."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from decode_workload import Workload, timed_steps
from nosa_sglang.config import NosaConfig
from nosa_sglang.kernels.sparse_decode import sparse_decode_attention
from nosa_sglang.runtime import ModelShape, graph_capture


def run_dense(args, shape, tokens, B) -> dict:
    L, H, d = shape.num_layers, shape.num_kv_heads, shape.head_dim
    n_max = tokens + args.steps + args.warmup + 1
    kc = torch.zeros((L, B, H, n_max, d), dtype=shape.dtype, device=args.device)
    vc = torch.zeros_like(kc)
    work = Workload(shape, B, "iid", args.drift_rho, args.device, steps=args.warmup + args.steps)
    pos = tokens

    def step() -> None:
        nonlocal pos
        for layer in range(L):
            q, k, v, _ = work.next(layer)
            kc[layer, :, :, pos] = k
            vc[layer, :, :, pos] = v
            # NOTE: enable_gqa with one query row per head, not a group's heads as G query rows of its KV
            # head: with B * Hkv rows of work the latter gets no split over the context and ran ~25x
            # below the byte roofline on an H200 (benchmarks/kernels.py measures this form at roofline)
            F.scaled_dot_product_attention(q.unsqueeze(2), kc[layer, :, :, : pos + 1], vc[layer, :, :, : pos + 1],
                                           enable_gqa=True)
        pos += 1

    return timed_steps(args, step, B)  # NOTE: bench_one frees the caches before the next configuration


class DenseGraphed:
    """(dg) dense decode the way a server runs it: each step one CUDA graph (on CPU the same body, eager)
    with the position on the device, every layer writing its new k/v and attending over every block of
    the context through our decode kernel with a zero bias (kernels.md: within 1.0-1.1x of SDPA's GPU
    time at these shapes). Why beside (d): (d)'s eager SDPA loop ran 1.3-2.0x below its kernels' GPU time
    (runtime.md, session 7), and a baseline slowed by its host is not the one to beat.

    Cache: per layer [B * Hkv * nb, block_size, d] (request-major, then head, then block), so request b's
    head h is slots (b * Hkv + h) * nb + [0, nb), listed in order; seq_lens counts the new token."""

    def __init__(self, args, shape: ModelShape, tokens: int, B: int) -> None:
        L, H, Hq, d, bs = shape.num_layers, shape.num_kv_heads, shape.num_q_heads, shape.head_dim, NosaConfig().block_size
        dev, self.L, self.H, self.d = args.device, L, H, d
        nb = -(-(tokens + args.steps + args.warmup + 2) // bs)
        self.k = torch.zeros((L, B * H * nb, bs, d), dtype=shape.dtype, device=dev)
        self.v = torch.zeros_like(self.k)
        self.c = torch.zeros((B * H * nb, bs), device=dev)
        self.slots = torch.arange(B * H * nb, dtype=torch.int32, device=dev).view(B, H, nb)
        self.blocks = torch.arange(nb, dtype=torch.int32, device=dev).expand(B, H, nb).contiguous()
        self.seq = torch.full((B,), tokens + 1, dtype=torch.int32, device=dev)
        self.first_row = torch.arange(B * H, device=dev) * (nb * bs)  # token 0 of each (request, head)
        self.work = Workload(shape, B, "iid", args.drift_rho, dev, steps=args.warmup + args.steps)
        self.q = torch.empty((L, B, Hq, d), dtype=shape.dtype, device=dev)
        self.kn, self.vn = (torch.empty((L, B, H, d), dtype=shape.dtype, device=dev) for _ in range(2))
        self.cn = torch.empty((L, B, H), device=dev)
        self.out = torch.empty_like(self.q)
        self.graph = None

    def body(self) -> None:
        """One step: every layer's new k/v at position seq - 1, attention over the context, seq += 1."""
        at = self.first_row + (self.seq.long() - 1).repeat_interleave(self.H)
        for layer in range(self.L):
            self.k[layer].view(-1, self.d).index_copy_(0, at, self.kn[layer].view(-1, self.d))
            self.v[layer].view(-1, self.d).index_copy_(0, at, self.vn[layer].view(-1, self.d))
            self.out[layer].copy_(sparse_decode_attention(self.q[layer], self.k[layer], self.v[layer], self.c,
                                                          self.slots, self.blocks, self.seq))
        self.seq.add_(1)

    def step(self) -> None:
        self.work.next_step_into(self.q, self.kn, self.vn, self.cn)
        if self.k.device.type != "cuda":
            self.body()
        elif self.graph is None:  # NOTE: the first step runs eagerly (kernels compile), then is captured
            self.body()
            self.graph = torch.cuda.CUDAGraph()
            with graph_capture.capture(self.graph, None):
                self.body()
        else:
            self.graph.replay()
