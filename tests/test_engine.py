"""The engine on a real (tiny, random) Llama: batching, chunked prefill, preemption, seeds, cancels."""
from __future__ import annotations

import threading

import pytest
import torch

from shard.engine import Engine, EngineConfig, Sequence
from shard.models.loader import load_model
from shard.sampler import SamplingParams
from sluice.modelfiles import ModelSource

PROMPTS = [[5, 17, 300, 42, 8, 99, 1000, 7], [11, 12, 13], [400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412], [2000]]


@pytest.fixture(scope="module")
def model(tiny_llama):
    return load_model(ModelSource("tiny", tiny_llama), torch.float32)


def run(model, prompts, config: EngineConfig, params=None, max_new=20):
    engine = Engine(model, config, eos_token_ids=[])
    engine.start()
    outs = {i: [] for i in range(len(prompts))}
    finished = threading.Semaphore(0)

    def listener(i):
        def on_event(kind, value):
            assert kind == "token", value
            outs[i].append(value.token_id)
            if value.finish:
                finished.release()
        return on_event

    for i, ids in enumerate(prompts):
        p = params(i) if params else SamplingParams()
        engine.submit(Sequence(str(i), ids, p, max_new, listener(i)))
    for _ in prompts:
        assert finished.acquire(timeout=120)
    free = len(engine.blocks.free_blocks)
    engine.stop()
    assert free == engine.blocks.num_blocks, "every block is returned once all sequences finish"
    return [outs[i] for i in range(len(prompts))], engine


def test_batched_equals_one_at_a_time(model):
    together, _ = run(model, PROMPTS, EngineConfig(kv_cache_tokens=1024))
    alone = [run(model, [p], EngineConfig(kv_cache_tokens=1024))[0][0] for p in PROMPTS]
    assert together == alone
    assert all(len(o) == 20 for o in together)


def test_chunked_prefill_and_preemption_keep_outputs(model):
    reference, _ = run(model, PROMPTS, EngineConfig(kv_cache_tokens=1024))
    chunked, eng = run(model, PROMPTS, EngineConfig(kv_cache_tokens=1024, max_batch_tokens=4))
    assert chunked == reference
    # 6 blocks of 8 tokens cannot hold all four sequences at once: the newest gets preempted and recomputed.
    tight, eng = run(model, PROMPTS, EngineConfig(kv_cache_tokens=48, block_size=8))
    assert tight == reference
    assert eng.scheduler.preemptions > 0


def test_seed_reproducible_and_batch_independent(model):
    def seeded(seed):
        return lambda i: SamplingParams(do_sample=True, temperature=1.0, top_k=50, top_p=0.9, seed=seed + i)

    a, _ = run(model, PROMPTS, EngineConfig(kv_cache_tokens=1024), params=seeded(1))
    b, _ = run(model, PROMPTS, EngineConfig(kv_cache_tokens=1024), params=seeded(1))
    c, _ = run(model, PROMPTS, EngineConfig(kv_cache_tokens=1024), params=seeded(100))
    solo, _ = run(model, [PROMPTS[0]], EngineConfig(kv_cache_tokens=1024), params=seeded(1))
    assert a == b
    assert a != c
    assert solo[0] == a[0]


def test_cancel_frees_blocks_before_next_step(model):
    engine = Engine(model, EngineConfig(kv_cache_tokens=1024), eos_token_ids=[])
    got_token = threading.Event()
    seq = Sequence("x", PROMPTS[0], SamplingParams(), 10_000, lambda kind, value: got_token.set())
    engine.start()
    engine.submit(seq)
    assert got_token.wait(60)
    engine.cancel(seq)
    for _ in range(2000):
        if not seq.blocks and not engine.scheduler.running:
            break
        threading.Event().wait(0.01)
    engine.stop()
    assert seq.blocks == [] and engine.scheduler.running == []
    assert len(engine.blocks.free_blocks) == engine.blocks.num_blocks
    assert seq.num_generated < 10_000


def test_prompt_too_long_is_refused(model):
    engine = Engine(model, EngineConfig(kv_cache_tokens=64, block_size=16), eos_token_ids=[])
    with pytest.raises(ValueError):
        engine.submit(Sequence("x", list(range(100)), SamplingParams(), 5, lambda *a: None))


def test_shared_prefix_reuses_blocks_and_keeps_outputs(model):
    system = list(range(100, 150))  # 50 tokens: three full blocks of 16
    prompts = [system + [7, 8, 9], system + [300, 301], system + [7, 8, 9]]
    fresh = [run(model, [p], EngineConfig(kv_cache_tokens=1024))[0][0] for p in prompts]

    engine = Engine(model, EngineConfig(kv_cache_tokens=1024), eos_token_ids=[])
    engine.start()
    outs = []
    for p in prompts:  # one after another: each finds the blocks the earlier ones left behind
        got, done = [], threading.Event()

        def on_event(kind, value, got=got, done=done):
            got.append(value.token_id)
            if value.finish:
                done.set()

        engine.submit(Sequence("p", p, SamplingParams(), 20, on_event))
        assert done.wait(120)
        outs.append(got)
    engine.stop()
    assert outs == fresh
    # The 2nd and 3rd prompts skip the shared 48 tokens; the 3rd repeats the 1st, whose later
    # blocks (prompt tail and generated tokens) are named too.
    assert engine.blocks.hit_tokens >= 2 * 48
    assert len(engine.blocks.free_blocks) == engine.blocks.num_blocks
