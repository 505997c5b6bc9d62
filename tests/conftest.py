"""Fixtures that start real Sluice servers: `sluice serve` as a subprocess (router + shard over gRPC).

`server` is the shared one (embedded SmolLM2, bf16). `start_server(**flags)` starts a private one
with other flags (underscores become dashes: max_concurrent_requests=2) and stops it afterwards.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sluice.health import wait_until_healthy
from sluice.process import stop

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, procs: list[subprocess.Popen], log_path: Path, timeout: float = 240.0) -> None:
    try:
        wait_until_healthy(url + "/health", procs, timeout)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"server {exc}:\n{log_path.read_text()[-4000:]}") from None


class Server:
    def __init__(self, tmp: Path, **flags) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.shard_address = f"unix://{tmp / f'shard-{self.port}.sock'}"
        argv = [sys.executable, "-m", "sluice", "serve", "--hostname", "127.0.0.1", "--port", str(self.port),
                "--shard-uds-path", self.shard_address.removeprefix("unix://")]
        for key, value in flags.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        self.log_path = tmp / f"server-{self.port}.log"
        self.log = open(self.log_path, "wb")
        env = dict(os.environ, SLUICE_CACHE=str(tmp.parent / "sluice-cache"), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 240.0) -> None:
        wait_healthy(self.url, [self.proc], self.log_path, timeout)

    def metrics(self) -> dict[str, float]:
        """Prometheus samples without labels or with them, as {'name{labels}': value}."""
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> int:
        code = stop(self.proc, 30)
        self.log.close()
        return code


@pytest.fixture(scope="session")
def server_handle(tmp_path_factory) -> Server:
    srv = Server(tmp_path_factory.mktemp("server"), max_concurrent_requests=16)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def server(server_handle: Server) -> str:
    return server_handle.url


@pytest.fixture
def start_server(tmp_path):
    started: list[Server] = []

    def start(**flags) -> str:
        srv = Server(tmp_path, **flags)
        started.append(srv)
        return srv.url

    start.servers = started  # tests that need the handle (metrics, stop) read it here
    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a Hugging Face folder (config.json, safetensors, tokenizer.json)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sluice.modelfiles import load_tokenizer, resolve

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = load_tokenizer(resolve(None))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    assert list(folder.glob("*.safetensors")) and (folder / "tokenizer.json").is_file()
    json.loads((folder / "config.json").read_text())
    return folder
