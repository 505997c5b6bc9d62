"""Background responses (`background: true`): the generation runs as a task of its own, not tied to the
request that started it. Every event it makes is kept in order (`sequence_number` is the index), so any
number of readers can follow it from any point (`GET /v1/responses/{id}?stream=true&starting_after=N`)
with no gap and no repeat, and `cancel` stops it. While it runs it counts against
`--max-concurrent-requests` like any request in flight, so shutdown drains it too.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from .admission import Load
from .metrics import Metrics

log = logging.getLogger("sluice.router")


class BackgroundRun:
    def __init__(self, queued: dict, on_cancel: Callable[[], dict]) -> None:
        self.events: list[dict] = []
        self.latest = queued  # the response as its last lifecycle event showed it (what a poll sees)
        self.done = False
        self._on_cancel = on_cancel  # the cancelled response, kept as the final one
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self, events: AsyncIterator[dict], load: Load, metrics: Metrics) -> None:
        # Counted from here, while the request that starts it is still admitted: there is no gap.
        load.in_flight += 1
        metrics.in_flight.inc()
        self._task = asyncio.create_task(self._drive(events, load, metrics))

    async def _drive(self, events: AsyncIterator[dict], load: Load, metrics: Metrics) -> None:
        try:
            async for event in events:
                self._append(event)
        except asyncio.CancelledError:
            self.latest = self._on_cancel()
        except Exception:  # noqa: BLE001 - a task nobody awaits: log, and end the run
            log.exception("background response failed")
        finally:
            load.in_flight -= 1
            metrics.in_flight.dec()
            self.done = True
            self._wake.set()

    def _append(self, event: dict) -> None:
        self.events.append(event)
        if isinstance(event.get("response"), dict):
            self.latest = event["response"]
        self._wake.set()
        self._wake = asyncio.Event()

    async def follow(self, after: int = -1) -> AsyncIterator[dict]:
        """The events after sequence number `after`, then each new one as it comes, until the run ends."""
        index = after + 1
        while True:
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.done:
                return
            await self._wake.wait()

    async def cancel(self) -> None:
        if self._task is not None and not self.done:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
