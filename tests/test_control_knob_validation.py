"""Every invalid UpdateConfig gives INVALID_ARGUMENT naming the field and what is allowed, and
changes nothing: each test reads the config back (and checks nothing is queued)."""

from __future__ import annotations

import grpc
import pytest

from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.control.service import INVALID_FIELD_KEY
from test_control_helpers import served, served_idle, update_request  # noqa: F401 (fixtures)

MAX_HOST = 1 << 50

# (id, mask paths, knob values, field named, text the message must contain)
CASES = [
    ("slots_below_topk", ["gpu_slots"], dict(gpu_slots=10), "gpu_slots", "[64, 1024]"),
    ("slots_zero", ["gpu_slots"], dict(), "gpu_slots", "[64, 1024]"),
    ("slots_above_max", ["gpu_slots"], dict(gpu_slots=5000), "gpu_slots", "[64, 1024]"),
    ("mode_unspecified", ["transfer_mode"], dict(), "transfer_mode", "['zero_copy', 'copy_engine']"),
    ("mode_unknown_number", ["transfer_mode"], dict(transfer_mode=7), "transfer_mode", "zero_copy"),
    ("victim_unknown_number", ["victim_policy"], dict(victim_policy=9), "victim_policy", "'lru'"),
    ("host_capacity_too_big", ["host_capacity_bytes"], dict(host_capacity_bytes=MAX_HOST + 1),
     "host_capacity_bytes", f"[0, {MAX_HOST}]"),
    ("unknown_knob", ["gpu_slot"], dict(gpu_slots=128), "gpu_slot", "settable knobs are"),
    ("nested_path", ["gpu_slots.value"], dict(gpu_slots=128), "gpu_slots.value", "settable knobs are"),
    ("read_only_constant", ["topk_blocks"], dict(), "topk_blocks", "read-only NOSA constant"),
    ("read_only_prefixed", ["nosa.block_size"], dict(), "block_size", "read-only NOSA constant"),
    ("empty_mask", [], dict(gpu_slots=128), "update_mask", "update_mask is empty"),
    # one invalid knob rejects the whole update: the valid gpu_slots=128 must not apply either
    ("valid_plus_invalid", ["gpu_slots", "transfer_mode"], dict(gpu_slots=128), "transfer_mode",
     "allowed values"),
    ("valid_plus_read_only", ["gpu_slots", "kernel_size"], dict(gpu_slots=128), "kernel_size",
     "read-only"),
]


def _config(served) -> pb.GetConfigResponse:
    return served.call("GetConfig", pb.GetConfigRequest())


def _expect_invalid(served, request: pb.UpdateConfigRequest, field: str, text: str) -> None:
    before = _config(served)
    with pytest.raises(grpc.RpcError) as err:
        served.call("UpdateConfig", request)
    e = err.value
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.details() and text in e.details(), e.details()
    assert (INVALID_FIELD_KEY, field) in tuple(e.trailing_metadata())
    after = _config(served)
    assert after == before and not after.HasField("pending")
    assert served.provider.requested_knobs() == served.provider.knobs()


@pytest.mark.parametrize("paths, knobs, field, text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_knob_is_rejected_and_changes_nothing(served, paths, knobs, field, text):
    _expect_invalid(served, update_request(paths, **knobs), field, text)


@pytest.mark.parametrize("seconds", [-1, 31])
def test_apply_timeout_out_of_range_is_rejected(served, seconds):
    request = update_request(["gpu_slots"], gpu_slots=128)
    request.apply_timeout.seconds = seconds
    _expect_invalid(served, request, "apply_timeout", "[0s, 30s]")


@pytest.mark.parametrize("field_number, knob, allowed", [
    (1, "gpu_slots", "[64, 1024]"),
    (3, "prefetch", "true or false"),
    (2, "transfer_mode", "zero_copy"),
])
def test_knob_sent_with_wrong_wire_type_is_rejected(served, field_number, knob, allowed):
    """A string where the proto says integer/bool/enum: the parser parks it in the unknown
    fields (leaving the default), the server must reject it rather than apply the default."""
    payload = b"wrong"
    bad_knobs = bytes([field_number << 3 | 2, len(payload)]) + payload  # length-delimited
    raw = pb.UpdateConfigRequest()
    raw.update_mask.paths.append(knob)
    wire = bytes([1 << 3 | 2, len(bad_knobs)]) + bad_knobs + raw.SerializeToString()
    request = pb.UpdateConfigRequest.FromString(wire)
    _expect_invalid(served, request, knob, allowed)


def test_rejected_update_leaves_a_queued_one_alone(served_idle):
    """A bad update that arrives while a good one waits for the boundary does not drop it."""
    ok = update_request(["gpu_slots"], gpu_slots=200)
    ok.apply_timeout.FromSeconds(0)
    assert not served_idle.call("UpdateConfig", ok).applied
    with pytest.raises(grpc.RpcError) as err:
        served_idle.call("UpdateConfig", update_request(["prefetch", "gpu_slots"], gpu_slots=2))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert served_idle.provider.requested_knobs().gpu_slots == 200
    served_idle.provider.step()
    knobs = served_idle.provider.knobs()
    assert (knobs.gpu_slots, knobs.prefetch) == (200, False)
