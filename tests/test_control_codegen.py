"""The committed stubs are exactly what scripts/gen_proto.sh makes from proto/nosa/v1/control.proto,
and they import as a package (no top-level `nosa` module), with a clear error on too-old stacks."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from nosa_sglang.control import pb as stubs

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATED = ("control_pb2.py", "control_pb2.pyi", "control_pb2_grpc.py")


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpcio-tools not installed (requirements/cpu-dev.txt pins it)")
def test_committed_stubs_match_the_proto(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    committed = ROOT / "nosa_sglang" / "control" / "pb"
    stale = [name for name in GENERATED
             if (tmp_path / name).read_text() != (committed / name).read_text()]
    assert not stale, f"{stale} differ from proto/nosa/v1/control.proto: run scripts/gen_proto.sh"


def test_stubs_are_package_relative():
    assert stubs.control_pb2.Stats.__module__ == "nosa_sglang.control.pb.control_pb2"
    assert stubs.control_pb2.DESCRIPTOR.name == "nosa/v1/control.proto"
    for name in GENERATED[::2]:
        text = (ROOT / "nosa_sglang" / "control" / "pb" / name).read_text()
        assert "from nosa.v1" not in text and "import nosa." not in text


@pytest.mark.parametrize("found, ok", [("4.25.9", True), ("7.36.2", True), ("4.24.4", False),
                                       ("3.20.3", False)])
def test_protobuf_minimum_is_enforced_with_a_clear_error(found, ok):
    if ok:
        stubs._require("protobuf", found, stubs.MIN_PROTOBUF)
    else:
        with pytest.raises(ImportError, match=r"protobuf>=4\.25 \(found"):
            stubs._require("protobuf", found, stubs.MIN_PROTOBUF)


def test_grpcio_minimum_is_enforced_with_a_clear_error():
    stubs._require("grpcio", "1.64.0", stubs.MIN_GRPCIO)
    with pytest.raises(ImportError, match=r"grpcio>=1\.64 \(found 1\.63\.2\)"):
        stubs._require("grpcio", "1.63.2", stubs.MIN_GRPCIO)
