"""ASGI plumbing: error bodies, admission control, and responses that stop working when the client leaves.

Starlette's StreamingResponse only notices a disconnect when it next sends (on ASGI spec 2.4 servers),
so a stream waiting on a slow token would hold its shard sequence until then. The responses here wait
for `http.disconnect` alongside the work and cancel the work the moment it arrives, which cancels the
gRPC call and frees the sequence in the engine.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from sluice.logs import METADATA_KEY, REQUEST_ID

from .metrics import Metrics

log = logging.getLogger("sluice.router")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends must not buffer the stream
]


class ApiError(Exception):
    """Raised by a handler before any byte is sent; rendered as TGI's error body."""

    def __init__(self, status: int, message: str, error_type: str = "validation") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


def error_response(status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    # TGI's shape on every route: huggingface_hub and the JS client map `error_type` to their exceptions,
    # and the OpenAI SDK reads a string `error` as the message.
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def sse_event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


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
    """A server-sent-events response: one `data: <json>` line and a blank line per event."""

    def __init__(self, events: AsyncIterator[dict | str]) -> None:
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async for event in self.events:
                await send({"type": "http.response.body", "body": sse_event(event), "more_body": True})
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


# A client's own id is kept when it is short and plain (it goes into logs and headers verbatim).
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class Load:
    """Shared between Admission and the server's shutdown: what is in flight, and whether we drain."""

    in_flight: int = 0
    draining: bool = False


class Admission:
    """Counts every generation request from its first to its last byte (or error, or disconnect) and
    turns away those beyond the limit at once with 429, never queueing them. Also gives every request
    its id, keeps the request counters, refuses work while draining and, when an API key is set, checks it."""

    def __init__(self, app: ASGIApp, metrics: Metrics, limit: int, generation_routes: set[str],
                 known_routes: set[str], api_key: str | None, load: Load) -> None:
        self.app = app
        self.metrics = metrics
        self.limit = limit
        self.generation_routes = generation_routes
        self.known_routes = known_routes
        self.expected_auth = f"Bearer {api_key}".encode() if api_key else None
        self.load = load

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.known_routes else "other"  # unknown paths must not grow label sets
        status = 500  # what an exception before the response start amounts to
        headers = dict(scope["headers"])
        given = headers.get(METADATA_KEY.encode(), b"").decode("latin-1")
        request_id = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        REQUEST_ID.set(request_id)  # this task and every task it starts (the stream pump) log it

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(METADATA_KEY.encode(), request_id.encode())]
                if scope.get("sluice.ignored"):  # set by the route's body parser
                    extra.append((b"x-sluice-ignored-fields", ",".join(scope["sluice.ignored"]).encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            if self.expected_auth and path not in ("/health", "/metrics") and not self._authorized(headers):
                return await error_response(401, "missing or wrong API key", "authentication")(
                    scope, receive, send_and_note)
            if self.load.draining and path != "/metrics":
                # 503 (not 429) on purpose: load balancers take it, and /health's 503, as "go elsewhere".
                # Connection: close so that keep-alive clients reconnect to another instance.
                return await error_response(503, "the server is shutting down; retry on another instance",
                                            "unavailable", {"Connection": "close"})(scope, receive, send_and_note)
            if scope["method"] != "POST" or path not in self.generation_routes:
                return await self.app(scope, receive, send_and_note)
            if self.load.in_flight >= self.limit:
                message = f"Model is overloaded: {self.limit} requests already in flight, try again shortly"
                return await error_response(429, message, "overloaded", {"Retry-After": "1"})(
                    scope, receive, send_and_note)
            await self._admitted(route, scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            if scope["method"] == "POST" and path in self.generation_routes:
                self.metrics.generation_finished(status)

    async def _admitted(self, route: str, scope: Scope, receive: Receive, send: Send) -> None:
        self.load.in_flight += 1
        self.metrics.in_flight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.load.in_flight -= 1
            self.metrics.in_flight.dec()
            self.metrics.duration.labels(route).observe(time.perf_counter() - start)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        # Constant time: how long a wrong key takes to refuse says nothing about how much of it matched.
        return hmac.compare_digest(headers.get(b"authorization", b""), self.expected_auth)
