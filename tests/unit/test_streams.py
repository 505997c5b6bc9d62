"""The resumable-stream store's rules (router/streams.py): what is kept, what is dropped, who may read, when a
stream is cut or forgotten. The HTTP side is tested end to end in tests/e2e/test_streams_*.py."""
from __future__ import annotations

import asyncio

import pytest

from router.admission import Load
from router.config import RouterSettings
from router.metrics import Metrics
from router.streams import BufferFull, Gone, StreamStore

EVENT = b"x" * 100


def store(**caps) -> StreamStore:
    settings = RouterSettings(stream_buffer_bytes=caps.get("per_stream", 1000),
                              stream_buffer_total_bytes=caps.get("total", 10_000),
                              stream_retention_s=caps.get("retention", 60.0))
    return StreamStore(settings, Metrics(), Load())


async def idle(k) -> None:
    await asyncio.Event().wait()


def sample(s: StreamStore, name: str) -> float:
    return s.metrics.registry.get_sample_value(name)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_only_events_handed_to_a_reader_are_dropped_and_a_reader_makes_room():
    async def check():
        s = store(per_stream=350)
        k = s.open(b"me", idle)
        token = s.attach(k, 0)
        for _ in range(3):
            await s.append(k, EVENT)
        s.advanced(k, token, 2)
        await s.append(k, EVENT)  # drops event 1 (handed), keeps 2 (handed) .. 4
        assert [n for n, _ in k.events] == [2, 3, 4] and k.size == 300 == s.size
        s.advanced(k, token, 2)
        blocked = asyncio.ensure_future(s.append(k, EVENT + EVENT))  # needs 3 and 4 dropped: not handed yet
        await asyncio.sleep(0)
        assert not blocked.done()
        s.advanced(k, token, 4)
        await blocked
        assert [n for n, _ in k.events] == [4, 5] and s.size == 300
        with pytest.raises(Gone):
            k.since(2)
        assert [n for n, _ in k.since(4)] == [5]

    run(check())


def test_a_stream_without_a_reader_is_cut_rather_than_lose_unsent_events():
    async def check():
        s = store(per_stream=250)
        k = s.open(b"me", idle)
        await s.append(k, EVENT)
        await s.append(k, EVENT)
        with pytest.raises(BufferFull):
            await s.append(k, EVENT)
        s.append_anyway(k, b"the error event")
        assert k.last == 3 and sample(s, "sluice_streams_cut_total") == 1

    run(check())


def test_the_total_cap_counts_every_stream():
    async def check():
        s = store(per_stream=1000, total=450)
        a, b = s.open(b"me", idle), s.open(b"me", idle)
        ta = s.attach(a, 0)
        for _ in range(3):
            await s.append(a, EVENT)
        s.advanced(a, ta, 3)
        await s.append(b, EVENT)
        with pytest.raises(BufferFull):  # b has no reader, and a's events are a's to drop
            await s.append(b, EVENT + EVENT)
        await s.append(a, EVENT + EVENT)  # a makes its own room
        assert s.size <= 450 and s.size == a.size + b.size

    run(check())


def test_streams_are_their_owners_and_expire_after_retention_freeing_the_slot():
    async def check():
        s = store(retention=0.01)
        k = s.open(b"owner", idle)
        assert s.get(k.id, b"owner") is k
        assert s.get(k.id, b"someone else") is None and s.get("0" * 32, b"owner") is None
        s.load.in_flight += 1  # the first request's own slot, as Admission holds it
        s.hold_slot(k)
        s.load.in_flight -= 1  # the first request ended
        assert s.load.in_flight == 1
        token = s.attach(k, 0)
        s.detach(k, token)
        while s.get(k.id, b"owner") is not None or s.load.in_flight:
            await asyncio.sleep(0.01)
        assert k.task.cancelled() and sample(s, "sluice_streams_expired_total") == 1

    run(check())


def test_a_newer_reader_takes_over_and_the_older_ones_leaving_keeps_the_stream():
    async def check():
        s = store(retention=0.01)
        k = s.open(b"me", idle)
        old = s.attach(k, 0)
        new = s.attach(k, 0)
        s.detach(k, old)
        assert k.reader == new and k.timer is None
        s.detach(k, new)
        assert k.timer is not None

    run(check())
