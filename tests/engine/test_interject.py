"""Interjection (Scheduler.interject, Engine._between_layers): a request of a tenant with nothing running
that arrives during a step runs its prompt between two of that step's layers, and its first token goes
out before the step's own tokens. Driven step by step, with the arrival made from inside the hook
between layers: deterministic, no timing."""
from __future__ import annotations

import pytest
import torch

from shard.engine import Engine, EngineConfig
from shard.models.loader import load_model
from shard.parallel import TPGroup
from shard.sampler import SamplingParams
from shard.sequence import Sequence
from sluice.modelfiles import ModelSource

PROMPTS = {"A0": [5, 17, 300, 42, 8, 99], "A1": [11, 12, 13], "A2": [400, 401, 402, 403]}
NEWCOMER = [2000, 7, 31, 800, 9]


@pytest.fixture(scope="module")
def model(tiny_llama):
    return load_model(ModelSource("tiny", tiny_llama), torch.float32)


class Recorder:
    """Every token event, in order, as (name, token id); and each sequence's tokens."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def seq(self, name: str, prompt: list[int], max_new: int = 6, priority: int = 0) -> Sequence:
        def on_event(kind, value):
            assert kind == "token", value
            self.events.append((name, value.token_id))
        return Sequence(name, prompt, SamplingParams(), max_new, on_event, tenant=name[0], priority=priority)

    def tokens(self, name: str) -> list[int]:
        return [t for n, t in self.events if n == name]


def drive(engine: Engine) -> None:
    """The loop's work, step by step, until every sequence has finished."""
    for _ in range(200):
        engine._take_inbox()
        if not engine.scheduler.running and not engine.scheduler.waiting:
            return
        engine.step()
    raise AssertionError("the engine stopped making progress")


def flood(model, rec: Recorder, max_batch_total_tokens: int = 1024) -> Engine:
    """An engine whose tenant A has three sequences decoding."""
    engine = Engine(model, EngineConfig(max_batch_total_tokens, block_size=4), eos_token_ids=[])
    for name, prompt in PROMPTS.items():
        engine.submit(rec.seq(name, prompt))
    engine._take_inbox()
    engine.step()  # their prompts: each samples its first token
    assert all(len(rec.tokens(name)) == 1 for name in PROMPTS)
    return engine


def arrive_during_next_step(engine: Engine, *seqs: Sequence) -> None:
    """Submit `seqs` from inside the next step, at its first pause between two layers."""
    hook, pending = engine._between_layers, list(seqs)

    def submit_then_hook():
        while pending:
            engine.submit(pending.pop(0))
        hook()

    engine._between_layers = submit_then_hook


def test_a_newcomer_gets_its_first_token_before_the_decode_step_it_arrived_in(model):
    rec = Recorder()
    engine = flood(model, rec)
    newcomer = rec.seq("B", NEWCOMER)
    arrive_during_next_step(engine, newcomer)
    before = len(rec.events)
    steps = engine.steps
    engine.step()  # A's decode step, with B's prompt step inside it
    step_events = rec.events[before:]
    assert [n for n, _ in step_events] == ["B", "A0", "A1", "A2"]  # B's first token, then the decodes'
    assert engine.steps == steps + 2  # the interjected step counts as one
    drive(engine)

    # Greedy ids as without interjection: each sequence on its own engine.
    for name, prompt in [*PROMPTS.items(), ("B", NEWCOMER)]:
        alone = Recorder()
        solo = Engine(model, EngineConfig(max_batch_total_tokens=1024, block_size=4), eos_token_ids=[])
        solo.submit(alone.seq(name, prompt))
        drive(solo)
        assert rec.tokens(name) == alone.tokens(name), name
    assert engine.blocks.num_free == engine.blocks.num_blocks, "every block is returned"
    assert not engine.scheduler.fair.active, "the fairness counters saw every sequence leave"


def test_a_newcomer_of_a_streaming_tenant_waits_for_the_step(model):
    rec = Recorder()
    engine = flood(model, rec)
    more = rec.seq("A3", [7, 8, 9])  # tenant A: already running
    arrive_during_next_step(engine, more)
    before = len(rec.events)
    engine.step()
    assert [n for n, _ in rec.events[before:]] == ["A0", "A1", "A2"]
    assert more in engine.scheduler.waiting
    drive(engine)
    assert len(rec.tokens("A3")) == 6


def test_a_newcomer_is_not_interjected_while_a_more_urgent_request_waits(model):
    rec = Recorder()
    engine = flood(model, rec)
    urgent, lone = rec.seq("A3", [7, 8, 9], priority=-1), rec.seq("B", NEWCOMER)
    arrive_during_next_step(engine, urgent, lone)
    before = len(rec.events)
    engine.step()
    assert [n for n, _ in rec.events[before:]] == ["A0", "A1", "A2"]
    assert urgent in engine.scheduler.waiting and lone in engine.scheduler.waiting


def test_a_newcomer_that_needs_a_preemption_is_not_interjected(model):
    # 8 usable blocks of 4 tokens (block 0 is reserved): in their first decode step A's three
    # sequences hold 2 + 1 + 2 of them, and B's 15-token prompt needs 4 of the 3 left.
    rec = Recorder()
    engine = flood(model, rec, max_batch_total_tokens=9 * 4)
    newcomer = rec.seq("B", NEWCOMER * 3)
    arrive_during_next_step(engine, newcomer)
    engine.step()
    assert newcomer in engine.scheduler.waiting and engine.scheduler.preemptions == 0


def test_one_interjection_per_step(model):
    rec = Recorder()
    engine = flood(model, rec)
    arrivals = [rec.seq("B", NEWCOMER), rec.seq("C", [3, 4, 5])]
    hook = engine._between_layers

    def arrive_then_hook():  # B, then C: the tiny model has 2 layers, so two arrivals at its one pause
        if arrivals:
            engine.submit(arrivals.pop(0))
        hook()

    engine._between_layers = lambda: (arrive_then_hook(), arrive_then_hook())
    before = len(rec.events)
    engine.step()
    assert [n for n, _ in rec.events[before:]] == ["B", "A0", "A1", "A2"]  # C waits for the next step
    drive(engine)
    assert len(rec.tokens("C")) == 6


def test_no_interjection_under_tensor_parallelism(model, monkeypatch):
    rec = Recorder()
    engine = flood(model, rec)
    hooks = []

    def step(scheduled, between_layers=None):
        hooks.append(between_layers)
        return [], None

    monkeypatch.setattr(engine.runner, "step", step)
    monkeypatch.setattr(model, "tp", TPGroup(rank=0, size=2))
    engine.step()
    assert hooks == [None]  # the other ranks would wait for rank 0 in the interjected step's collectives


def test_a_newcomer_cancelled_before_it_is_let_in_is_dropped(model):
    rec = Recorder()
    engine = flood(model, rec)
    newcomer = rec.seq("B", NEWCOMER)
    newcomer.cancelled = True  # Engine.cancel, before the step's pause
    arrive_during_next_step(engine, newcomer)
    before = len(rec.events)
    engine.step()
    assert [n for n, _ in rec.events[before:]] == ["A0", "A1", "A2"]
    assert newcomer not in engine.scheduler.waiting and "B" not in engine.scheduler.fair.active
