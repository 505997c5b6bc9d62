"""Fixtures shared by every tier. `server` is the shared `sluice serve` subprocess (embedded SmolLM2,
bf16); `start_server(**flags)` starts a private one with other flags (underscores become dashes:
max_concurrent_requests=2) and stops it afterwards; `tiny_llama` is a tiny random Hugging Face folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from servers import Server

# Servers the tests start serve eagerly: the default background compile would spend minutes of the
# two CI cores per server for speed no test measures. tests/engine/test_compile.py covers the compile.
os.environ.setdefault("COMPILE", "0")

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
