"""The control API over the real offload runtime: a server on loopback backed by RuntimeProvider over a
small NosaRuntime (CPU mode) that a decode loop steps with random k/v/c/q, as the reference model would."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch

from nosa_sglang.config import NosaConfig
from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.pb import control_pb2_grpc as pb_grpc
from nosa_sglang.control.runtime_provider import RuntimeProvider
from nosa_sglang.control.server import ControlServer, start_control_server
from nosa_sglang.control.service import INVALID_FIELD_KEY
from nosa_sglang.control.synthetic import StepLoop
from nosa_sglang.runtime import ModelShape, NosaRuntime, OffloadKnobs
from test_control_helpers import update_request, wait_until

NOSA = NosaConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, local_blocks=2,
                  query_blocks=5, topk_blocks=8)
SHAPE = ModelShape(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32)
PROMPT_TOKENS = 260  # 17 blocks > topk_blocks 8: selection is sparse, so there are misses
MAX_SEQ_LEN = 300  # the decoder restarts its request every ~40 steps
MAX_GPU_SLOTS = 16  # allocated; gpu_slots starts at topk_blocks


class RandomDecoder:
    """A decode loop for one request: random k/v/c/q per layer, then the step boundary; a request
    about to pass max_seq_len is ended and a new one begun (the runtime never runs past it)."""

    def __init__(self, runtime: NosaRuntime, seed: int) -> None:
        self.runtime = runtime
        self.gen = torch.Generator().manual_seed(seed)
        self.requests = 0
        self._begin()

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen)

    def _begin(self) -> None:
        self.requests += 1
        self.request_id = f"req-{self.requests}"
        L, H, d = SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim
        c = torch.rand((L, PROMPT_TOKENS, H), generator=self.gen)
        self.runtime.begin_request(self.request_id, self._randn(L, PROMPT_TOKENS, H, d),
                                   self._randn(L, PROMPT_TOKENS, H, d), c)

    def step(self) -> None:
        rt, ids = self.runtime, [self.request_id]
        if rt.seq_len(self.request_id) + 1 > rt.max_seq_len:
            rt.end_request(self.request_id)
            self._begin()
            ids = [self.request_id]
        H, d = SHAPE.num_kv_heads, SHAPE.head_dim
        for layer in range(SHAPE.num_layers):
            rt.append(layer, ids, self._randn(1, H, d), self._randn(1, H, d),
                      torch.rand((1, H), generator=self.gen))
            rt.attend(layer, ids, self._randn(1, SHAPE.num_q_heads, d))
        rt.step_boundary()


@dataclass
class RuntimeServed:
    runtime: NosaRuntime
    decoder: RandomDecoder
    server: ControlServer
    stub: pb_grpc.NosaControlStub

    def call(self, name: str, request: object, **kw: object) -> object:
        return getattr(self.stub, name)(request, timeout=10, **kw)


def _serve(stepping: bool) -> Iterator[RuntimeServed]:
    seed = int.from_bytes(os.urandom(2), "little")
    print(f"seed={seed}")
    runtime = NosaRuntime(SHAPE, NOSA, OffloadKnobs(gpu_slots=NOSA.topk_blocks), device="cpu",
                          host_capacity_bytes=4 << 20, max_requests=2, max_seq_len=MAX_SEQ_LEN,
                          max_gpu_slots=MAX_GPU_SLOTS)
    decoder = RandomDecoder(runtime, seed)
    decoder.step()  # counters start nonzero
    loop = StepLoop(decoder.step, period_s=0.001)
    if stepping:
        loop.start()
    server = start_control_server(RuntimeProvider(runtime), port=0)
    channel = grpc.insecure_channel(server.address)
    try:
        yield RuntimeServed(runtime, decoder, server, pb_grpc.NosaControlStub(channel))
    finally:
        channel.close()
        server.stop(grace_s=1.0)
        if stepping:
            loop.stop()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def stepping() -> Iterator[RuntimeServed]:
    """The runtime decoding on a background thread (the only thread that steps it)."""
    yield from _serve(stepping=True)


@pytest.fixture
def idle() -> Iterator[RuntimeServed]:
    """The runtime not stepping: the test thread steps it with `decoder.step()`."""
    yield from _serve(stepping=False)


def _lookups(stats: pb.Stats) -> int:
    return stats.totals.hits + stats.totals.misses


def test_get_stats_shows_hits_and_misses_moving_per_layer(stepping):
    first = stepping.call("GetStats", pb.GetStatsRequest()).stats
    assert wait_until(lambda: stepping.call("GetStats", pb.GetStatsRequest()).stats.steps >= first.steps + 20)
    later = stepping.call("GetStats", pb.GetStatsRequest()).stats
    assert later.totals.misses > first.totals.misses and later.totals.hits > first.totals.hits
    assert [layer.layer for layer in later.layers] == list(range(SHAPE.num_layers))
    assert sum(layer.counters.hits + layer.counters.misses for layer in later.layers) == _lookups(later)
    assert all(layer.counters.misses > 0 and layer.counters.bytes_h2d > 0 for layer in later.layers)
    assert later.running_requests == 1 and later.mode == pb.RUNTIME_MODE_OFFLOAD and later.device == "cpu"
    assert 0 < later.resident_blocks <= later.gpu_slot_capacity and later.host_blocks_used > 0


def test_update_gpu_slots_applies_at_the_next_step_boundary(idle):
    request = update_request(["gpu_slots"], gpu_slots=MAX_GPU_SLOTS)
    request.apply_timeout.SetInParent()  # 0 s: do not wait for a boundary
    reply = idle.call("UpdateConfig", request)
    assert not reply.applied and reply.pending.gpu_slots == MAX_GPU_SLOTS  # no boundary yet: queued
    config = idle.call("GetConfig", pb.GetConfigRequest())
    assert config.config.knobs.gpu_slots == NOSA.topk_blocks and config.pending.gpu_slots == MAX_GPU_SLOTS
    assert idle.runtime.slots.active == NOSA.topk_blocks
    idle.decoder.step()
    config = idle.call("GetConfig", pb.GetConfigRequest())
    assert config.config.knobs.gpu_slots == MAX_GPU_SLOTS and not config.HasField("pending")
    assert idle.runtime.slots.active == MAX_GPU_SLOTS


def test_update_gpu_slots_is_applied_by_the_decode_loop_within_the_call(stepping):
    reply = stepping.call("UpdateConfig", update_request(["gpu_slots"], gpu_slots=12))
    assert reply.applied and reply.config.knobs.gpu_slots == 12 and not reply.HasField("pending")
    assert stepping.call("GetConfig", pb.GetConfigRequest()).config.knobs.gpu_slots == 12
    assert wait_until(lambda: stepping.runtime.slots.active == 12)


@pytest.mark.parametrize("slots", [MAX_GPU_SLOTS + 1, 1024])
def test_gpu_slots_above_the_allocation_is_invalid_argument_and_changes_nothing(stepping, slots):
    before = stepping.call("GetConfig", pb.GetConfigRequest())
    with pytest.raises(grpc.RpcError) as err:
        stepping.call("UpdateConfig", update_request(["gpu_slots", "prefetch"], gpu_slots=slots, prefetch=True))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"gpu_slots={slots}" in err.value.details()
    assert f"[{NOSA.topk_blocks}, {MAX_GPU_SLOTS}]" in err.value.details()
    assert (INVALID_FIELD_KEY, "gpu_slots") in tuple(err.value.trailing_metadata())
    after = stepping.call("GetConfig", pb.GetConfigRequest())
    assert after == before and not after.HasField("pending")
    assert after.config.limits.max_gpu_slots == MAX_GPU_SLOTS  # the allocation, not the model's bound
    assert stepping.runtime.requested_knobs() == OffloadKnobs(gpu_slots=NOSA.topk_blocks)


def test_list_requests_lists_the_running_request(stepping):
    assert wait_until(lambda: stepping.runtime.snapshot().requests[0].seq_len_tokens > PROMPT_TOKENS)
    (request,) = stepping.call("ListRequests", pb.ListRequestsRequest()).requests
    assert request.request_id.startswith("req-")
    assert PROMPT_TOKENS < request.seq_len_tokens <= MAX_SEQ_LEN
    assert request.host_blocks == NOSA.num_blocks(request.seq_len_tokens)
    assert request.resident_blocks > 0 and request.hits + request.misses > 0


def test_reset_stats_zeroes_the_runtime_counters(idle):
    for _ in range(3):
        idle.decoder.step()
    assert _lookups(idle.call("GetStats", pb.GetStatsRequest()).stats) > 0
    epoch = idle.call("ResetStats", pb.ResetStatsRequest()).stats_epoch
    stats = idle.call("GetStats", pb.GetStatsRequest()).stats
    assert stats.stats_epoch == epoch and stats.steps == 0 and _lookups(stats) == 0
    assert stats.running_requests == 1 and stats.resident_blocks > 0  # occupancy is kept
    idle.decoder.step()
    assert wait_until(lambda: _lookups(idle.call("GetStats", pb.GetStatsRequest()).stats) > 0)
