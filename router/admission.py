"""Admission control in front of every route: API key, draining, the concurrency limit (429), request ids."""
from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from sluice.logs import METADATA_KEY, REQUEST_ID

from .errors import error_response
from .metrics import Metrics

log = logging.getLogger("sluice.router")


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
