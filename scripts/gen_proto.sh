#!/usr/bin/env bash
# Regenerate the Python stubs of proto/nosa/v1/control.proto into nosa_sglang/control/pb/ (or into
# the folder given as $1, which tests/test_control_codegen.py uses to check the committed stubs).
#
# Uses the pinned grpcio-tools (requirements/cpu-dev.txt) of $PYTHON (default: .venv/bin/python), then
# makes three deterministic edits so the stubs import on other machines' grpcio/protobuf too:
#   1. imports become package-relative (`from . import control_pb2`), and the message classes'
#      module name becomes nosa_sglang.control.pb.control_pb2 (the file is not a top-level `nosa`);
#   2. protoc's protobuf runtime-version guard is dropped: it refuses any runtime older than the
#      generator's (6.31.1 for grpcio-tools 1.76.0) although this builder-style gencode works on
#      protobuf >= 4.25 (tested); nosa_sglang/control/pb/__init__.py checks the real minimum instead;
#   3. grpc's generated-version guard (grpcio >= 1.76.0) is dropped for the same reason; the stubs
#      need grpcio >= 1.64 (registered method handlers), also checked in pb/__init__.py.
# Each edit asserts that it matched, so a grpcio-tools upgrade that changes the output fails here.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PY=${PYTHON:-$root/.venv/bin/python}
out=${1:-$root/nosa_sglang/control/pb}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$PY" -m grpc_tools.protoc -I proto \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  proto/nosa/v1/control.proto

"$PY" - "$tmp/nosa/v1" "$out" <<'PY'
import pathlib
import re
import sys

src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
MODULE = "nosa_sglang.control.pb.control_pb2"


def edit(text: str, pattern: str, repl: str, what: str, flags: int = 0) -> str:
    new, n = re.subn(pattern, repl, text, flags=flags)
    if n != 1:
        sys.exit(f"gen_proto.sh: edit '{what}' matched {n} times (expected 1): generator output changed")
    return new


pb2 = (src / "control_pb2.py").read_text()
pb2 = edit(pb2, r"from google\.protobuf import runtime_version as _runtime_version\n", "",
           "drop runtime_version import")
pb2 = edit(pb2, r"_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:    .*\n)+?\)\n",
           "# (runtime-version guard removed by scripts/gen_proto.sh; see pb/__init__.py)\n",
           "drop runtime-version guard")
pb2 = edit(pb2, r"'nosa\.v1\.control_pb2'", f"'{MODULE}'", "module name")
(dst / "control_pb2.py").write_text(pb2)

grpc_py = (src / "control_pb2_grpc.py").read_text()
grpc_py = edit(grpc_py, r"from nosa\.v1 import control_pb2 as", "from . import control_pb2 as",
               "relative import")
grpc_py = edit(grpc_py, r"GRPC_GENERATED_VERSION = .*?\n\n\nclass ",
               "# (grpcio generated-version guard removed by scripts/gen_proto.sh; see pb/__init__.py)"
               "\n\n\nclass ", "drop grpc version guard", flags=re.S)
(dst / "control_pb2_grpc.py").write_text(grpc_py)

pyi = (src / "control_pb2.pyi").read_text()
(dst / "control_pb2.pyi").write_text(pyi)
print(f"gen_proto.sh: wrote control_pb2.py, control_pb2.pyi, control_pb2_grpc.py to {dst}")
PY
