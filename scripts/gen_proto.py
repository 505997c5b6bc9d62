"""Regenerate the gRPC stubs in sluice/pb/ from proto/sluice/shard.proto.

Run from anywhere: `python scripts/gen_proto.py [OUT_DIR]` (OUT_DIR defaults to the repo root,
the stale-stub test writes to a temp dir and compares).
"""
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path) -> None:
    proto_dir = ROOT / "proto"
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main([
        "grpc_tools.protoc",
        # Mapped so the stubs live in the package sluice.pb (and import each other from there).
        f"-Isluice/pb={proto_dir / 'sluice'}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "sluice/pb/shard.proto",
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
