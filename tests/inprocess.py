"""A real shard and a real router inside the test process, for the in-process router tier (tests/router).

The shard is the engine (its step loop in a thread of its own) behind the shard's own gRPC server (another
thread, its own event loop) on a Unix socket. The router is `create_app` with its own ShardPool dialling that
socket, so every request crosses real gRPC; its Starlette app runs on an event loop in a third thread and is
driven by httpx.AsyncClient over ASGITransport, inside the app's lifespan. `InProcessRouter.post/get/request`
block until the whole response is in (ASGITransport buffers it), so tests read like the e2e ones: the rules
of the whole path, with no port and no subprocess. What needs a socket (disconnects, backpressure, 413 on
unsent bytes), a signal or a real client stays in tests/e2e.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import httpx

from servers import parse_metrics

TIMEOUT_S = 300  # per request: a hang detector, not a timing assertion


class InProcessShard:
    """`sluice shard` without the process: the same engine and servicer, listening on `<tmp>/shard.sock`."""

    def __init__(self, tmp: Path, model_id: str | None = None, **settings) -> None:
        from shard.launch import build_engine
        from shard.servicer import GrpcServer
        from shard.settings import ShardSettings
        from sluice.modelfiles import resolve

        self.model_id = model_id
        self.address = f"unix://{tmp / 'shard.sock'}"
        # Eager, as the e2e servers run (COMPILE=0 in tests/conftest.py): a background compile would spend
        # minutes of the test process's cores on speed no test here measures.
        settings.setdefault("compile", False)
        shard_settings = ShardSettings(model_id=model_id, address=self.address, **settings)
        source = resolve(model_id)
        self.engine = build_engine(shard_settings, source)
        self.engine.start()
        self.server = GrpcServer(self.engine, source, shard_settings)
        error = self.server.start()
        if error:
            self.engine.stop()
            raise RuntimeError(error)

    def stop(self) -> None:
        self.server.stop()
        self.engine.stop()


class EventLoopThread:
    """One asyncio loop in a daemon thread: every in-process router of the session runs on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="router-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class InProcessRouter:
    """The router app over a real ShardPool to `shard`, with `flags` as RouterSettings fields."""

    def __init__(self, loop: EventLoopThread, shard: InProcessShard, **flags) -> None:
        from router.app import create_app
        from router.config import RouterSettings

        self.loop = loop
        self.settings = RouterSettings(model_id=shard.model_id, shard_addresses=[shard.address], **flags)
        self.app = create_app(self.settings)
        self._stack = contextlib.AsyncExitStack()
        self.client: httpx.AsyncClient = loop.run(self._start())

    async def _start(self) -> httpx.AsyncClient:
        await self._stack.enter_async_context(self.app.router.lifespan_context(self.app))
        transport = httpx.ASGITransport(app=self.app)
        return await self._stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url="http://router"))

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return self.loop.run(self.client.request(method, path, **kwargs))

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.get("/metrics").text)

    def close(self) -> None:
        self.loop.run(self._stack.aclose())
