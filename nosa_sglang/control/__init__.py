"""gRPC control service of the NOSA offload runtime (nosa.v1.NosaControl) and its client `nosa-ctl`.

Public entry points (imported lazily, so `nosa_sglang.control.pb` imports without the server's
dependencies — benchmarks/check_grpc_env.py relies on that):
    start_control_server(provider, host, port, token=None, options=ServerOptions()) -> ControlServer
    ControlProvider, KnobUpdate: the interface the runtime implements (provider.py)
    (the step-boundary knob queue a provider uses is nosa_sglang.runtime.knob_queue.KnobQueue)
    SyntheticProvider: a test double, not the runtime (synthetic.py)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "start_control_server": "nosa_sglang.control.server",
    "ControlServer": "nosa_sglang.control.server",
    "ControlServerError": "nosa_sglang.control.server",
    "ServerOptions": "nosa_sglang.control.server",
    "ControlProvider": "nosa_sglang.control.provider",
    "KnobUpdate": "nosa_sglang.control.provider",
    "SyntheticProvider": "nosa_sglang.control.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nosa_sglang.control' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
