"""An outside fuzzer against the served /openapi.json: schemathesis, every check it has, a bounded number
of cases per operation, on the tiny model with small token limits (so every generation is short). It finds
undeclared statuses and content types, answers that do not match their schema, schema-valid bodies refused
or invalid ones accepted, 5xx, and dropped connections."""
import subprocess
import sys
from pathlib import Path

import pytest

from servers import Server


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("schemathesis"), model_id=tiny_llama, max_input_tokens=64,
                 max_total_tokens=96)
    yield srv
    srv.stop()


def test_schemathesis_finds_nothing(tiny, tmp_path):
    cli = Path(sys.executable).parent / "schemathesis"
    out = subprocess.run([cli, "run", tiny.url + "/openapi.json", "--checks", "all", "--max-examples", "10",
                          "--generation-deterministic", "--generation-database", "none", "--no-color",
                          "--request-timeout", "120"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-12000:] + out.stderr[-3000:]
    assert "No issues found" in out.stdout or "passed" in out.stdout, out.stdout[-3000:]
