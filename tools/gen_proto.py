"""Generate the Python protobuf and gRPC modules from proto/ into splitvault/.

Generated code is checked in so that grpcurl users, IDEs and a fresh clone
see it; tests/test_proto_drift.py regenerates into a temporary folder and
fails if the checked-in copy differs. Never edit splitvault/v1/*_pb2*.py.
"""
from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc
import grpc_tools

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_FILES = ("common.proto", "matcher.proto", "shareholder.proto", "admin.proto", "identify.proto")


def generate(out_dir: pathlib.Path) -> None:
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
    ] + [str(ROOT / "proto" / "splitvault" / "v1" / name) for name in PROTO_FILES]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in (out_dir / "splitvault", out_dir / "splitvault" / "v1"):
        init = package / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated protobuf modules (package splitvault.v1). Do not edit."""\n')


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
