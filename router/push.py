"""A generation's event stream, made and sent as the shard's replies arrive.

A route describes its stream as a plan (StreamPlan): the events it opens with, those each generated piece
becomes, and those it closes with. `event_stream` runs the plan. A stream of one generation is pushed
(PushedStream): the replica's stream reader hands each reply to the pool's callbacks (pool.PoolGeneration),
which make its pieces (generation.PieceMaker), the plan's events, their SSE frames, and write them to the
connection (sse.Writer), all in that one call. No task wakes and no chain of async generators runs a
token: those cost ~40 of the router's ~100 us of CPU a token at 16 streams, on the two cores the engine
needs (bench/RESULTS.md, sessions 30 and 31). Several generations in one stream (n choices), and resumable
streams, which keep their events in a store, run the same plan as async iterators through sse.EventStream.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from starlette.types import Receive, Scope, Send

from . import deadline
from .contract import Reply
from .generation import SHARD_WENT_AWAY, Generation, IncompleteGeneration, Piece, PieceMaker, error_events, guarded, \
    interleave
from .pool import PoolGeneration, ShardError
from .sse import END, EventStream, Writer, body_send_of, keepalive_s, resumable_store, sse_event, start_message, \
    unless_disconnected

if TYPE_CHECKING:  # state imports generation, which this module imports
    from .jobs import Job
    from .state import Router

log = logging.getLogger("sluice.router")


class StreamPlan(Protocol):
    """What a route's stream is made of, event by event (dicts become JSON, strings are sent as they are)."""

    gens: list[Generation]  # one per job, filled as the pieces come
    done: str | None  # what ends the stream after an error event too (OpenAI's `[DONE]`), if anything

    def opening(self) -> list[dict | str]: ...

    def piece(self, index: int, piece: Piece) -> list[dict | str]: ...

    def closing(self) -> list[dict | str]: ...


def event_stream(router: Router, jobs: list[Job], plan: StreamPlan, hold_back: bool) -> PushedStream | EventStream:
    """The response that streams `plan` for `jobs` (validated already: nothing here answers 422)."""
    if len(jobs) == 1:
        return PushedStream(router, jobs[0], plan, hold_back)
    return EventStream(guarded(planned_events(router, jobs, plan, hold_back), plan.done))


async def planned_events(router: Router, jobs: list[Job], plan: StreamPlan, hold_back: bool
                         ) -> AsyncIterator[dict | str]:
    """The plan's events as an async iterator, the generations' pieces as each arrives."""
    for event in plan.opening():
        yield event
    streams = [router.textgen.generate(job.request, job.stops, hold_back, gen) for job, gen in zip(jobs, plan.gens)]
    async for index, piece in interleave(streams):
        for event in plan.piece(index, piece):
            yield event
    for event in plan.closing():
        yield event


class PushedStream:
    """One generation's event stream, pushed (see the module's docstring). Its request's task only sends the
    start, then waits for the end (or the client's disconnect, which cancels the generation); the replies'
    callbacks run in the request's context, as the task would have run them. A deadline is a timer. A
    failure after the start is the plan's error events (generation.error_events), as `guarded` makes them."""

    def __init__(self, router: Router, job: Job, plan: StreamPlan, hold_back: bool) -> None:
        self.router, self.job, self.plan, self.hold_back = router, job, plan, hold_back

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if resumable_store(scope) is not None:  # its events go to the store: the async path (module docstring)
            events = planned_events(self.router, [self.job], self.plan, self.hold_back)
            return await EventStream(guarded(events, self.plan.done))(scope, receive, send)
        self.stream_id, self.event_count = uuid.uuid4().hex, 0
        await send(start_message(self.stream_id))
        loop = asyncio.get_running_loop()
        self.body_send = body_send_of(scope, send)
        self.writer = Writer(self.body_send, keepalive_s(scope))
        self.ended = loop.create_future()
        self.context = contextvars.copy_context()
        self.pieces = PieceMaker(self.router.textgen, self.job.request, self.job.stops, self.hold_back,
                                 self.plan.gens[0])
        self.call: PoolGeneration | None = None
        timer = None
        try:
            self._write(self.plan.opening())
            try:
                self.call = self.router.pool.start(self.job.request, self._on_reply, self._on_end)
            except ShardError as exc:
                self._fail(exc)
            at = deadline.AT.get()
            if at is not None and not self.ended.done():
                timer = loop.call_at(loop.time() + at - time.monotonic(), self._fail,
                                     IncompleteGeneration(deadline.PASSED), context=self.context)
            await unless_disconnected(receive, self._finish())
        finally:
            if timer is not None:
                timer.cancel()
            if self.call is not None:
                self.call.cancel()
            self.pieces.close()
            await self.writer.close()

    async def _finish(self) -> None:
        await self.ended
        await self.writer.flush()
        await self.writer.close()  # no keep-alive after the end
        await self.body_send(END)

    def _on_reply(self, reply: Reply) -> None:
        self.context.run(self._reply, reply)

    def _on_end(self, error: Exception | None) -> None:
        self.context.run(self._fail, IncompleteGeneration(SHARD_WENT_AWAY) if error is None else error)

    def _reply(self, reply: Reply) -> None:
        if self.ended.done():
            return
        try:
            events = []
            for piece in self.pieces.add(reply):
                events += self.plan.piece(0, piece)
            if self.pieces.finished:
                events += self.plan.closing()
        except Exception as exc:  # noqa: BLE001 - the stream's last event says so
            return self._fail(exc)
        self._write(events)
        if self.pieces.finished:
            self._end()

    def _fail(self, exc: Exception) -> None:
        if not self.ended.done():
            self._write(error_events(exc, self.plan.done))
            self._end()

    def _end(self) -> None:
        if self.call is not None:
            self.call.cancel()  # a stop sequence ends it before the shard does
        self.ended.set_result(None)

    def _write(self, events: list[dict | str]) -> None:
        if events:
            frames = []
            for event in events:
                self.event_count += 1
                frames.append(sse_event(event, None, f"{self.stream_id}.{self.event_count}"))
            self.writer.write(b"".join(frames))
