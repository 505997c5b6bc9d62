"""The committed gRPC stubs are exactly what grpcio-tools makes from proto/ today."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)], check=True)
    for name in ("shard_pb2.py", "shard_pb2.pyi", "shard_pb2_grpc.py"):
        fresh = (tmp_path / "sluice" / "pb" / name).read_text()
        committed = (ROOT / "sluice" / "pb" / name).read_text()
        assert fresh == committed, f"sluice/pb/{name} is stale: run `python scripts/gen_proto.py`"
