"""Servers that several e2e modules start with identical flags, started once per session instead."""
from __future__ import annotations

import pytest

from servers import Server


@pytest.fixture(scope="session")
def fp32_server(tmp_path_factory) -> str:
    """The embedded SmolLM2 in float32: exact comparisons with a reference forward (test_parity,
    test_api_features) or with more ranks (test_tp), and batch-composition independence (bf16 matmuls
    round differently at different batch sizes, which can flip a sample)."""
    srv = Server(tmp_path_factory.mktemp("fp32"), dtype="float32")
    yield srv.url
    srv.stop()


@pytest.fixture(scope="session")
def tiny_fp32_server(tiny_llama, tmp_path_factory) -> Server:
    """The tiny random Llama (safetensors) in float32, default limits (capped by its 512-token context):
    test_parity, test_api_disconnect's stalled readers, test_tp's one-rank reference."""
    srv = Server(tmp_path_factory.mktemp("tiny-fp32"), dtype="float32", model_id=tiny_llama)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def smollm2_reference():
    """The embedded GGUF as transformers loads it (its own GGUF reader, not ours), in float32: the reference
    that test_parity and test_api_features compare the fp32 server with. Loaded once: tens of seconds."""
    import torch
    from transformers import AutoModelForCausalLM

    from sluice.modelfiles import resolve

    path = resolve(None).path
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
