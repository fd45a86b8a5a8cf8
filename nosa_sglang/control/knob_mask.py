"""Turn an UpdateConfig request (OffloadKnobs message + FieldMask) into a validated knob change.

Every rejection is a KnobError naming the offending field and what is allowed, raised before
anything is queued: the service maps it to INVALID_ARGUMENT and the config in force stays as it was.
Ranges themselves are checked by `OffloadKnobs.with_changes` (the one place they are defined).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from google.protobuf import unknown_fields

from nosa_sglang.config import NosaConfig
from nosa_sglang.control.convert import MAX_HOST_CAPACITY_BYTES, enum_name
from nosa_sglang.control.pb import control_pb2 as pb
from nosa_sglang.runtime.knobs import (
    MAX_GPU_SLOTS,
    TRANSFER_MODES,
    VICTIM_POLICIES,
    KnobError,
    OffloadKnobs,
)

KNOB_FIELDS = tuple(f.name for f in dataclasses.fields(OffloadKnobs))
NOSA_FIELDS = tuple(f.name for f in dataclasses.fields(NosaConfig))
#: enum knobs: proto enum, its value prefix, the allowed names
_ENUMS = {
    "transfer_mode": (pb.TransferMode, "TRANSFER_MODE", TRANSFER_MODES),
    "victim_policy": (pb.VictimPolicy, "VICTIM_POLICY", VICTIM_POLICIES),
}


def allowed_values(knob: str, nosa: NosaConfig) -> str:
    """What `knob` accepts, for error messages."""
    if knob == "gpu_slots":
        return f"an integer in [{nosa.topk_blocks}, {MAX_GPU_SLOTS}]"
    if knob == "host_capacity_bytes":
        return f"an integer in [0, {MAX_HOST_CAPACITY_BYTES}]"
    if knob in _ENUMS:
        return f"one of {list(_ENUMS[knob][2])}"
    return "true or false"


def changes_from_mask(knobs: pb.OffloadKnobs, paths: Sequence[str], nosa: NosaConfig) -> dict[str, Any]:
    """The knob values named by `paths`, as OffloadKnobs field values (not yet range-checked).

    Raises:
        KnobError: empty mask, unknown path, read-only NOSA constant, a value sent with the wrong
            wire type (protobuf parks it in the unknown fields), or an enum value that is
            UNSPECIFIED or unknown to this server.
    """
    # NOTE: a field sent with the wrong wire type is not an error to the protobuf parser: the field
    # keeps its default and the bytes land in the unknown fields; catch it instead of using 0.
    wrong_type = {f.field_number for f in unknown_fields.UnknownFieldSet(knobs)}
    if not paths:
        raise KnobError(
            "update_mask", f"update_mask is empty: name the knobs to change, of {list(KNOB_FIELDS)}"
        )
    changes: dict[str, Any] = {}
    for raw in paths:
        path = raw.removeprefix("knobs.")
        if path in NOSA_FIELDS or path.startswith("nosa."):
            name = path.removeprefix("nosa.")
            raise KnobError(
                name,
                f"{name} is a read-only NOSA constant (part of the model); "
                f"settable knobs are {list(KNOB_FIELDS)}",
            )
        if path not in KNOB_FIELDS:
            raise KnobError(path, f"unknown knob {raw!r}; settable knobs are {list(KNOB_FIELDS)}")
        if pb.OffloadKnobs.DESCRIPTOR.fields_by_name[path].number in wrong_type:
            raise KnobError(path, f"{path}: value has the wrong type; allowed: {allowed_values(path, nosa)}")
        value = getattr(knobs, path)
        if path in _ENUMS:
            enum, prefix, allowed = _ENUMS[path]
            name = enum_name(enum, prefix, value)
            if name is None or name not in allowed:
                raise KnobError(
                    path,
                    f"{path}={value} is not a valid value; allowed values are {list(allowed)} "
                    f"({', '.join(f'{prefix}_{a.upper()}' for a in allowed)})",
                )
            value = name
        changes[path] = value
    return changes


def apply_mask(
    base: OffloadKnobs, knobs: pb.OffloadKnobs, paths: Sequence[str], nosa: NosaConfig
) -> OffloadKnobs:
    """`base` with the masked fields of `knobs`, validated against the model; `base` is unchanged."""
    changes = changes_from_mask(knobs, paths, nosa)
    return base.with_changes(changes, topk_blocks=nosa.topk_blocks)
