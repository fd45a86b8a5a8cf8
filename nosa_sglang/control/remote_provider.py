"""RemoteProvider: the child side of `process_server` — a ControlProvider over the owner's pipe.

It serves the state the owner last published (snapshot, knobs, config, slot limit) and forwards the
two calls that change the owner (knob requests, counter resets), waiting for the owner's answer. One
receiver thread reads the pipe; gRPC worker threads only read the latest state or wait on a reply.
"""

from __future__ import annotations

import itertools
import threading
from multiprocessing.connection import Connection
from typing import Any

from nosa_sglang.config import NosaConfig
from nosa_sglang.control.provider import ControlProvider, KnobUpdate, ProviderUnavailable
from nosa_sglang.runtime.knobs import KnobError, OffloadKnobs
from nosa_sglang.runtime.stats import StatsSnapshot

REPLY_MARGIN_S = 10.0  # beyond a request's own timeout: the owner is alive but busy


class OwnerGone(ProviderUnavailable):
    """The owner process closed the pipe (it stopped or died) before answering."""


class RemoteProvider(ControlProvider):
    def __init__(self, conn: Connection, state: dict[str, Any]) -> None:
        self._conn = conn
        self._state = state
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._waiting: dict[int, tuple[threading.Event, list]] = {}
        self._lock = threading.Lock()
        self.closed = threading.Event()  # the pipe ended or the owner said stop
        self.stop_grace_s: float | None = 1.0

    # -- served from the latest state ------------------------------------------------------------------
    def snapshot(self) -> StatsSnapshot | None:
        return self._state["snapshot"]

    def nosa_config(self) -> NosaConfig:
        return self._state["config"]

    def knobs(self) -> OffloadKnobs:
        return self._state["knobs"]

    def requested_knobs(self) -> OffloadKnobs:
        return self._state["requested"]

    def max_gpu_slots(self) -> int:
        return self._state["max_gpu_slots"]

    # -- forwarded to the owner ------------------------------------------------------------------------
    def request_knobs(self, knobs: OffloadKnobs, timeout_s: float) -> KnobUpdate:
        kind, payload = self._call(("knobs", knobs, timeout_s), timeout_s)
        if kind == "knob_error":
            raise KnobError(*payload)
        return payload

    def reset_stats(self) -> None:
        self._call(("reset",), 0.0)

    def _call(self, msg: tuple, timeout_s: float) -> tuple[str, Any]:
        req_id = next(self._ids)
        done, box = threading.Event(), []
        with self._lock:
            self._waiting[req_id] = (done, box)
        try:
            with self._send_lock:
                self._conn.send((msg[0], req_id, *msg[1:]))
            if not done.wait(timeout_s + REPLY_MARGIN_S) or not box:
                raise OwnerGone("the runtime's process did not answer (stopped or busy)")
            if box[0][0] == "error":
                raise ProviderUnavailable(box[0][1])
            return box[0]
        except (OSError, BrokenPipeError) as err:
            raise OwnerGone("the runtime's process is gone") from err
        finally:
            with self._lock:
                self._waiting.pop(req_id, None)

    # -- the receiver thread ---------------------------------------------------------------------------
    def receive(self) -> None:
        """Read the pipe until the owner says stop or goes away; then wake every waiting call."""
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "state":
                    self._state = msg[1]
                elif msg[0] in ("reply", "knob_error", "error"):
                    with self._lock:
                        waiter = self._waiting.get(msg[1])
                    if waiter is not None:
                        waiter[1].append((msg[0], msg[2]))
                        waiter[0].set()
                elif msg[0] == "stop":
                    self.stop_grace_s = msg[1]
                    break
        except (EOFError, OSError):
            pass
        self.closed.set()
        with self._lock:
            for done, _ in self._waiting.values():
                done.set()  # an empty box: OwnerGone


def serve_child(conn: Connection) -> None:
    """The child process: start the gRPC server over a RemoteProvider, report the port (or why it
    could not start), serve until the owner stops it or exits."""
    from nosa_sglang.control.server import ControlServerError, start_control_server

    _, state, host, port, token, options = conn.recv()
    provider = RemoteProvider(conn, state)
    try:
        server = start_control_server(provider, host=host, port=port, token=token, options=options)
    except (ControlServerError, ValueError) as err:
        conn.send(("failed", str(err)))
        return
    with provider._send_lock:  # NOTE: a call may already be forwarding on another thread
        conn.send(("started", server.port))
    provider.receive()
    server.stop(provider.stop_grace_s)


if __name__ == "__main__":  # python -m nosa_sglang.control.remote_provider SOCKET (key on stdin)
    import sys
    from multiprocessing.connection import Client

    key = bytes.fromhex(sys.stdin.readline().strip())
    serve_child(Client(sys.argv[1], family="AF_UNIX", authkey=key))
