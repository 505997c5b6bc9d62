"""The in-process router tier's fixtures (tests/inprocess.py): real shards over real gRPC in this process,
each started once per session, and `smol`, a router on the embedded SmolLM2 with the flags of the e2e
`server` (max_concurrent_requests=16). Modules that need other router flags open their own router on the
same shard (module-scoped), which costs a tokenizer load, not a model load."""
from __future__ import annotations

import pytest

from inprocess import EventLoopThread, InProcessRouter, InProcessShard


@pytest.fixture(scope="session")
def router_loop():
    loop = EventLoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def smol_shard(tmp_path_factory):
    """The embedded SmolLM2 (bf16), as `sluice serve` runs it: for tests that need text a model writes."""
    shard = InProcessShard(tmp_path_factory.mktemp("smol-shard"), max_batch_total_tokens=8192)
    yield shard
    shard.stop()


@pytest.fixture(scope="session")
def tiny_shard(tiny_llama, tmp_path_factory):
    """The tiny random Llama: for rules and fuzzing, where what the text says does not matter."""
    shard = InProcessShard(tmp_path_factory.mktemp("tiny-shard"), str(tiny_llama))
    yield shard
    shard.stop()


@pytest.fixture(scope="session")
def smol(router_loop, smol_shard):
    router = InProcessRouter(router_loop, smol_shard, max_concurrent_requests=16)
    yield router
    router.close()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama):
    """The tiny model's tokenizer, for the scripted-pool tests (tests/scripted_pool.py)."""
    from sluice.modelfiles import load_tokenizer, resolve

    return load_tokenizer(resolve(str(tiny_llama)))
