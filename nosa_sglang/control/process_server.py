"""start_control_process: the control server in a child process, so its handlers never take the GIL
from the process that decodes.

Why: in the owner's process, 32 clients at 10 calls/s and 8 watchers cost a Python-bound decode loop
+44 % step time on an H200, against +16 % from a child (benchmarks/results/grpc_load.md): protobuf
building, auth and gRPC's Python threads all hold the owner's GIL. Here the owner keeps one *bridge*
thread that wakes `publish_interval_s` (50 ms) apart to send a snapshot of the counters and knobs down a
pipe, and answers the rare knob and reset requests; the gRPC server (`start_control_server`, unchanged:
auth, health, reflection, limits) runs in a child interpreter over a `RemoteProvider` that serves the
latest published state.

Semantics are the in-process server's: knobs are validated on arrival in the child and applied by the
owner's provider at its step boundary (the bridge calls `request_knobs` on a short-lived thread, so
a waiting UpdateConfig never stalls the snapshots); ResetStats resets in the owner and publishes a fresh
snapshot before it answers. Stats lag the owner by at most one publish interval. The child stops with
its owner: `stop()`, or the pipe closing when the owner exits.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener
from typing import Any

from nosa_sglang.control.provider import ControlProvider
from nosa_sglang.control.server import DEFAULT_HOST, ControlServerError, ServerOptions
from nosa_sglang.runtime.knobs import KnobError

DEFAULT_PUBLISH_INTERVAL_S = 0.05
START_TIMEOUT_S = 60.0  # spawning imports grpc and protobuf in a fresh interpreter


def owner_state(provider: ControlProvider) -> dict[str, Any]:
    """What the child serves between two publishes (plain picklable objects)."""
    return {"snapshot": provider.snapshot(), "knobs": provider.knobs(), "requested": provider.requested_knobs(),
            "config": provider.nosa_config(), "max_gpu_slots": provider.max_gpu_slots()}


class ControlProcess:
    """A control server running in a child process; same surface as `ControlServer` (address, port,
    stop, wait, context manager)."""

    def __init__(self, provider: ControlProvider, host: str, port: int, token: str | None,
                 options: ServerOptions, publish_interval_s: float) -> None:
        self.provider = provider
        self.host = host
        self._interval = publish_interval_s
        self._send_lock = threading.Lock()
        self._stopped = threading.Event()
        self.publish_errors = 0  # snapshots the provider failed to build (the child kept the last one)
        self.last_publish_error = ""
        # NOTE: a fresh interpreter (`python -m`), not multiprocessing: fork is unsafe next to CUDA and
        # spawn re-imports the owner's __main__ (SGLang's launcher, a user's script without a main
        # guard). -P: the child sees the owner's sys.path (PYTHONPATH), not the current directory. The
        # pipe is an authenticated Unix socket; the key goes over stdin, not argv.
        authkey = secrets.token_bytes(32)
        with Listener(family="AF_UNIX", authkey=authkey) as listener:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            self._proc = subprocess.Popen([sys.executable, "-P", "-m", "nosa_sglang.control.remote_provider",
                                           listener.address], stdin=subprocess.PIPE, env=env)
            self._proc.stdin.write(authkey.hex().encode() + b"\n")
            self._proc.stdin.close()
            self._conn = self._accept(listener)
        self._conn.send(("init", owner_state(provider), host, port, token, options))
        self.port = self._await_start()
        self._bridge = threading.Thread(target=self._run_bridge, name="nosa-grpc-bridge", daemon=True)
        self._bridge.start()

    def _accept(self, listener: Listener):
        box: list = []
        t = threading.Thread(target=lambda: box.append(listener.accept()), daemon=True)
        t.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not box and self._proc.poll() is None and time.monotonic() < deadline:
            t.join(0.05)  # NOTE: a child that dies before connecting fails the start at once
        if not box:
            self._proc.kill()
            raise ControlServerError(f"the control server process did not connect within {START_TIMEOUT_S:.0f} s "
                                     f"(exit code {self._proc.poll()})")
        return box[0]

    def _await_start(self) -> int:
        if not self._conn.poll(START_TIMEOUT_S):
            self._proc.kill()
            raise ControlServerError(f"the control server process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, value = self._conn.recv()
        except EOFError:
            kind, value = "failed", f"the control server process exited (code {self._proc.wait(5)})"
        if kind != "started":
            self._proc.wait(5)
            self._conn.close()
            raise ControlServerError(value)
        return int(value)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    # -- the owner's side ------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _run_bridge(self) -> None:
        next_publish = 0.0
        try:
            while not self._stopped.is_set():
                now = time.monotonic()
                if now >= next_publish:
                    self._publish()
                    next_publish = now + self._interval
                if self._conn.poll(max(0.0, next_publish - time.monotonic())):
                    self._handle(self._conn.recv())
        except (EOFError, OSError, BrokenPipeError):
            pass  # the child is gone (stopped, or crashed: then `wait()` reports it)

    def _publish(self) -> None:
        try:
            state = owner_state(self.provider)
        except Exception as err:  # noqa: BLE001 - a provider bug must not end the bridge
            self.publish_errors += 1
            self.last_publish_error = f"{type(err).__name__}: {err}"
            return  # the child keeps serving the last state
        self._send(("state", state))

    def _handle(self, msg: tuple) -> None:
        kind, req_id = msg[0], msg[1]
        if kind == "reset":
            try:
                self.provider.reset_stats()
            except Exception as err:  # noqa: BLE001 - answered as UNAVAILABLE, the bridge goes on
                self._send(("error", req_id, f"reset_stats failed: {type(err).__name__}: {err}"))
                return
            self._publish()
            self._send(("reply", req_id, None))
        elif kind == "knobs":
            threading.Thread(target=self._request_knobs, args=msg[1:], daemon=True).start()

    def _request_knobs(self, req_id: int, knobs: Any, timeout_s: float) -> None:
        try:
            update = self.provider.request_knobs(knobs, timeout_s)
            reply = ("reply", req_id, update)
        except KnobError as err:
            reply = ("knob_error", req_id, (err.field, str(err)))
        except Exception as err:  # noqa: BLE001 - answered as UNAVAILABLE
            reply = ("error", req_id, f"request_knobs failed: {type(err).__name__}: {err}")
        try:
            self._publish()
            self._send(reply)
        except (OSError, BrokenPipeError):
            pass

    # -- lifetime --------------------------------------------------------------------------------------
    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stop the child's server (NOT_SERVING, streams end with OK, unary calls get `grace_s`)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            self._send(("stop", grace_s))
        except (OSError, BrokenPipeError):
            pass
        try:
            self._proc.wait((grace_s or 0) + 10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._bridge.join(5)
        self._conn.close()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the child has exited (True) or `timeout_s` ran out (False)."""
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def __enter__(self) -> "ControlProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_control_process(
    provider: ControlProvider,
    host: str = DEFAULT_HOST,
    port: int = 0,
    token: str | None = None,
    options: ServerOptions = ServerOptions(),
    publish_interval_s: float = DEFAULT_PUBLISH_INTERVAL_S,
) -> ControlProcess:
    """Serve `provider` from a child process (arguments as `start_control_server`); raises
    ControlServerError, naming the address, when the child cannot bind it."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port={port}: allowed range is [0, 65535]")
    if not 0.001 <= publish_interval_s <= 10:
        raise ValueError(f"publish_interval_s={publish_interval_s}: allowed range is [0.001, 10]")
    return ControlProcess(provider, host, port, token, options, publish_interval_s)
