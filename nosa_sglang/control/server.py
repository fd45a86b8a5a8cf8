"""start_control_server: the gRPC server of the control API, on its own threads, next to the runtime.

One grpc.server with its own thread pool serves nosa.v1.NosaControl (behind the bearer-token
interceptor when a token is set), the standard grpc.health.v1.Health and server reflection (so
`grpcurl` needs no proto file). It binds 127.0.0.1 unless told otherwise: the API can change the
runtime's knobs and has no TLS.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nosa_sglang.control.auth import BearerTokenInterceptor
from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.pb import control_pb2_grpc as pb_grpc
from nosa_sglang.control.provider import ControlProvider
from nosa_sglang.control.service import NosaControlService
from nosa_sglang.control.snapshot_cache import DEFAULT_SNAPSHOT_INTERVAL_S, SnapshotCache

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NosaControl"].full_name  # "nosa.v1.NosaControl"
DEFAULT_HOST = "127.0.0.1"


class ControlServerError(RuntimeError):
    """The server could not start (e.g. the address is taken); the message names host and port."""


@dataclass(frozen=True)
class ServerOptions:
    """Limits of one control server.

    Attributes:
        max_watchers: WatchStats streams open at once (each holds a worker thread); more get
            RESOURCE_EXHAUSTED.
        unary_workers: worker threads for everything else (on top of one per watcher).
        snapshot_interval_s: floor between two provider snapshots (SnapshotCache).
        max_receive_message_bytes: requests are a few hundred bytes; anything big is an attack.
        max_send_message_bytes: bounds a reply (ListRequests with ~10^5 requests is ~10 MiB).
    """

    max_watchers: int = 16
    unary_workers: int = 8
    snapshot_interval_s: float = DEFAULT_SNAPSHOT_INTERVAL_S
    max_receive_message_bytes: int = 64 << 10
    max_send_message_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        for name, lo in (("max_watchers", 1), ("unary_workers", 1),
                         ("max_receive_message_bytes", 1024), ("max_send_message_bytes", 1024)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}={value!r}: must be an integer >= {lo}")
        if not 0 <= self.snapshot_interval_s <= 10:
            raise ValueError(f"snapshot_interval_s={self.snapshot_interval_s}: allowed range is [0, 10]")


class ControlServer:
    """A started control server. `stop()` (or leaving a `with` block) stops it; idempotent."""

    def __init__(self, server: grpc.Server, service: NosaControlService,
                 health_servicer: health.HealthServicer, host: str, port: int) -> None:
        self._server = server
        self._service = service
        self._health = health_servicer
        self.host = host
        self.port = port
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def address(self) -> str:
        """"host:port" for grpc.insecure_channel / nosa-ctl --target."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def active_watchers(self) -> int:
        """Open WatchStats streams (returns to 0 once clients cancel)."""
        return self._service.active_watchers

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Report NOT_SERVING, end the WatchStats streams with OK, then let unary calls finish
        within `grace_s` seconds (None: cancel them at once) and release the port."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._health.enter_graceful_shutdown()
        self._service.close()
        self._server.stop(grace_s).wait()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server has stopped (True) or `timeout_s` ran out (False)."""
        return not self._server.wait_for_termination(timeout_s)  # grpc returns "timed out"

    def __enter__(self) -> "ControlServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_control_server(
    provider: ControlProvider,
    host: str = DEFAULT_HOST,
    port: int = 0,
    token: str | None = None,
    options: ServerOptions = ServerOptions(),
) -> ControlServer:
    """Start serving `provider` on host:port (port 0: an ephemeral port, see `.port`).

    Args:
        provider: the runtime side (snapshots, knobs).
        host: address to bind; 127.0.0.1 by default. "0.0.0.0" / "::" expose the knobs to the
            network: set a token and put a TLS proxy in front.
        port: TCP port, 0 for any free one.
        token: if set, every NosaControl call needs metadata `authorization: Bearer <token>`;
            Health and reflection stay open.
        options: thread and message-size limits.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port={port}: allowed range is [0, 65535]")
    cache = SnapshotCache(provider.snapshot, options.snapshot_interval_s)
    service = NosaControlService(provider, cache, options.max_watchers)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=options.max_watchers + options.unary_workers,
            thread_name_prefix="nosa-grpc",
        ),
        interceptors=[BearerTokenInterceptor(token)] if token else [],
        options=[
            ("grpc.max_receive_message_length", options.max_receive_message_bytes),
            ("grpc.max_send_message_length", options.max_send_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ],
    )
    pb_grpc.add_NosaControlServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:
        raise ControlServerError(f"cannot bind the control server to {address}: {err}") from err
    if bound == 0:
        raise ControlServerError(f"cannot bind the control server to {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return ControlServer(server, service, health_servicer, host, bound)
