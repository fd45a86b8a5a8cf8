"""Bearer-token check for the NosaControl service (a gRPC server interceptor).

Only methods under `/nosa.v1.NosaControl/` are guarded: grpc.health.v1.Health and server reflection
stay open, so load balancers and `grpcurl list` work without the secret (they reveal the API's shape
and liveness, never stats or knobs). The token is compared in constant time (both sides hashed first,
so not even its length leaks). The server holds no TLS: keep it on loopback or behind a TLS proxy
when a token matters.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import grpc

PROTECTED_PREFIX = "/nosa.v1.NosaControl/"
_SCHEME = "bearer"
_DENIED = "missing or invalid token: send metadata 'authorization: Bearer <token>'"


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects NosaControl calls without `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str, protected_prefix: str = PROTECTED_PREFIX) -> None:
        if not token:
            raise ValueError("token: must be a non-empty string (or pass no token to disable auth)")
        self._expected = _digest(token)
        self._prefix = protected_prefix

    def authorized(self, metadata: Any) -> bool:
        """True when `metadata` carries the right bearer token (scheme case-insensitive)."""
        for key, value in metadata or ():
            if key != "authorization" or not isinstance(value, str):
                continue
            scheme, _, presented = value.strip().partition(" ")
            if scheme.lower() == _SCHEME and hmac.compare_digest(
                _digest(presented.strip()), self._expected
            ):
                return True
        return False

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        if self.authorized(handler_call_details.invocation_metadata):
            return handler
        return _denying(handler)


def _abort(request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary/stream) as `handler` that only aborts."""
    kwargs = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_abort, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(_abort, **kwargs)
