"""An outside fuzzer against the served /openapi.json: schemathesis with every check it has, a bounded number
of cases per operation, on the tiny model with small token limits (so every generation is short). It finds
undeclared statuses, content types and headers, answers or stream events that do not match their schema,
invalid bodies accepted, schema-valid ones refused for a reason the schema could state, 5xx, and dropped
connections. Its settings, and why, are in schemathesis.toml beside this file."""
import subprocess
import sys
from pathlib import Path

import pytest

from servers import Server

HERE = Path(__file__).parent
REQUEST_TIMEOUT_S = "120"  # a hang detector; the response-time check gets the same, so it measures nothing


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("schemathesis"), model_id=tiny_llama, dtype="float32",
                 max_input_tokens=16, max_total_tokens=24)
    yield srv
    srv.stop()


def test_schemathesis_finds_nothing(tiny, tmp_path):
    cli = Path(sys.executable).parent / "schemathesis"
    out = subprocess.run([cli, "--config-file", HERE / "schemathesis.toml", "--no-color", "run",
                          tiny.url + "/openapi.json", "--checks", "all", "--max-examples", "10",
                          "--generation-deterministic", "--workers", "4", "--request-timeout", REQUEST_TIMEOUT_S,
                          "--max-response-time", REQUEST_TIMEOUT_S],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-12000:] + out.stderr[-3000:]
    assert "No issues found" in out.stdout, out.stdout[-3000:]
    assert " 0 passed" not in out.stdout
