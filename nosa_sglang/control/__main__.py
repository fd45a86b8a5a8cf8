"""Serve the control API over a SyntheticProvider: try nosa-ctl, grpcurl and the tuning example
without a GPU or a model. The numbers come from a closed-form model, not from a runtime.

    python -m nosa_sglang.control --port 50051 [--host 127.0.0.1] [--token T] [--step-ms 5]

The real runtime serves the same API from `nosa-sglang demo --grpc-port P` or SGLang's
`--nosa-grpc-port`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence

from nosa_sglang.control.server import DEFAULT_HOST, start_control_server
from nosa_sglang.control.synthetic import StepLoop, SyntheticProvider


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nosa_sglang.control", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--token", default=os.environ.get("NOSA_CTL_TOKEN"))
    p.add_argument("--step-ms", type=float, default=5.0, help="time between modelled decode steps")
    args = p.parse_args(argv)
    provider = SyntheticProvider()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with StepLoop(provider.step, args.step_ms / 1e3), \
            start_control_server(provider, args.host, args.port, token=args.token) as server:
        print(f"synthetic NOSA control server on {server.address} (not a runtime: modelled numbers); "
              "Ctrl-C stops", flush=True)
        try:
            done.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
