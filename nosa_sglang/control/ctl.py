"""nosa-ctl: command-line client of the NOSA control API.

    nosa-ctl [--target HOST:PORT] [--token TOKEN] stats [--watch SECONDS] [--count N] [--no-layers]
    nosa-ctl requests
    nosa-ctl config get
    nosa-ctl config set KEY=VALUE [KEY=VALUE ...] [--apply-timeout SECONDS]
    nosa-ctl reset

Exit codes: 0 ok; 1 the call failed (server unreachable, UNAUTHENTICATED, deadline, internal error);
2 usage (bad arguments, or a value the server rejected with INVALID_ARGUMENT). Every error is one line
on stderr. --target and --token default to $NOSA_CTL_TARGET and $NOSA_CTL_TOKEN (prefer the
environment for the token: a command line is visible to other users of the machine).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format

from nosa_sglang.control import ctl_format
from nosa_sglang.control.knob_mask import KNOB_FIELDS
from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.pb import control_pb2_grpc as pb_grpc
from nosa_sglang.runtime.knobs import TRANSFER_MODES, VICTIM_POLICIES

DEFAULT_TARGET = "127.0.0.1:50051"
EXIT_OK, EXIT_SERVER, EXIT_USAGE = 0, 1, 2
_TRUE, _FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")
_SIZE_SUFFIXES = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
                  "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
_CLEAR = "\x1b[H\x1b[2J"


class UsageError(Exception):
    """Bad command-line input; the message is the whole error line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        raise UsageError(f"{message} (see nosa-ctl --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nosa-ctl", description="Observe and tune the NOSA offload runtime over gRPC.")
    p.add_argument("--target", default=os.environ.get("NOSA_CTL_TARGET", DEFAULT_TARGET),
                   help=f"host:port of the control server (default $NOSA_CTL_TARGET or {DEFAULT_TARGET})")
    p.add_argument("--token", default=os.environ.get("NOSA_CTL_TOKEN"),
                   help="bearer token (default $NOSA_CTL_TOKEN)")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of one call, seconds")
    p.add_argument("--json", action="store_true", help="print the replies as JSON")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    stats = sub.add_parser("stats", help="counters: totals, per layer, occupancy")
    stats.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    stats.add_argument("--count", type=int, default=0, help="with --watch: stop after N updates")
    stats.add_argument("--no-layers", action="store_true", help="totals only")
    sub.add_parser("requests", help="running requests and their residency")
    config = sub.add_parser("config", help="knobs and NOSA constants")
    config_sub = config.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    config_sub.add_parser("get", help="show the config in force")
    set_ = config_sub.add_parser("set", help=f"change knobs: {', '.join(KNOB_FIELDS)}")
    set_.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    set_.add_argument("--apply-timeout", type=float, default=None,
                      help="seconds to wait for the step boundary (default: server's, 2 s)")
    sub.add_parser("reset", help="zero the counters")
    return p


def parse_assignments(items: Sequence[str]) -> tuple[pb.OffloadKnobs, list[str]]:
    """KEY=VALUE strings -> (knobs message, mask paths). Unknown keys go to the server unparsed,
    so it names them (unknown knob, or a read-only NOSA constant)."""
    knobs, paths = pb.OffloadKnobs(), []
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UsageError(f"{item!r}: expected KEY=VALUE, with KEY one of {list(KNOB_FIELDS)}")
        paths.append(key)
        if key == "gpu_slots":
            knobs.gpu_slots = _parse_int(key, value, 1 << 32)
        elif key == "host_capacity_bytes":
            knobs.host_capacity_bytes = _parse_size(key, value)
        elif key == "prefetch":
            if value.lower() not in _TRUE + _FALSE:
                raise UsageError(f"prefetch={value!r}: allowed values are true/false (on/off, 1/0)")
            knobs.prefetch = value.lower() in _TRUE
        elif key == "transfer_mode":
            knobs.transfer_mode = _parse_enum(key, value, TRANSFER_MODES, pb.TransferMode, "TRANSFER_MODE")
        elif key == "victim_policy":
            knobs.victim_policy = _parse_enum(key, value, VICTIM_POLICIES, pb.VictimPolicy, "VICTIM_POLICY")
    return knobs, paths


def _parse_int(key: str, value: str, limit: int) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise UsageError(f"{key}={value!r}: must be an integer (ranges: nosa-ctl config get)") from None
    if not 0 <= n < limit:
        raise UsageError(f"{key}={n}: must be in [0, {limit - 1}]")
    return n


def _parse_size(key: str, value: str) -> int:
    low = value.lower().replace(" ", "")
    for suffix, scale in _SIZE_SUFFIXES.items():
        if low.endswith(suffix) and low[: -len(suffix)]:
            try:
                return _parse_int(key, str(int(float(low[: -len(suffix)]) * scale)), 1 << 64)
            except ValueError:
                break
    try:
        return _parse_int(key, value, 1 << 64)
    except UsageError:
        raise UsageError(f"{key}={value!r}: must be a byte count (e.g. 0, 68719476736, 64GiB)") from None


def _parse_enum(key: str, value: str, allowed: Sequence[str], enum: Any, prefix: str) -> int:
    if value.lower() not in allowed:
        raise UsageError(f"{key}={value!r}: allowed values are {list(allowed)}")
    return enum.Value(f"{prefix}_{value.upper()}")


def _print_json(message: Any, indent: int | None = 2) -> None:
    try:
        text = json_format.MessageToJson(message, preserving_proto_field_name=True, indent=indent,
                                         always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf < 5.26 names the option differently
        text = json_format.MessageToJson(message, preserving_proto_field_name=True, indent=indent,
                                         including_default_value_fields=True)
    print(text)


def _run(args: argparse.Namespace, stub: pb_grpc.NosaControlStub) -> int:
    md = [("authorization", f"Bearer {args.token}")] if args.token else []
    call: dict[str, Any] = dict(metadata=md, timeout=args.timeout)
    if args.command == "stats" and args.watch is not None:
        request = pb.WatchStatsRequest(max_updates=max(0, args.count))
        request.interval.FromNanoseconds(int(args.watch * 1e9))
        stream = stub.WatchStats(request, metadata=md)
        live = sys.stdout.isatty() and not args.json
        try:
            for update in stream:
                if args.json:
                    _print_json(update, indent=None)
                else:
                    delta = update.delta if update.HasField("delta") else None
                    text = ctl_format.format_stats(update.stats, delta, layers=not args.no_layers)
                    print(_CLEAR + text if live else text + "\n", flush=True)
        except KeyboardInterrupt:
            stream.cancel()
        return EXIT_OK
    if args.command == "stats":
        reply = stub.GetStats(pb.GetStatsRequest(), **call)
        text = ctl_format.format_stats(reply.stats, layers=not args.no_layers)
        _print_json(reply) if args.json else print(text)
    elif args.command == "requests":
        reply = stub.ListRequests(pb.ListRequestsRequest(), **call)
        _print_json(reply) if args.json else print(ctl_format.format_requests(reply))
    elif args.command == "reset":
        reply = stub.ResetStats(pb.ResetStatsRequest(), **call)
        _print_json(reply) if args.json else print(f"stats reset (epoch {reply.stats_epoch})")
    elif args.config_command == "get":
        reply = stub.GetConfig(pb.GetConfigRequest(), **call)
        pending = reply.pending if reply.HasField("pending") else None
        _print_json(reply) if args.json else print(ctl_format.format_config(reply.config, pending))
    else:
        knobs, paths = parse_assignments(args.assignments)
        request = pb.UpdateConfigRequest(knobs=knobs)
        request.update_mask.paths.extend(paths)
        if args.apply_timeout is not None:
            if not args.apply_timeout >= 0:
                raise UsageError(f"--apply-timeout={args.apply_timeout}: must be >= 0")
            request.apply_timeout.FromNanoseconds(int(args.apply_timeout * 1e9))
        reply = stub.UpdateConfig(request, **call)
        if args.json:
            _print_json(reply)
        else:
            state = "applied" if reply.applied else "queued (applies at the next step boundary)"
            pending = reply.pending if reply.HasField("pending") else None
            print(f"{state}: {' '.join(args.assignments)}\n")
            print(ctl_format.format_config(reply.config, pending))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nosa-ctl` console script; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        with grpc.insecure_channel(args.target) as channel:
            return _run(args, pb_grpc.NosaControlStub(channel))
    except UsageError as err:
        print(f"nosa-ctl: usage error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as err:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = " ".join(str(err.details() if hasattr(err, "details") else err).split())
        print(f"nosa-ctl: error: {code.name}: {details} (target {args.target})", file=sys.stderr)
        return EXIT_USAGE if code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_SERVER
    except KeyboardInterrupt:
        return EXIT_OK
    except SystemExit as done:  # --help
        return int(done.code or 0)


if __name__ == "__main__":
    sys.exit(main())
