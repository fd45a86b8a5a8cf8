"""Two homes for a batch's KV, emulated with two runtimes (decode_throughput.py configs ac and ad): the
host-homed requests in an offload runtime, the rest fully on the GPU in a gpu_only one, stepped either
as one step on two streams (`beside`) or as two step loops (`decoupled_steps`)."""

from __future__ import annotations

import time

import torch

from decode_workload import sync

SIDE_STEPS = 4  # config ad: the resident runtime is sized for this many times args.steps (it outpaces (a))


def beside(args, main, side):
    """One step of `main` with `side` on a stream of its own: both after what came before, joined at the end."""
    if args.device != "cuda":
        return lambda: (side(), main())
    stream = torch.cuda.Stream()

    def step() -> None:
        now = torch.cuda.current_stream()
        stream.wait_stream(now)
        with torch.cuda.stream(stream):
            side()
        main()
        now.wait_stream(stream)

    return step


def decoupled_steps(args, main, side) -> tuple[float, int]:
    """Time args.steps steps of `main` while `side` steps as often as it can: each on a stream of its own
    with its own step loop (no join per step; at most two steps of each in flight). Returns (wall s, side
    steps). On a CPU the two alternate (plumbing only)."""
    if args.device != "cuda":
        t0 = time.perf_counter()
        for _ in range(args.steps):
            main(), side()
        return time.perf_counter() - t0, args.steps
    streams, fns = (torch.cuda.Stream(), torch.cuda.Stream()), (main, side)
    inflight: tuple[list, list] = ([], [])
    done = [0, 0]
    t0 = time.perf_counter()
    while done[0] < args.steps:
        for i in (0, 1):
            if inflight[i] and inflight[i][0].query():
                inflight[i].pop(0)
            if len(inflight[i]) < 2 and done[i] < (args.steps if i == 0 else SIDE_STEPS * args.steps):
                with torch.cuda.stream(streams[i]):
                    fns[i]()
                    inflight[i].append(torch.cuda.Event())
                    inflight[i][-1].record()
                done[i] += 1
    torch.cuda.current_stream().wait_stream(streams[0])
    torch.cuda.current_stream().wait_stream(streams[1])
    sync(args)
    return time.perf_counter() - t0, done[1]
