"""Admission control in front of every route: API key and tenant, draining, the concurrency limits (429:
the server's, then the tenant's own), request ids."""
from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from sluice.logs import METADATA_KEY, REQUEST_ID

from . import deadline
from .errors import ApiError, error_response
from .metrics import Metrics
from .tenants import CURRENT, Tenants

log = logging.getLogger("sluice.router")


# A client's own id is kept when it is short and plain (it goes into logs and headers verbatim).
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


# The scope key of the server's own `send` (app.RouterApp puts it there): a stream's events go there, past
# the middleware's wrappers between it and the route (router/sse.py).
BODY_SEND = "sluice.body_send"


@dataclass
class Load:
    """Shared between Admission and the server's shutdown: what is in flight, and whether we drain."""

    in_flight: int = 0
    draining: bool = False


class Admission:
    """Counts every generation request from its first to its last byte (or error, or disconnect) and
    turns away those beyond the limit at once with 429, never queueing them. Also gives every request
    its id, keeps the request counters, refuses work while draining, and finds its tenant (router/tenants.py:
    the API key's, checked when keys are set), whose own limits it applies and whose metrics it keeps."""

    def __init__(self, app: ASGIApp, metrics: Metrics, limit: int, generation_routes: set[str],
                 known_routes: set[str], tenants: Tenants, load: Load, open_routes: set[tuple[str, str]]) -> None:
        self.app = app
        self.metrics = metrics
        self.limit = limit
        self.generation_routes = generation_routes
        self.known_routes = known_routes
        self.tenants = tenants
        self.load = load
        self.open_routes = open_routes  # (method, path) answered without a key: health, metrics, the demo page

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

        generation = scope["method"] == "POST" and path in self.generation_routes
        usage = None
        try:
            if (scope["method"], path) not in self.open_routes:
                tenant = self.tenants.identify(headers)
                if isinstance(tenant, str):  # why there is none
                    code, kind = (401, "authentication") if self.tenants.auth_required else (422, "validation")
                    return await error_response(path, code, tenant, kind)(scope, receive, send_and_note)
                usage = self.tenants.usage_of(tenant)
            if self.load.draining and path != "/metrics":
                # 503 (not 429) on purpose: load balancers take it, and /health's 503, as "go elsewhere".
                # Connection: close so that keep-alive clients reconnect to another instance.
                return await error_response(path, 503, "the server is shutting down; retry on another instance",
                                            "unavailable", {"Connection": "close"})(scope, receive, send_and_note)
            if not generation:
                return await self.app(scope, receive, send_and_note)
            refusal = None
            if self.load.in_flight >= self.limit:
                refusal = f"Model is overloaded: {self.limit} requests already in flight, try again shortly", 1
            refusal = refusal or self.tenants.refusal(usage, time.monotonic())
            if refusal:
                message, retry_after = refusal
                return await error_response(path, 429, message, "overloaded", {"Retry-After": str(retry_after)})(
                    scope, receive, send_and_note)
            try:
                at = deadline.parse_header(headers[deadline.DEADLINE_HEADER]) if deadline.DEADLINE_HEADER in headers \
                    else None
            except ApiError as exc:
                refused = error_response(path, exc.status, exc.message, exc.error_type)
                return await refused(scope, receive, send_and_note)
            # The handler, its stream and the shard request read the tenant and the deadline from here.
            tokens = CURRENT.set(usage), deadline.AT.set(at)
            try:
                await self._admitted(route, usage, scope, receive, send_and_note)
            finally:
                CURRENT.reset(tokens[0])
                deadline.AT.reset(tokens[1])
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            if generation:
                self.metrics.generation_finished(status)
                if status == 429 and usage is not None:
                    self.metrics.tenant_overloaded.labels(usage.label).inc()

    async def _admitted(self, route: str, usage, scope: Scope, receive: Receive, send: Send) -> None:
        self.load.in_flight += 1
        usage.in_flight += 1
        self.metrics.in_flight.inc()
        tenant_gauge = self.metrics.tenant_in_flight.labels(usage.label)
        tenant_gauge.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.load.in_flight -= 1
            usage.in_flight -= 1
            self.metrics.in_flight.dec()
            tenant_gauge.dec()
            self.metrics.duration.labels(route).observe(time.perf_counter() - start)
