"""The SSE wire format of one event (router/sse.py `sse_event`): whatever a token's text holds, the event is
one `data:` line that line splitters of every kind keep whole, and its JSON decodes to the same text."""
from __future__ import annotations

import json

import pytest

from router.sse import sse_event

# Every character str.splitlines() (httpx's iter_lines) breaks at, and the ones the SSE spec breaks at.
SPLITTERS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@pytest.mark.parametrize("char", list(SPLITTERS), ids=[f"U+{ord(c):04X}" for c in SPLITTERS])
def test_a_line_break_in_a_tokens_text_stays_inside_one_data_line(char):
    payload = {"token": {"id": 1, "text": f"a{char}b"}, "generated_text": None}
    event = sse_event(payload, event_id="s.1").decode()
    lines = event.splitlines()
    assert len(lines) == 3 and lines[0] == "id: s.1" and lines[1].startswith("data: ") and lines[2] == ""
    assert event.endswith("\n\n") and event.count("\n") == 3
    assert json.loads(lines[1][len("data: "):]) == payload


def test_an_event_is_strict_json_whatever_its_numbers_and_keys():
    """A float that is not finite (a -inf logprob) becomes null, not the `-Infinity` JavaScript's JSON.parse
    refuses; a number as a key becomes a string key, as json.dumps makes it."""
    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))

    event = sse_event({"logprob": float("-inf"), "nan": float("nan"), 7: "seven", "ok": -0.25}).decode()
    assert strict(event.removeprefix("data: ").rstrip("\n")) == {"logprob": None, "nan": None, "7": "seven", "ok": -0.25}


def test_keepalive_waits_while_a_send_is_held_up_and_pings_once_idle(monkeypatch):
    """While one of the stream's own sends is held up (a slow reader), no keep-alive goes out and the
    keep-alive task sleeps whole intervals instead of spinning; once the stream is idle it pings."""
    import asyncio

    from router import sse

    sleeps = []
    real_sleep = asyncio.sleep

    async def counted_sleep(delay):
        sleeps.append(delay)
        await real_sleep(delay)

    monkeypatch.setattr(sse.asyncio, "sleep", counted_sleep)

    async def scenario():
        sent, release = [], asyncio.Event()

        async def send(message):
            if not sent:
                await release.wait()  # the first event's send waits on the reader
            sent.append(message["body"])

        writer = sse.Writer(send, 0.02)
        held = asyncio.ensure_future(writer.send(b"data: 1\n\n"))
        await real_sleep(0.2)  # ten intervals with the send held up
        pinged_while_held = list(sent)
        spins = len(sleeps)
        release.set()
        await held
        while len(sent) < 2:
            await real_sleep(0.01)
        await writer.close()
        return pinged_while_held, spins, sent

    pinged_while_held, spins, sent = asyncio.run(scenario())
    assert pinged_while_held == []
    assert spins < 50  # one sleep an interval (about ten), not a busy loop
    assert sent[:2] == [b"data: 1\n\n", sse.KEEPALIVE]


def test_writes_after_a_held_up_send_follow_it_in_order_and_flush_waits_for_them():
    """`write` sends at once when the send completes without waiting; one that has to wait (a slow reader)
    finishes in a task, and the writes after it queue behind it and go out after it, in order."""
    import asyncio

    from router import sse

    async def scenario():
        sent, release = [], asyncio.Event()

        async def send(message):
            if message["body"] == b"2":
                await release.wait()  # the socket's buffer is full: the server waits for it to drain
            sent.append(message["body"])

        writer = sse.Writer(send, 0)
        writer.write(b"1")
        at_once = list(sent)
        writer.write(b"2")
        writer.write(b"3")
        writer.write(b"4")
        await asyncio.sleep(0.05)
        while_held = list(sent)
        flushed = asyncio.ensure_future(writer.flush())
        await asyncio.sleep(0.05)
        waited = not flushed.done()
        release.set()
        await flushed
        writer.write(b"5")
        await writer.close()
        return at_once, while_held, waited, sent

    at_once, while_held, waited, sent = asyncio.run(scenario())
    assert at_once == [b"1"]
    assert while_held == [b"1"] and waited
    assert b"".join(sent) == b"12345" and sent[:2] == [b"1", b"2"]


def test_a_failed_send_is_raised_by_flush_not_by_write():
    """A write runs on whoever delivers the event (a shard stream's reader, shared by every stream): it
    must not raise there. The stream's own task learns of it when it flushes."""
    import asyncio

    import pytest

    from router import sse

    async def scenario():
        async def send(message):
            raise OSError("connection reset")

        writer = sse.Writer(send, 0)
        writer.write(b"1")
        writer.write(b"2")
        with pytest.raises(OSError):
            await writer.flush()
        await writer.close()

    asyncio.run(scenario())
