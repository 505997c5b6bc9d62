"""Fair scheduling: the order rules of shard/scheduler.py and shard/fairness.py (priority, then the
tenant's virtual token counter, then arrival; late joiners lifted; preemption from the most served),
driven step by step without a model, and once through the engine on the tiny model."""
from __future__ import annotations

import itertools
import threading

import pytest
import torch

from shard.block_manager import BlockManager
from shard.engine import Engine, EngineConfig
from shard.fairness import GENERATED_TOKEN_COST, PROMPT_TOKEN_COST
from shard.models.loader import load_model
from shard.sampler import SamplingParams
from shard.scheduler import Scheduler
from shard.sequence import Sequence
from sluice.modelfiles import ModelSource

_ids = itertools.count(1000)


def seq(tenant: str, prompt_len: int = 8, max_new: int = 4, priority: int = 0, weight: float = 1.0) -> Sequence:
    # Distinct token ids per sequence: no prefix reuse between them muddles the block counts.
    prompt = [next(_ids) for _ in range(prompt_len)]
    return Sequence(f"{tenant}-{prompt[0]}", prompt, SamplingParams(), max_new, lambda *e: None,
                    tenant=tenant, priority=priority, weight=weight)


def drive(sched: Scheduler, max_steps: int = 10_000) -> list[Sequence]:
    """Run steps as the engine would (one token sampled when a sequence's tokens are all computed);
    returns the sequences in the order they got their first token."""
    first: list[Sequence] = []
    for _ in range(max_steps):
        if not sched.running and not sched.waiting:
            return first
        out = sched.schedule()
        sched.advance(out)
        for s, _ in out:
            if s.num_computed == s.num_tokens:
                if s.num_generated == 0 and s not in first:
                    first.append(s)
                s.token_ids.append(1)
                if s.num_generated >= s.max_new_tokens:
                    sched.remove(s)
    raise AssertionError("the scheduler stopped making progress")


def scheduler(batch: int = 64, budget: int = 512, blocks: int = 256, block_size: int = 4) -> Scheduler:
    return Scheduler(BlockManager(blocks, block_size), batch, budget)


def test_a_flood_does_not_hold_back_a_lone_request():
    # One sequence at a time: plain FIFO would serve B's request after all six of A's.
    sched = scheduler(batch=1)
    flood = [seq("A") for _ in range(6)]
    lone = seq("B")
    for s in [*flood, lone]:
        sched.add(s)
    order = drive(sched)
    assert order[0] is flood[0] and order[1] is lone
    assert order[2:] == flood[1:]


def test_priority_comes_before_the_counter_and_arrival():
    sched = scheduler(batch=1)
    normal = [seq("A"), seq("B")]
    urgent = seq("A", priority=-1)  # A's, and last to arrive, but more urgent
    relaxed = seq("C", priority=5)
    for s in [relaxed, *normal, urgent]:
        sched.add(s)
    assert drive(sched) == [urgent, normal[1], normal[0], relaxed]


def test_counter_counts_prompt_and_generated_tokens_divided_by_weight():
    sched = scheduler()
    heavy = seq("A", prompt_len=10, max_new=3, weight=2.0)
    plain = seq("B", prompt_len=10, max_new=3)
    sched.add(heavy)
    sched.add(plain)
    drive(sched)
    cost = 10 * PROMPT_TOKEN_COST + 3 * GENERATED_TOKEN_COST
    assert sched.fair.counters["A"] == pytest.approx(cost / 2)
    assert sched.fair.counters["B"] == pytest.approx(cost)
    assert not sched.fair.active  # nobody left in the engine


def test_weights_share_service_in_proportion():
    sched = scheduler(batch=1)
    for _ in range(12):
        sched.add(seq("A", weight=3.0))
        sched.add(seq("B"))
    first_eight = drive(sched)[:8]
    assert sum(s.tenant == "A" for s in first_eight) == 6  # three of A's for each of B's


def test_late_joiner_is_lifted_to_the_least_active_counter():
    sched = scheduler()
    busy = [seq("A"), seq("B")]
    for s in busy:
        sched.add(s)
    sched.fair.counters.update(A=100.0, B=40.0)
    sched.add(seq("C"))  # never seen: would otherwise sit at 0 and win for a long while
    assert sched.fair.counters["C"] == 40.0
    sched.fair.counters["D"] = 70.0  # served before, idle since: keeps its own, larger counter
    sched.add(seq("D"))
    assert sched.fair.counters["D"] == 70.0
    sched.add(seq("C"))  # already active: not lifted again
    assert sched.fair.counters["C"] == 40.0


def test_joining_an_idle_engine_levels_with_the_most_served():
    sched = scheduler()
    sched.fair.counters.update(A=100.0, B=10.0)
    sched.add(seq("B"))
    assert sched.fair.counters["B"] == 100.0


def test_preemption_takes_from_the_most_served_tenant():
    # 6 usable blocks of 4 tokens (block 0 is reserved); three 8-token prompts take 2 blocks each, so the first decode step needs a
    # block that only preempting someone frees.
    sched = scheduler(blocks=7, block_size=4)
    a, b, c = seq("A", max_new=8), seq("B", max_new=8), seq("C", max_new=8)
    for s in (a, b, c):
        sched.add(s)
    sched.advance(sched.schedule())
    for s in (a, b, c):
        s.token_ids.append(1)
    sched.fair.counters["B"] += 50  # B has had the most service: its sequence gives way, not the newest (C's)
    sched.schedule()
    assert sched.preemptions == 1
    assert b in sched.waiting and b.blocks == [] and b.num_computed == 0
    assert a in sched.running and c in sched.running


def test_a_preempted_prompt_is_not_charged_twice():
    sched = scheduler(blocks=7, block_size=4)
    seqs = [seq(t, max_new=8) for t in "ABC"]
    for s in seqs:
        sched.add(s)
    drive(sched)
    assert sched.preemptions > 0
    cost = 8 * PROMPT_TOKEN_COST + 8 * GENERATED_TOKEN_COST
    assert all(sched.fair.counters[t] == pytest.approx(cost) for t in "ABC")


@pytest.fixture(scope="module")
def model(tiny_llama):
    return load_model(ModelSource("tiny", tiny_llama), torch.float32)


def test_engine_serves_the_lone_tenant_second(model):
    """Through the engine: the tenant id and priority on a Sequence decide who runs next."""
    engine = Engine(model, EngineConfig(max_batch_total_tokens=1024, max_batch_size=1), eos_token_ids=[])
    order: list[str] = []
    done = threading.Semaphore(0)

    def listener(name: str):
        def on_event(kind, value):
            assert kind == "token", value
            if value.finish:
                order.append(name)
                done.release()
        return on_event

    names = [f"A{i}" for i in range(5)] + ["B0", "C0"]
    for name in names:  # all in the inbox before the loop starts: one arrival order, no race
        engine.submit(Sequence(name, [5, 17, 300, 42], SamplingParams(), 6, listener(name),
                               tenant=name[0], priority=-1 if name == "C0" else 0))
    engine.start()
    for _ in names:
        assert done.acquire(timeout=120)
    engine.stop()
    # C0 is urgent; then A (first to arrive) and B take turns until B has no more.
    assert order == ["C0", "A0", "B0", "A1", "A2", "A3", "A4"]


def decode_steps(sched: Scheduler, out) -> None:
    """The engine's bookkeeping after a step: every sequence whose prompt is done samples a token."""
    sched.advance(out)
    for s, _ in out:
        if s.num_computed == s.num_tokens:
            s.token_ids.append(1)


def test_new_prompts_get_a_step_of_their_own_while_others_decode():
    sched = scheduler()
    flood = [seq("A", max_new=50) for _ in range(4)]
    for s in flood:
        sched.add(s)
    decode_steps(sched, sched.schedule())  # the flood's prompts, together
    assert all(s.num_generated == 1 for s in flood)
    lone = seq("B")
    sched.add(lone)
    out = sched.schedule()
    assert [s for s, _ in out] == [lone]  # its prompt alone: its first token comes after a short step
    decode_steps(sched, out)
    assert lone.num_generated == 1
    late = seq("C")
    sched.add(late)
    out = sched.schedule()  # then the decodes, all of them and nothing else
    assert sorted(s.request_id for s, _ in out) == sorted(s.request_id for s in [*flood, lone])
    assert all(n == 1 for _, n in out)
    decode_steps(sched, out)
    assert [s for s, _ in sched.schedule()] == [late]  # and so on, in turn


def decoding_flood() -> Scheduler:
    """A scheduler whose tenant A has four sequences decoding."""
    sched = scheduler()
    for _ in range(4):
        sched.add(seq("A", max_new=50))
    decode_steps(sched, sched.schedule())
    return sched


def test_the_prompt_step_goes_to_a_newcomer_before_a_streaming_tenant():
    sched = decoding_flood()
    more, lone = seq("A"), seq("B")
    sched.add(more)  # A's next prompt arrived first, and A and B are level on the counter
    sched.add(lone)
    out = sched.schedule()
    assert [s for s, _ in out] == [lone]  # B has nothing running: its prompt alone, not with A's
    decode_steps(sched, out)
    out = sched.schedule()
    assert more not in [s for s, _ in out] and all(n == 1 for _, n in out)  # the decodes
    decode_steps(sched, out)
    assert [s for s, _ in sched.schedule()] == [more]  # then A's prompt, in the next prompt step


def test_a_light_tenant_still_streaming_gets_its_prompt_step_before_the_heavy_one():
    """B asks again while its previous answer still streams beside A's flood: B has been served less than
    A, so its new prompt still gets a step of its own, ahead of A's next prompt."""
    sched = decoding_flood()
    streaming = seq("B", max_new=50)
    sched.add(streaming)
    decode_steps(sched, sched.schedule())  # B's first prompt, alone
    for _ in range(3):
        decode_steps(sched, sched.schedule())  # the decodes: A's four sequences and B's one
    assert sched.fair.counters["B"] < sched.fair.counters["A"]
    more, again = seq("A"), seq("B")
    sched.add(more)  # A's next prompt arrived first
    sched.add(again)
    assert [s for s, _ in sched.schedule()] == [again]
    assert sched.interject() == []  # and the heavy tenant is never let in between layers


def test_a_newcomer_arriving_during_a_streaming_tenants_prompt_step_does_not_wait_for_the_decodes():
    sched = decoding_flood()
    more = seq("A")
    sched.add(more)
    out = sched.schedule()
    assert [s for s, _ in out] == [more]  # A's next prompt: a prompt step of a streaming tenant
    decode_steps(sched, out)
    lone = seq("B")
    sched.add(lone)  # arrived while that step ran
    out = sched.schedule()
    assert [s for s, _ in out] == [lone]  # one more prompt step, for the newcomer, before the decodes
    decode_steps(sched, out)
    sched.add(seq("C"))  # another newcomer: two prompt steps in a row are the most, the decodes go now
    out = sched.schedule()
    assert len(out) == 6 and all(n == 1 for _, n in out)


def test_a_more_urgent_prompt_of_a_streaming_tenant_is_not_held_for_newcomers():
    sched = decoding_flood()
    urgent, lone = seq("A", priority=-1), seq("B")
    sched.add(urgent)
    sched.add(lone)
    assert [s for s, _ in sched.schedule()] == [urgent, lone]  # priority first, both in one prompt step


def test_without_decodes_prompts_share_the_budget_as_they_come():
    sched = scheduler(budget=12)
    long, short = seq("A", prompt_len=20), seq("B", prompt_len=6)
    sched.add(long)
    assert sched.schedule() == [(long, 12)]  # a chunk of the long prompt
    sched.advance([(long, 12)])
    sched.add(short)
    out = sched.schedule()  # the rest of the long one (it was admitted first), then the new one
    assert out == [(long, 8), (short, 4)]


def test_an_interjection_into_a_prompt_step_is_the_second_prompt_step_before_the_decodes():
    """Scheduler.interject (the engine side: tests/engine/test_interject.py) admits by the rule of
    `_newcomers`, and counts toward the prompt steps allowed between decode steps."""
    sched = decoding_flood()  # tenant A: four sequences decoding
    more = seq("A")
    sched.add(more)
    prompt_step = sched.schedule()
    assert [s for s, _ in prompt_step] == [more]  # A's next prompt, in a step of its own
    lone = seq("B")
    sched.add(lone)  # arrives during that step
    interjected = sched.interject()
    assert [s for s, _ in interjected] == [lone]
    decode_steps(sched, interjected)
    decode_steps(sched, prompt_step)
    sched.add(seq("C"))  # another newcomer: it waits for the decodes, as after two prompt steps
    out = sched.schedule()
    assert len(out) == 6 and all(n == 1 for _, n in out)
