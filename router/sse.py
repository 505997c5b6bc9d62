"""Responses that stop working when the client leaves, and the server-sent-events wire format.

Starlette's StreamingResponse only notices a disconnect when it next sends (on ASGI spec 2.4 servers),
so a stream waiting on a slow token would hold its shard sequence until then. The responses here wait
for `http.disconnect` alongside the work and cancel the work the moment it arrives, which cancels the
gRPC call and frees the sequence in the engine.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("sluice.router")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends must not buffer the stream
]


def sse_event(payload: dict | str, name: str | None = None) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {data}\n\n".encode()


async def _wait_for_disconnect(receive: Receive) -> None:
    # The request body was already read by the handler, so the next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(receive: Receive, work: Awaitable) -> tuple[bool, object]:
    """Run `work` until it finishes or the client disconnects, whichever comes first.
    Returns (finished, result); on disconnect the work is cancelled."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait((job, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (job, watch):
            if not task.done():
                task.cancel()
        await asyncio.gather(job, watch, return_exceptions=True)
    if job.cancelled():
        return False, None
    return True, job.result()  # re-raises the work's own exception


class EventStream:
    """A server-sent-events response: one `data: <json>` line and a blank line per event. With `named`
    (the Responses API, as OpenAI sends it), an `event: <type>` line comes first, from each event's `type`."""

    def __init__(self, events: AsyncIterator[dict | str], named: bool = False) -> None:
        self.events = events
        self.named = named

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async for event in self.events:
                name = event.get("type") if self.named and isinstance(event, dict) else None
                await send({"type": "http.response.body", "body": sse_event(event, name), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _unless_disconnected(receive, pump())
        finally:
            await self.events.aclose()


class Deferred:
    """A non-streamed response whose body takes long to compute (a whole generation): the computation
    is cancelled if the client disconnects while waiting for it."""

    def __init__(self, compute: Callable[[], Awaitable[Response]]) -> None:
        self.compute = compute

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished, response = await _unless_disconnected(receive, self.compute())
        if finished:
            await response(scope, receive, send)
