"""Resumable streams (opt-in per request: `X-Sluice-Resumable: 1`): the store that keeps a stream's events
once they are sent, and `GET /v1/streams/{id}`, which replays what a client missed and follows the rest.

A resumable stream's generation runs in a task of its own (sse.EventStream starts it) that writes framed
events into a `Kept` record; every client connection, the first one included, only reads that record.
So a client that goes away leaves the generation running, for up to --stream-retention seconds after the
last reader left; then the stream is cancelled (if still running) and forgotten.

Memory is bounded twice, per stream (--stream-buffer-bytes) and for all streams (--stream-buffer-total-bytes),
by one rule that never makes a gap: only events already handed to a reader are dropped (oldest first).
When that frees too little, a stream with a reader waits for it (the backpressure a plain stream has),
and a stream without one is cut: its generation ends with an error event.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import re
import uuid
from collections import deque
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from .admission import Load
from .config import RouterSettings
from .errors import ApiError
from .metrics import Metrics


class BufferFull(RuntimeError):
    """No room for a stream's next event, and no reader to make room."""


class Gone(LookupError):
    """The events a reader asks for were dropped (a newer reader took the stream over)."""


def owner_of(headers) -> bytes:
    """Who may resume a stream: whoever sends the same Authorization header (digested, never kept)."""
    return hashlib.sha256(headers.get("authorization", "").encode("latin-1")).digest()


@dataclass(eq=False)
class Kept:
    """One resumable stream: its events n = first..last (contiguous), and who reads it."""

    id: str
    owner: bytes
    events: deque = field(default_factory=deque)  # (n, framed bytes), oldest first
    size: int = 0
    last: int = 0  # n of the newest event
    finished: bool = False  # the generation wrote its last event (or was cut)
    reader: int = 0  # the current reader's token, 0 when none
    handed: int = 0  # newest event handed to the current (or last) reader; newer ones must be kept
    task: asyncio.Task | None = None  # the generation
    timer: asyncio.TimerHandle | None = None  # retention expiry, while nobody reads
    holds_slot: bool = False  # counted in Load.in_flight after its first request ended
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def first(self) -> int:
        return self.events[0][0] if self.events else self.last + 1

    def since(self, n: int) -> list[tuple[int, bytes]]:
        """The kept events after n; Gone when some of them were dropped."""
        if n + 1 < self.first:
            raise Gone(f"events after {n} are no longer kept")
        return list(itertools.islice(self.events, n + 1 - self.first, None))

    def notify(self) -> None:
        # One Event per change: a waiter takes the current one before looking, so it misses nothing.
        self.changed.set()
        self.changed = asyncio.Event()


class StreamStore:
    def __init__(self, settings: RouterSettings, metrics: Metrics, load: Load) -> None:
        self.per_stream = settings.stream_buffer_bytes
        self.total_cap = settings.stream_buffer_total_bytes
        self.retention_s = settings.stream_retention_s
        self.metrics = metrics
        self.load = load
        self.kept: dict[str, Kept] = {}
        self.size = 0
        self._tokens = itertools.count(1)

    # ---- the generation's side ----

    def open(self, owner: bytes, task_factory) -> Kept:
        """A new stream whose generation is `task_factory(kept)` (a coroutine), started now."""
        k = Kept(uuid.uuid4().hex, owner)
        self.kept[k.id] = k
        self.metrics.streams_kept.set(len(self.kept))
        k.task = asyncio.ensure_future(task_factory(k))
        k.task.add_done_callback(lambda _: self._ended(k))
        return k

    async def append(self, k: Kept, data: bytes) -> None:
        """Keep one event, making room as the module docstring says; BufferFull when the stream has to be cut."""
        while not self._make_room(k, len(data)):
            if not k.reader:
                self.metrics.streams_cut.inc()
                raise BufferFull("the stream's events filled its buffer while no client was reading")
            await k.changed.wait()
        self.append_anyway(k, data)

    def append_anyway(self, k: Kept, data: bytes) -> None:
        """The last event of a cut stream: a few hundred bytes past the caps rather than a stream without an end."""
        k.last += 1
        k.events.append((k.last, data))
        self._grow(k, len(data))
        k.notify()

    def finish(self, k: Kept) -> None:
        k.finished = True
        k.notify()

    def _make_room(self, k: Kept, need: int) -> bool:
        while k.size + need > self.per_stream or self.size + need > self.total_cap:
            if not k.events:
                return True  # one event larger than a cap: it goes in alone
            n, data = k.events[0]
            if n > k.handed:
                return False
            k.events.popleft()
            self._grow(k, -len(data))
        return True

    def _grow(self, k: Kept, delta: int) -> None:
        k.size += delta
        self.size += delta
        self.metrics.stream_buffer_bytes.set(self.size)

    def _ended(self, k: Kept) -> None:
        self.finish(k)
        if k.holds_slot:
            k.holds_slot = False
            self.load.in_flight -= 1
            self.metrics.in_flight.dec()

    def hold_slot(self, k: Kept) -> None:
        """The first request is over but its generation runs on: it keeps counting against the limit."""
        if k.task is not None and not k.task.done() and not k.holds_slot:
            k.holds_slot = True
            self.load.in_flight += 1
            self.metrics.in_flight.inc()

    # ---- the readers' side ----

    def get(self, stream_id: str, owner: bytes) -> Kept | None:
        k = self.kept.get(stream_id)
        if k is None or not hmac.compare_digest(k.owner, owner):
            return None  # another key's stream is as unknown as a made-up id
        return k

    def attach(self, k: Kept, after: int) -> int:
        """A new reader, from event `after` on; it takes over from any earlier one. Returns its token."""
        if k.timer is not None:
            k.timer.cancel()
            k.timer = None
        k.reader = next(self._tokens)
        k.handed = after
        k.notify()
        return k.reader

    def advanced(self, k: Kept, token: int, n: int) -> None:
        if k.reader == token:
            k.handed = n
            k.notify()  # the generation may be waiting for room

    def detach(self, k: Kept, token: int) -> None:
        if k.reader != token:
            return  # taken over by a newer reader
        k.reader = 0
        k.notify()
        k.timer = asyncio.get_running_loop().call_later(self.retention_s, self._expire, k)

    def _expire(self, k: Kept) -> None:
        if k.reader or self.kept.get(k.id) is not k:
            return
        del self.kept[k.id]
        self._grow(k, -k.size)
        k.events.clear()
        self.metrics.streams_kept.set(len(self.kept))
        self.metrics.streams_expired.inc()
        if k.task is not None and not k.task.done():
            k.task.cancel()  # cancels the shard call; _ended gives the slot back

    async def close(self) -> None:
        tasks = [k.task for k in self.kept.values() if k.task is not None and not k.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- GET /v1/streams/{id} ----

_EVENT_ID = re.compile(r"([0-9a-f]{32})\.([0-9]{1,9})")


def _resume_point(request: Request, k: Kept) -> int:
    """Where to resume: after the Last-Event-ID a reconnecting EventSource sends, else after `?after=N`, else
    from the start. The header wins: EventSource keeps the first URL but updates the header."""
    last_event_id = request.headers.get("last-event-id", "").strip()
    if last_event_id:
        m = _EVENT_ID.fullmatch(last_event_id)
        if not m or m.group(1) != k.id:
            raise ApiError(422, f"Last-Event-ID: expected {k.id}.<n>, got {last_event_id[:80]!r}")
        after = int(m.group(2))
    else:
        raw = request.query_params.get("after", "0")
        if not raw.isdigit() or len(raw) > 9:
            raise ApiError(422, f"after: expected a number of events, got {raw[:80]!r}")
        after = int(raw)
    if after > k.last:
        raise ApiError(422, f"after: the stream has {k.last} events so far, got {after}")
    return after


async def resume_stream(request: Request) -> Response:
    from .sse import Follow  # sse imports this module for the store

    store: StreamStore = request.app.state.streams
    k = store.get(request.path_params["id"], owner_of(request.headers))
    if k is None:
        raise ApiError(404, "no such stream: unknown, expired, or started with another API key", "not_found")
    after = _resume_point(request, k)
    try:
        k.since(after)
    except Gone as exc:
        raise ApiError(410, f"{exc}: the stream's buffer dropped them", "gone") from None
    if k.finished and after == k.last:
        # 204 tells a browser EventSource to stop reconnecting: there is nothing more, ever.
        return Response(status_code=204)
    store.metrics.stream_resumes.inc()
    return Follow(store, k, after)
