"""gRPC control service of the NOSA offload runtime (nosa.v1.NosaControl) and its client `nosa-ctl`.

Public entry points (imported lazily, so `nosa_sglang.control.pb` imports without the server's
dependencies — benchmarks/check_grpc_env.py relies on that):
    start_control_process(provider, host, port, token=None, options=ServerOptions()) -> ControlProcess
        (the server in a child process, fed by one bridge thread of the owner: the default)
    start_control_server(provider, host, port, token=None, options=ServerOptions()) -> ControlServer
        (the server on threads of the owner's process)
    ControlProvider, KnobUpdate: the interface the runtime implements (provider.py)
    (the step-boundary knob queue a provider uses is nosa_sglang.runtime.knob_queue.KnobQueue)
    SyntheticProvider: a test double, not the runtime (synthetic.py)
"""

from __future__ import annotations

from nosa_sglang._lazy import lazy_exports

_EXPORTS = {
    "start_control_process": "process_server",
    "ControlProcess": "process_server",
    "start_control_server": "server",
    "ControlServer": "server",
    "ControlServerError": "server",
    "ServerOptions": "server",
    "ControlProvider": "provider",
    "KnobUpdate": "provider",
    "ProviderUnavailable": "provider",
    "SyntheticProvider": "synthetic",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
