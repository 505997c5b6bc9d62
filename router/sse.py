"""Responses that stop working when the client leaves, and the server-sent-events wire format.

Starlette's StreamingResponse only notices a disconnect when it next sends (on ASGI spec 2.4 servers),
so a stream waiting on a slow token would hold its shard sequence until then. The responses here wait
for `http.disconnect` alongside the work and cancel the work the moment it arrives, which cancels the
gRPC call and frees the sequence in the engine.

Every event of a stream carries `id: <stream id>.<n>` (n from 1), and the stream id is in the
X-Sluice-Stream-Id header. A resumable stream (streams.py) is the exception to "disconnect cancels": its
generation writes into the store and each connection only reads from there. While a stream has sent
nothing for --sse-keepalive seconds it gets a `: keep-alive` comment, which every SSE parser skips and
which keeps idle-timeout proxies from cutting it.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine

import orjson
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .admission import BODY_SEND
from .streams import BufferFull, Gone, Kept, StreamStore, owner_of

log = logging.getLogger("sluice.router")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends must not buffer the stream
]
STREAM_ID_HEADER = b"x-sluice-stream-id"
RESUMABLE_HEADER = "x-sluice-resumable"
# A comment line alone, no blank line after it: a blank line ends an event, and the openai SDK's parser
# (unlike the SSE spec) dispatches an empty one once an id was seen, which then fails to parse as JSON.
KEEPALIVE = b": keep-alive\n"
END = {"type": "http.response.body", "body": b"", "more_body": False}


# Characters JSON leaves raw that Python's str.splitlines() breaks lines at: clients that read SSE with it
# (httpx's iter_lines, so huggingface_hub's) would cut a `data:` line inside a token's text. Escaped, they
# decode to the same string. In UTF-8 these byte pairs and triples are those characters and nothing else.
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))

# orjson, not json.dumps: every event of every stream passes here. A token's chunk took 3.6 us with
# json.dumps and 0.3 with orjson in a hot loop, and ~11 us in the served router at 16 streams, where the
# engine keeps evicting the router's caches (bench/RESULTS.md, session 27). Its output is the same compact
# JSON, except that a NaN or infinite float becomes null where json.dumps wrote invalid JSON.
_DUMPS_OPTIONS = orjson.OPT_NON_STR_KEYS  # as json.dumps: {1: x} is {"1": x}


def _escape_line_breaks(data: bytes) -> bytes:
    if data.isascii():  # most events: none of those characters can be in it
        return data
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return data


def sse_event(payload: dict | str, name: str | None = None, event_id: str | None = None) -> bytes:
    if type(payload) is str:
        data = payload.encode()
    else:
        data = _escape_line_breaks(orjson.dumps(payload, option=_DUMPS_OPTIONS))
    if name is None and event_id is not None:  # the common case, one format
        return b"id: %s\ndata: %s\n\n" % (event_id.encode(), data)
    head = (f"id: {event_id}\n" if event_id else "") + (f"event: {name}\n" if name else "")
    return b"%sdata: %s\n\n" % (head.encode(), data)


def start_message(stream_id: str) -> dict:
    return {"type": "http.response.start", "status": 200,
            "headers": [*SSE_HEADERS, (STREAM_ID_HEADER, stream_id.encode())]}


def _body(data: bytes) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": True}


class StreamCut(RuntimeError):
    """Thrown into a cut resumable stream's events: `generation.guarded` turns it into the final error event."""


async def _wait_for_disconnect(receive: Receive) -> None:
    # The request body was already read by the handler, so the next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable) -> tuple[bool, object]:
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


class Writer:
    """A stream's body, written. `write` sends at once when the connection takes the bytes, which is the
    common case: no await and no task a token (a task's wake-up alone cost ~14 us of the router's CPU a
    token at 16 streams, bench/RESULTS.md, session 30). A send that cannot finish at once (a slow reader:
    the server's flow control waits for the socket to drain) goes on in a task of its own, and the writes
    after it queue behind it, in order. `flush` waits for them. While nothing was written for `keepalive_s`,
    a keep-alive comment goes out, but never while a send is held up: that send is the news."""

    def __init__(self, send: Send, keepalive_s: float) -> None:
        self._send = send
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._backlog: list[bytes] = []
        self._held: asyncio.Task | None = None  # a held-up send, then the backlog
        self._failed: BaseException | None = None  # a send that failed at once; `flush` raises it
        self._keepalive = asyncio.ensure_future(self._keep_alive(keepalive_s)) if keepalive_s else None

    def write(self, data: bytes) -> None:
        """Send `data` now, or after the sends before it; never raises (`flush` does)."""
        self._last = self._loop.time()
        if self._failed is not None:
            return
        if self._held is not None:
            self._backlog.append(data)
            return
        sending = self._send(_body(data))
        try:
            waits_on = sending.send(None)
        except StopIteration:
            return
        except BaseException as exc:  # noqa: BLE001 - kept for flush: the caller may be another stream's reader
            self._failed = exc
            return
        self._held = asyncio.ensure_future(self._finish_held(sending, waits_on))

    async def _finish_held(self, sending: Coroutine, waits_on: object) -> None:
        await _resume(sending, waits_on)
        while self._backlog:
            data, self._backlog = b"".join(self._backlog), []
            await self._send(_body(data))
        self._held = None

    async def flush(self) -> None:
        """Wait until everything written was sent; raises what a send raised."""
        if self._failed is not None:
            raise self._failed
        if self._held is not None:
            await self._held

    async def send(self, data: bytes) -> None:
        self.write(data)
        await self.flush()

    async def _keep_alive(self, interval: float) -> None:
        while True:
            idle = self._loop.time() - self._last
            if idle < interval:
                await asyncio.sleep(interval - idle)
            elif self._held is not None:
                await asyncio.sleep(interval)
            else:
                self.write(KEEPALIVE)

    async def close(self) -> None:
        """Stop the keep-alives and any send still held up (the stream is over, or its client gone)."""
        tasks = [t for t in (self._keepalive, self._held) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _resume(coroutine: Coroutine, waits_on: object) -> None:
    """Run to its end a coroutine that was started by hand (`send(None)`) and is suspended on `waits_on`, what
    it yielded to its runner: this task becomes its runner. The coroutine sees the outcome of what it waits
    on itself, when it is resumed."""
    try:
        while True:
            if waits_on is None:  # a bare yield: it only gives the loop a turn
                await asyncio.sleep(0)
            else:
                waits_on._asyncio_future_blocking = False  # as a task does when it takes a yielded future on
                try:
                    await waits_on
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():
                        raise
                except Exception:  # noqa: BLE001, S110 - the coroutine's to handle, on its next step
                    pass
            waits_on = coroutine.send(None)
    except StopIteration:
        pass
    finally:
        coroutine.close()


def keepalive_s(scope: Scope) -> float:
    return scope["app"].state.router.settings.sse_keepalive_s


def resumable_store(scope: Scope) -> StreamStore | None:
    """The store a stream keeps its events in, when the request asks for a resumable one (RESUMABLE_HEADER)
    and the app keeps them; None otherwise."""
    store: StreamStore | None = getattr(scope["app"].state, "streams", None)
    if store is not None and Headers(scope=scope).get(RESUMABLE_HEADER, "").strip().lower() in ("1", "true"):
        return store
    return None


def body_send_of(scope: Scope, send: Send) -> Send:
    """Where a stream's body goes once its start went through `send`: the server's own send (the scope's
    BODY_SEND), past the middleware's wrappers between it and the route, which only watch for the start
    (four coroutine calls a token, ~5 us of the router's CPU at 16 streams)."""
    return scope.get(BODY_SEND, send)


class EventStream:
    """A server-sent-events response: `id: <stream>.<n>`, one `data: <json>` line and a blank line per event.
    With `named` (the Responses API, as OpenAI sends it), an `event: <type>` line too, from each event's
    `type`. Resumable when the request asks for it (the X-Sluice-Resumable header)."""

    def __init__(self, events: AsyncIterator[dict | str], named: bool = False) -> None:
        self.events = events
        self.named = named

    def frame(self, event: dict | str, event_id: str) -> bytes:
        name = event.get("type") if self.named and isinstance(event, dict) else None
        return sse_event(event, name, event_id)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        store = resumable_store(scope)
        if store is not None:
            return await self._resumable(store, owner_of(Headers(scope=scope)), scope, receive, send)
        stream_id = uuid.uuid4().hex
        interval = keepalive_s(scope)

        async def pump() -> None:
            await send(start_message(stream_id))
            body_send = body_send_of(scope, send)
            writer = Writer(body_send, interval)
            try:
                n = 0
                # The next event is asked for only once the previous one was sent: backpressure.
                async for event in self.events:
                    n += 1
                    await writer.send(self.frame(event, f"{stream_id}.{n}"))
            finally:
                await writer.close()
            await body_send(END)

        try:
            await unless_disconnected(receive, pump())
        finally:
            await self.events.aclose()

    async def _resumable(self, store: StreamStore, owner: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        k = store.open(owner, lambda k: _produce(store, k, self.events, self.frame))
        try:
            await Follow(store, k, 0)(scope, receive, send)
        finally:
            store.hold_slot(k)


async def _produce(store: StreamStore, k: Kept, events: AsyncIterator[dict | str],
                   frame: Callable[[dict | str, str], bytes]) -> None:
    """A resumable stream's generation: its events, framed, into the store. A stream cut for room gets the
    error event its route's `guarded` makes (and `[DONE]` where the dialect ends with it)."""
    cut, throw = False, None
    try:
        while True:
            try:
                event = await (events.athrow(throw) if throw else events.__anext__())
            except (StopAsyncIteration, StreamCut):
                return
            throw = None
            data = frame(event, f"{k.id}.{k.last + 1}")
            if cut:
                store.append_anyway(k, data)
                continue
            try:
                await store.append(k, data)
            except BufferFull as exc:
                log.warning("resumable stream %s cut: %s", k.id, exc)
                cut, throw = True, StreamCut(str(exc))
    finally:
        await events.aclose()


class Follow:
    """One connection reading a resumable stream: its kept events after `after`, then the rest as they come."""

    def __init__(self, store: StreamStore, k: Kept, after: int) -> None:
        self.store, self.k, self.after = store, k, after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        store, k = self.store, self.k
        token = store.attach(k, self.after)
        keepalive = keepalive_s(scope) or None

        async def pump() -> None:
            await send(start_message(k.id))
            body_send = body_send_of(scope, send)
            n = self.after
            while k.reader == token:  # a newer connection took the stream over: this one ends
                changed = k.changed
                try:
                    batch = k.since(n)
                except Gone:
                    break
                for n, data in batch:
                    await body_send(_body(data))
                    store.advanced(k, token, n)  # what it was handed may be dropped, should room be needed
                if batch:
                    continue
                if k.finished:
                    break
                try:
                    await asyncio.wait_for(changed.wait(), keepalive)
                except asyncio.TimeoutError:
                    await body_send(_body(KEEPALIVE))
            await body_send(END)

        try:
            await unless_disconnected(receive, pump())
        finally:
            store.detach(k, token)


class Deferred:
    """A non-streamed response whose body takes long to compute (a whole generation): the computation
    is cancelled if the client disconnects while waiting for it."""

    def __init__(self, compute: Callable[[], Awaitable[Response]]) -> None:
        self.compute = compute

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished, response = await unless_disconnected(receive, self.compute())
        if finished:
            await response(scope, receive, send)
