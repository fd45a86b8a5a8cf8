"""`python -m nosa_sglang.launch_server --enable-nosa [--nosa-* ...] <any sglang.launch_server args>`.

Parses the NOSA flags, refuses SGLang flags NOSA cannot run with (before any GPU work), sets the SGLang
flags NOSA needs (attention backend `nosa`, page size 64, its decode graph backend), hands the NOSA
settings to the scheduler processes through the environment, loads the plugins and runs SGLang's own server.
Without `--enable-nosa` it is plain `sglang.launch_server`.
"""

from __future__ import annotations

import argparse
import sys

from nosa_sglang.server_flags import (
    DECODE_GRAPHS_OFF, DEFAULT_MAX_RUNNING_REQUESTS, NosaFlagError, NosaServerFlags, add_nosa_args,
    check_owned_flags, check_server_args, flags_from_args, nosa_server_args,
)

__all__ = ["main", "prepare", "NosaServerFlags", "DEFAULT_MAX_RUNNING_REQUESTS"]


def split_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(NOSA flags, the rest for SGLang)."""
    parser = argparse.ArgumentParser(prog="python -m nosa_sglang.launch_server", add_help=False)
    add_nosa_args(parser)
    return parser.parse_known_args(argv)


def sglang_argv(rest: list[str], flags: NosaServerFlags) -> list[str]:
    check_owned_flags(rest)
    extra = [x for field, value in nosa_server_args(flags).items()
             for x in (f"--{field.replace('_', '-')}", str(value))]
    if not any(t.split("=", 1)[0] == "--max-running-requests" for t in rest):
        extra += ["--max-running-requests", str(DEFAULT_MAX_RUNNING_REQUESTS)]
    return rest + extra


def prepare(argv: list[str]):
    """(ServerArgs, NosaServerFlags or None); raises NosaFlagError naming the flag. Sets ENV_VAR."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    ns, rest = split_args(argv)
    if not ns.enable_nosa:
        nosa_given = [t for t in argv if t.startswith("--nosa-")]
        if nosa_given:
            raise NosaFlagError(f"{nosa_given[0].split('=', 1)[0]}: needs --enable-nosa")
        load_plugins()
        return prepare_server_args(rest), None
    flags = flags_from_args(ns).under_sglang_graph_switch(any(t.split("=", 1)[0] in DECODE_GRAPHS_OFF for t in rest))
    flags.export()  # before the plugins load: they register only when NOSA is on
    load_plugins()
    server_args = prepare_server_args(sglang_argv(rest, flags))
    check_server_args(server_args)
    return server_args, flags


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        server_args, flags = prepare(argv)
    except NosaFlagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from sglang.launch_server import run_server

    if flags is not None:
        where = f", control API on {flags.grpc_host}:{flags.grpc_port}" if flags.grpc_port is not None else ""
        print(f"[nosa] NOSA enabled: offload {'on' if flags.offload else 'off'}{where}", file=sys.stderr)
    run_server(server_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

