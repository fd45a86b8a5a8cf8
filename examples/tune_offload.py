"""Watch the GPU-slot hit rate over gRPC and raise `gpu_slots` when it drops below a target.

More slots per (request, layer, KV head) keep more of each request's recently selected blocks on
the GPU, turning host->GPU misses into hits, at the cost of GPU memory. This loop is the simplest
controller: every `--interval` it reads the hit rate of the last interval (WatchStats delta); below
`--min-hit-rate` it adds `--step-slots` slots (UpdateConfig, applied at the next decode step), then
waits `--cooldown` intervals so the next decision sees the new setting. It never lowers the slots.

    # against a server: nosa-sglang demo --grpc-port 50051 (or SGLang with --nosa-grpc-port)
    # or, without a GPU, the synthetic stand-in: python -m nosa_sglang.control --port 50051
    python examples/tune_offload.py --target 127.0.0.1:50051 --min-hit-rate 0.9

Exit code 0 when it stops (Ctrl-C or --max-updates), 1 when a call fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc

from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.pb import control_pb2_grpc as pb_grpc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=os.environ.get("NOSA_CTL_TARGET", "127.0.0.1:50051"))
    p.add_argument("--token", default=os.environ.get("NOSA_CTL_TOKEN"))
    p.add_argument("--min-hit-rate", type=float, default=0.9, help="target hit rate (0-1)")
    p.add_argument("--step-slots", type=int, default=32, help="slots added per raise")
    p.add_argument("--max-slots", type=int, default=0, help="never go above (0: server's limit)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between decisions")
    p.add_argument("--cooldown", type=int, default=2, help="intervals to wait after a raise")
    p.add_argument("--min-lookups", type=int, default=1000,
                   help="ignore intervals with fewer hits+misses (too little traffic to judge)")
    p.add_argument("--max-updates", type=int, default=0, help="stop after N stats messages (0: never)")
    p.add_argument("--dry-run", action="store_true", help="print decisions, change nothing")
    return p.parse_args(argv)


def raise_slots(stub: pb_grpc.NosaControlStub, md: list, slots: int) -> pb.UpdateConfigResponse:
    request = pb.UpdateConfigRequest(knobs=pb.OffloadKnobs(gpu_slots=slots))
    request.update_mask.paths.append("gpu_slots")
    return stub.UpdateConfig(request, metadata=md, timeout=10)


def tune(args: argparse.Namespace, stub: pb_grpc.NosaControlStub, md: list) -> None:
    config = stub.GetConfig(pb.GetConfigRequest(), metadata=md, timeout=10).config
    slots = config.knobs.gpu_slots
    max_slots = min(args.max_slots or config.limits.max_gpu_slots, config.limits.max_gpu_slots)
    print(f"gpu_slots={slots} (allowed [{config.limits.min_gpu_slots}, {config.limits.max_gpu_slots}],"
          f" tuning up to {max_slots}); target hit rate {args.min_hit_rate:.1%}", flush=True)
    request = pb.WatchStatsRequest(max_updates=max(0, args.max_updates))
    request.interval.FromNanoseconds(int(args.interval * 1e9))
    wait = 0
    for update in stub.WatchStats(request, metadata=md):
        if not update.HasField("delta"):
            continue  # the first message has no interval yet
        d = update.delta.totals
        lookups = d.hits + d.misses
        note = ""
        if wait > 0:
            wait -= 1
            note = "  (cooling down)"
        elif lookups < args.min_lookups:
            note = "  (too little traffic)"
        elif d.hit_rate < args.min_hit_rate and slots < max_slots:
            new = min(slots + args.step_slots, max_slots)
            if args.dry_run:
                note = f"  -> would raise gpu_slots {slots} -> {new}"
            else:
                reply = raise_slots(stub, md, new)
                state = "applied" if reply.applied else "queued"
                note = f"  -> gpu_slots {slots} -> {new} ({state})"
                slots = new
                wait = args.cooldown
        print(f"hit rate {d.hit_rate:6.1%} over {lookups} lookups, gpu_slots={slots}{note}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    md = [("authorization", f"Bearer {args.token}")] if args.token else []
    try:
        with grpc.insecure_channel(args.target) as channel:
            tune(args, pb_grpc.NosaControlStub(channel), md)
    except KeyboardInterrupt:
        pass
    except grpc.RpcError as err:
        print(f"tune_offload: {err.code().name}: {err.details()} (target {args.target})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
