"""Deadlines: the lower bound on the time to a first token (rates injected), the refusal rule, the header,
and a stream ended when its deadline passes."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from router import deadline
from router.deadline import DeadlinePassed, Waiting, first_token_s
from router.errors import ApiError


def replica(rate: float, step: float, waiting: list[Waiting], healthy: bool = True) -> SimpleNamespace:
    return SimpleNamespace(healthy=healthy, prefill_tokens_per_s=rate, decode_step_s=step, waiting=waiting)


QUEUE = [Waiting(0, "a", 300), Waiting(-1, "b", 200), Waiting(0, "b", 500), Waiting(2, "a", 1000)]


def test_only_requests_surely_ahead_count():
    r = replica(100.0, 0.5, QUEUE)
    # Tenant a, priority 0: b's urgent 200 and a's own earlier 300; b's same-priority 500 may go after it.
    assert first_token_s([r], 0, "a", 100) == pytest.approx((200 + 300 + 100) / 100 + 0.5)
    # Most urgent of all: only its own prompt.
    assert first_token_s([r], -5, "c", 100) == pytest.approx(100 / 100 + 0.5)
    # Least urgent: everything waiting is ahead.
    assert first_token_s([r], 9, "z", 0) == pytest.approx(2000 / 100 + 0.5)


def test_the_soonest_measured_healthy_replica_counts():
    busy, free = replica(100.0, 0.5, QUEUE), replica(50.0, 0.1, [])
    assert first_token_s([busy, free], 0, "a", 100) == pytest.approx(100 / 50 + 0.1)
    assert first_token_s([busy, replica(1000.0, 0.0, [], healthy=False)], 0, "a", 100) == pytest.approx(6.5)
    assert first_token_s([replica(0.0, 0.0, [])], 0, "a", 100) is None  # not measured yet: no refusal


def test_refused_when_the_bound_is_past_the_deadline():
    now = time.monotonic()
    deadline.check(None, 99.0)
    deadline.check(now + 1000, None)
    deadline.check(now + 1000, 5.0)
    with pytest.raises(ApiError) as refused:
        deadline.check(now + 1000, 2000.0)
    assert refused.value.status == 429 and refused.value.error_type == "overloaded"
    assert "cannot meet" in refused.value.message
    with pytest.raises(ApiError, match="already passed"):
        deadline.check(now - 1, None)


@pytest.mark.parametrize("value", [b"0", b"-1", b"soon", b"nan", b"inf", b""])
def test_a_bad_header_is_a_422(value):
    with pytest.raises(ApiError) as bad:
        deadline.parse_header(value)
    assert bad.value.status == 422


def test_the_sooner_of_header_and_body_wins():
    def with_header(seconds: float, body: float | None) -> float:
        token = deadline.AT.set(time.monotonic() + seconds)
        try:
            return deadline.deadline_at(body) - time.monotonic()
        finally:
            deadline.AT.reset(token)

    assert with_header(100, 5.0) <= 5
    assert 5 < with_header(100, 500.0) <= 100
    assert 5 < with_header(100, None) <= 100
    assert deadline.deadline_at(None) is None


def test_a_stream_ends_when_its_deadline_passes():
    closed = asyncio.Event()

    async def tokens():
        try:
            yield 1
            await asyncio.Event().wait()  # a shard that never sends the next token
            yield 2
        finally:
            closed.set()

    async def run():
        got = []
        with pytest.raises(DeadlinePassed):
            async for item in deadline.until(time.monotonic() + 0.2, tokens()):
                got.append(item)
        assert got == [1] and closed.is_set()  # the shard call behind it is closed, not left running

    asyncio.run(run())


def test_the_shard_measures_prefill_and_decode_apart():
    from shard.rates import MIN_PREFILL_TOKENS, StepRates

    rates = StepRates()
    rates.observe(0, 0.05)
    rates.observe(MIN_PREFILL_TOKENS - 1, 9.0)  # a few prompt tokens: says little about either rate
    rates.observe(200, 0.5)
    assert rates.decode_step_s == pytest.approx(0.05) and rates.prefill_tokens_per_s == pytest.approx(400)
    rates.observe(0, 0.15)
    assert 0.05 < rates.decode_step_s < 0.15  # a moving average, not the last step alone
