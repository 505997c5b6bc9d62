"""Deadlines: `X-Request-Deadline` (seconds from now) or the body's `deadline`, the sooner of the two.

A request whose deadline the queue clearly cannot meet is refused at once (429 `overloaded`, before any
compute is spent on it): `first_token_s` is a lower bound of the time to its first token, and when even
that is past the deadline, it is refused. The bound, per replica, is

    (prompt tokens surely served before it + its own prompt tokens) / measured prefill tokens per second
    + one decode step

where "surely before it" are the requests sent to that replica and still waiting for their first token
that have a lower priority number, or the same priority and the same tenant (the shard serves a tenant's
own requests in arrival order; other tenants' may go either side of it). The rates are the shard's own
measurements over its recent steps (HealthResponse); the soonest replica counts. No measurement yet: no
refusal. Only the first token is counted because any generation may end early at an eos.

A deadline that passes while the request waits or runs ends it: a stream with an error event
`error_type: "incomplete_generation"` (TGI's type for a generation that stopped before its end; a new
"deadline" type would be unknown to TGI's clients), a non-streamed request with a 500 of that type.
"""
from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TypeVar

from .errors import ApiError

DEADLINE_HEADER = b"x-request-deadline"
# The current request's deadline (monotonic seconds): set by Admission from the header, lowered by
# router/jobs.py to the body's when that is sooner, read by the token loop (router/generation.py).
AT: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


class DeadlinePassed(RuntimeError):
    pass


PASSED = "the request's deadline passed before the generation finished"


@dataclass
class Waiting:
    """A request sent to a replica that has no first token yet."""

    priority: int
    tenant: str
    prompt_tokens: int


def parse_header(value: bytes) -> float:
    """Seconds from now as a positive finite number; ApiError(422) otherwise."""
    try:
        seconds = float(value.decode("latin-1"))
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ApiError(422, "X-Request-Deadline: a positive number of seconds from now")
    return time.monotonic() + seconds


def deadline_at(body_seconds: float | None) -> float | None:
    """The request's deadline (monotonic seconds), the sooner of the header's and the body's; kept in AT."""
    times = [t for t in (AT.get(), None if body_seconds is None else time.monotonic() + body_seconds) if t]
    at = min(times, default=None)
    AT.set(at)
    return at


def first_token_s(replicas: Iterable, priority: int, tenant: str, prompt_tokens: int) -> float | None:
    """Lower bound of the seconds to the first token on the soonest healthy replica (None: not measured).
    A replica has `healthy`, `prefill_tokens_per_s`, `decode_step_s` and `waiting` (a list of Waiting)."""
    best = None
    for r in replicas:
        if not r.healthy or r.prefill_tokens_per_s <= 0:
            continue
        ahead = sum(w.prompt_tokens for w in r.waiting
                    if w.priority < priority or (w.priority == priority and w.tenant == tenant))
        estimate = (ahead + prompt_tokens) / r.prefill_tokens_per_s + r.decode_step_s
        best = estimate if best is None else min(best, estimate)
    return best


def check(at: float | None, estimate_s: float | None) -> None:
    """Refuse (429) a request whose deadline is before its soonest possible first token."""
    if at is None:
        return
    left = at - time.monotonic()
    if left <= 0:
        raise ApiError(429, "deadline: it has already passed", "overloaded")
    if estimate_s is not None and estimate_s > left:
        raise ApiError(429, f"deadline: the queue cannot meet it: the first token would take at least "
                            f"{estimate_s:.2f} s, the deadline is in {left:.2f} s", "overloaded")


T = TypeVar("T")


async def until(at: float, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """`items` until the deadline `at` (monotonic seconds); then DeadlinePassed (the rest is cancelled)."""
    try:
        while True:
            left = at - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                item = await asyncio.wait_for(anext(items), left)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise DeadlinePassed(PASSED) from None
            yield item
    finally:
        await items.aclose()
