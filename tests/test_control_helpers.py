"""Shared fixtures of the control-API tests: a real server on a loopback ephemeral port, a
SyntheticProvider stepping on a background thread, and a client stub. (No tests in this module;
the other test_control_* modules import the fixtures from it.)"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest

from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.pb import control_pb2_grpc as pb_grpc
from nosa_sglang.control.server import ControlServer, ServerOptions, start_control_server
from nosa_sglang.control.synthetic import StepLoop, SyntheticProvider

TOKEN = "test-token-0123"
STEP_PERIOD_S = 0.002


@dataclass
class Served:
    provider: SyntheticProvider
    server: ControlServer  # or a ControlProcess: the same surface
    channel: grpc.Channel
    stub: pb_grpc.NosaControlStub
    metadata: list[tuple[str, str]]

    def call(self, name: str, request: object, **kw: object) -> object:
        return getattr(self.stub, name)(request, metadata=self.metadata, timeout=10, **kw)


def serve(token: str | None = None, stepping: bool = True, options: ServerOptions = ServerOptions(),
          provider: SyntheticProvider | None = None, start=start_control_server, **start_kw) -> Iterator[Served]:
    """A server (`start`: start_control_server, or start_control_process) over `provider` (a fresh
    SyntheticProvider by default), stepping every STEP_PERIOD_S unless told not to, and a client."""
    provider = provider or SyntheticProvider()
    provider.step()  # counters start nonzero
    loop = StepLoop(provider.step, STEP_PERIOD_S)
    if stepping:
        loop.start()
    server = start(provider, port=0, token=token, options=options, **start_kw)
    channel = grpc.insecure_channel(server.address)
    md = [("authorization", f"Bearer {token}")] if token else []
    try:
        yield Served(provider, server, channel, pb_grpc.NosaControlStub(channel), md)
    finally:
        channel.close()
        server.stop(grace_s=1.0)
        if stepping:
            loop.stop()


@pytest.fixture
def served() -> Iterator[Served]:
    """Server without a token, provider stepping every 2 ms."""
    yield from serve()


@pytest.fixture
def served_idle() -> Iterator[Served]:
    """Server without a token, provider NOT stepping (tests drive step() themselves)."""
    yield from serve(stepping=False)


@pytest.fixture
def served_token() -> Iterator[Served]:
    yield from serve(token=TOKEN)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def update_request(paths: list[str], **knobs: object) -> pb.UpdateConfigRequest:
    request = pb.UpdateConfigRequest(knobs=pb.OffloadKnobs(**knobs))
    request.update_mask.paths.extend(paths)
    return request
