"""The engine on a real (tiny, random) Llama: batching, chunked prefill, preemption, seeds, cancels."""
from __future__ import annotations

import math
import re
import threading

import pytest
import torch

from shard.engine import Draining, Engine, EngineConfig
from shard.models.loader import load_model
from shard.sampler import SamplingParams
from shard.sequence import Sequence
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
    together, _ = run(model, PROMPTS, EngineConfig(max_batch_total_tokens=1024))
    alone = [run(model, [p], EngineConfig(max_batch_total_tokens=1024))[0][0] for p in PROMPTS]
    assert together == alone
    assert all(len(o) == 20 for o in together)


def test_chunked_prefill_and_preemption_keep_outputs(model):
    reference, _ = run(model, PROMPTS, EngineConfig(max_batch_total_tokens=1024))
    chunked, eng = run(model, PROMPTS, EngineConfig(max_batch_total_tokens=1024, max_batch_prefill_tokens=4))
    assert chunked == reference
    # 6 blocks of 8 tokens cannot hold all four sequences at once: the newest gets preempted and recomputed.
    tight, eng = run(model, PROMPTS, EngineConfig(max_batch_total_tokens=48, block_size=8))
    assert tight == reference
    assert eng.scheduler.preemptions > 0


def test_long_prompt_greedy_matches_transformers(model, tiny_llama):
    """A prompt across many KV blocks and prefill chunks, its chunks sharing steps with a short
    sequence that decodes meanwhile: greedy ids equal transformers' (a full forward per token) in float32."""
    from transformers import AutoModelForCausalLM

    reference_model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()

    def reference(ids: list[int], n: int) -> list[int]:
        ids = list(ids)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(reference_model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[-n:]

    long = [(37 * k) % 5000 + 10 for k in range(300)]  # 38 blocks of 8, 5 chunks of 64
    config = EngineConfig(max_batch_total_tokens=1024, block_size=8, max_batch_prefill_tokens=64)
    outs, _ = run(model, [PROMPTS[0], long], config, max_new=12)
    assert outs == [reference(PROMPTS[0], 12), reference(long, 12)]


def test_seed_reproducible_and_batch_independent(model):
    def seeded(seed):
        return lambda i: SamplingParams(do_sample=True, temperature=1.0, top_k=50, top_p=0.9, seed=seed + i)

    a, _ = run(model, PROMPTS, EngineConfig(max_batch_total_tokens=1024), params=seeded(1))
    b, _ = run(model, PROMPTS, EngineConfig(max_batch_total_tokens=1024), params=seeded(1))
    c, _ = run(model, PROMPTS, EngineConfig(max_batch_total_tokens=1024), params=seeded(100))
    solo, _ = run(model, [PROMPTS[0]], EngineConfig(max_batch_total_tokens=1024), params=seeded(1))
    assert a == b
    assert a != c
    assert solo[0] == a[0]


def test_cancel_frees_blocks_before_next_step(model):
    engine = Engine(model, EngineConfig(max_batch_total_tokens=1024), eos_token_ids=[])
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


def _drained(model, max_new: int, timeout_s: float) -> list:
    """Events of one sequence whose engine is told to drain once its first token is out."""
    engine = Engine(model, EngineConfig(max_batch_total_tokens=1024), eos_token_ids=[])
    events, first = [], threading.Event()
    engine.start()
    engine.submit(Sequence("x", PROMPTS[0], SamplingParams(), max_new, lambda *e: (events.append(e), first.set())))
    assert first.wait(60)
    engine.drain(timeout_s)
    assert not engine.alive()  # /health, and so the router and probes, see it at once
    with pytest.raises(Draining):
        engine.submit(Sequence("late", PROMPTS[2], SamplingParams(), 5, lambda *a: None))
    engine._thread.join(timeout=120)
    assert not engine._thread.is_alive(), "the loop ends by itself after the drain"
    assert engine.failed is None  # a drain is not a broken tensor-parallel group
    return events


def test_drain_lets_work_in_flight_finish_and_refuses_new(model):
    events = _drained(model, 30, timeout_s=600)
    assert [k for k, _ in events] == ["token"] * 30 and events[-1][1].finish == "length"


def test_drain_fails_what_is_left_at_the_deadline(model):
    events = _drained(model, 10**9, timeout_s=0)
    assert [k for k, _ in events[:-1]] == ["token"] * (len(events) - 1)
    assert events[-1][0] == "error" and "shutting down" in events[-1][1]


def test_prompt_too_long_is_refused(model):
    engine = Engine(model, EngineConfig(max_batch_total_tokens=64, block_size=16), eos_token_ids=[])
    with pytest.raises(ValueError):
        engine.submit(Sequence("x", list(range(100)), SamplingParams(), 5, lambda *a: None))


def test_shared_prefix_reuses_blocks_and_keeps_outputs(model):
    system = list(range(100, 150))  # 50 tokens: three full blocks of 16
    prompts = [system + [7, 8, 9], system + [300, 301], system + [7, 8, 9]]
    fresh = [run(model, [p], EngineConfig(max_batch_total_tokens=1024))[0][0] for p in prompts]

    engine = Engine(model, EngineConfig(max_batch_total_tokens=1024), eos_token_ids=[])
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



def prompt_logprobs(engine: Engine, prompt: list[int]) -> list[float]:
    done = threading.Event()
    seq = Sequence("p", prompt, SamplingParams(), 1, lambda kind, value: done.set(), prompt_logprobs=True)
    engine.submit(seq)
    assert done.wait(120)
    return seq.prefill


def test_prompt_logprobs_survive_chunks_and_cached_prefixes(model):
    """Prompt logprobs are the same whether the prompt is prefilled at once, in chunks of 5, or after an
    earlier request left its leading blocks in the prefix cache (those are recomputed, not skipped)."""
    prompt = list(range(100, 140))  # 40 tokens: two full blocks of 16
    whole_engine = Engine(model, EngineConfig(max_batch_total_tokens=1024), eos_token_ids=[])
    whole_engine.start()
    whole = prompt_logprobs(whole_engine, prompt)
    whole_engine.stop()
    engine = Engine(model, EngineConfig(max_batch_total_tokens=1024, max_batch_prefill_tokens=5), eos_token_ids=[])
    engine.start()
    chunked = prompt_logprobs(engine, prompt)
    again = prompt_logprobs(engine, prompt)
    engine.stop()
    assert len(whole) == len(prompt) and math.isnan(whole[0]) and all(lp <= 0 for lp in whole[1:])
    assert chunked[1:] == pytest.approx(whole[1:], abs=1e-4)
    assert again[1:] == pytest.approx(whole[1:], abs=1e-4)


def test_grammar_masks_every_step(model, tiny_llama):
    """A regex grammar holds on a random model, batched beside an unconstrained sequence."""
    import llguidance

    from shard.grammar import GrammarCompiler

    compiler = GrammarCompiler(ModelSource("tiny", tiny_llama), model.cfg.vocab_size)
    matcher = compiler.matcher(llguidance.LLMatcher.grammar_from_regex(r"[0-9]{3}-[a-z]{2}"))
    params = lambda i: SamplingParams(do_sample=True, seed=i)  # noqa: E731
    engine = Engine(model, EngineConfig(max_batch_total_tokens=1024), eos_token_ids=[])
    engine.start()
    outs = {0: [], 1: []}
    finished = threading.Semaphore(0)
    for i, m in enumerate([matcher, None]):
        def on_event(kind, value, i=i):
            outs[i].append(value)
            if value.finish:
                finished.release()
        engine.submit(Sequence(str(i), PROMPTS[i], params(i), 30, on_event, matcher=m))
    assert finished.acquire(timeout=120) and finished.acquire(timeout=120)
    engine.stop()
    text = compiler.tokenizer().decode_str([t.token_id for t in outs[0]])
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text), text
    assert outs[0][-1].finish == "eos" and len(outs[1]) == 30
