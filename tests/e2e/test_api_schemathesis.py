"""An outside fuzzer against the served /openapi.json: schemathesis with every check it has, a bounded number
of cases per operation, on the tiny model with small token limits (so every generation is short). It finds
undeclared statuses, content types and headers, answers or stream events that do not match their schema,
invalid bodies accepted, schema-valid ones refused for a reason the schema could state, 5xx, and dropped
connections. Its settings, and why, are in schemathesis.toml beside this file."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from servers import Server

HERE = Path(__file__).parent
REQUEST_TIMEOUT_S = "120"  # a hang detector; the response-time check gets the same, so it measures nothing


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    # Small budgets keep the few hundred generations short (the rest are refusals, which cost little).
    srv = Server(tmp_path_factory.mktemp("schemathesis"), model_id=tiny_llama, dtype="float32",
                 max_input_tokens=8, max_total_tokens=12)
    yield srv
    srv.stop()


@pytest.mark.slow  # ~30 s on 2 cores: ~2,400 requests, a few hundred of them generations
def test_schemathesis_finds_nothing(tiny, tmp_path):
    cli = Path(sys.executable).parent / "schemathesis"
    out = subprocess.run([cli, "--config-file", HERE / "schemathesis.toml", "--no-color", "run",
                          tiny.url + "/openapi.json", "--checks", "all", "--max-examples", "10",
                          "--generation-deterministic", "--workers", "1", "--request-timeout", REQUEST_TIMEOUT_S,
                          "--max-response-time", REQUEST_TIMEOUT_S],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-12000:] + out.stderr[-3000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", out.stdout)
    assert cases and cases[1] == cases[2] and int(cases[1]) > 100, out.stdout[-3000:]
