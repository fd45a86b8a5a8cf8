"""`nosa-sglang` command line: `demo` (the main job on a CPU machine)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nosa_sglang.demo import DEFAULT_CHECKPOINT, DemoOptions, run_demo


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nosa-sglang", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="greedy decode of a tiny NOSA model with a locality table")
    d.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="made if missing")
    d.add_argument("--prompt-tokens", type=_positive("--prompt-tokens"), default=6000)
    d.add_argument("--steps", type=_positive("--steps"), default=64, help="tokens to generate")
    d.add_argument("--report-every", type=_positive("--report-every"), default=16)
    d.add_argument("--offload", action=argparse.BooleanOptionalAction, default=False,
                   help="decode through the offload runtime (host store + GPU slot cache)")
    d.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        run_demo(
            DemoOptions(
                checkpoint=args.checkpoint,
                prompt_tokens=args.prompt_tokens,
                steps=args.steps,
                report_every=args.report_every,
                offload=args.offload,
                seed=args.seed,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
