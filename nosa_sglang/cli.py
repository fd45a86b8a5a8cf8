"""`nosa-sglang` command line: `demo` (the main job on a CPU machine)."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
from pathlib import Path

from nosa_sglang.control.server import ControlServerError
from nosa_sglang.demo import DEFAULT_CHECKPOINT, DEFAULT_GRPC_HOST, SERVE_ROUND_STEPS, DemoOptions, run_demo

DEFAULT_STEPS = 64


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={text!r}: must be an integer >= 1") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name}={value}: allowed range is >= 1")
        return value

    return parse


def _port(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={text!r}: must be an integer in [0, 65535]") from None
        if not 0 <= value <= 65535:
            raise argparse.ArgumentTypeError(f"{name}={value}: allowed range is [0, 65535] (0 picks a free port)")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nosa-sglang", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="greedy decode of a tiny NOSA model with a locality table")
    d.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="made if missing")
    d.add_argument("--prompt-tokens", type=_positive("--prompt-tokens"), default=6000)
    d.add_argument("--steps", type=_positive("--steps"), default=None,
                   help=f"tokens to generate (default {DEFAULT_STEPS}; with --grpc-port: per round, "
                        f"default {SERVE_ROUND_STEPS})")
    d.add_argument("--report-every", type=_positive("--report-every"), default=16)
    d.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through the offload runtime (host store + GPU slot cache); "
                        "implied by --grpc-port")
    d.add_argument("--seed", type=int, default=0)
    g = d.add_argument_group("control API (gRPC)")
    g.add_argument("--grpc-port", type=_port("--grpc-port"), default=None,
                   help="serve nosa.v1.NosaControl on this port (0: a free one) and keep decoding, "
                        "round after round, until Ctrl-C or SIGTERM")
    g.add_argument("--grpc-host", default=None, help=f"address to bind (default {DEFAULT_GRPC_HOST})")
    g.add_argument("--grpc-token", default=os.environ.get("NOSA_CTL_TOKEN"),
                   help="bearer token every control call must carry (default $NOSA_CTL_TOKEN; prefer it: "
                        "a command line is visible to other users)")
    g.add_argument("--grpc-in-process", action="store_true",
                   help="run the server on threads of the decoding process instead of a child process "
                        "(the child keeps the handlers off the decode loop's GIL)")
    return p


def _demo_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> DemoOptions:
    serving = args.grpc_port is not None
    if not serving and args.grpc_host is not None:
        p.error("--grpc-host: needs --grpc-port")
    if not serving and args.grpc_in_process:
        p.error("--grpc-in-process: needs --grpc-port")
    if serving and args.offload is False:
        p.error("--no-offload: the control API (--grpc-port) serves the offload runtime")
    return DemoOptions(
        checkpoint=args.checkpoint,
        prompt_tokens=args.prompt_tokens,
        steps=args.steps or (SERVE_ROUND_STEPS if serving else DEFAULT_STEPS),
        report_every=args.report_every,
        offload=bool(args.offload) or serving,
        seed=args.seed,
        grpc_port=args.grpc_port,
        grpc_host=args.grpc_host or DEFAULT_GRPC_HOST,
        grpc_token=(args.grpc_token or None) if serving else None,
        grpc_in_process=args.grpc_in_process,
    )


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.command == "demo":
        opts = _demo_options(p, args)
        print_fn = functools.partial(print, flush=True)
        if opts.grpc_port is None:
            run_demo(opts, print_fn=print_fn)
        else:
            return _serve_demo(opts, print_fn)
    return 0


def _serve_demo(opts: DemoOptions, print_fn) -> int:
    """Serving ends on Ctrl-C or SIGTERM: the round stops after its current step, the server stops."""
    stop = threading.Event()
    # NOTE: handlers can only be set from the main thread (not when main() is embedded elsewhere).
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if on_main else None
    try:
        run_demo(opts, print_fn=print_fn, stop=stop)
    except ControlServerError as err:  # e.g. the port is taken: one line, not a traceback
        print(f"nosa-sglang demo: error: --grpc-port: {err}", file=sys.stderr)
        return 1
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
