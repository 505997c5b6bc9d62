"""The HTTP side of Sluice: TGI and OpenAI routes over a pool of gRPC shards.

This module holds the route table (ENDPOINTS: Starlette's routes, Admission's route sets and the OpenAPI
document all read it) and create_app. A request's path: body.parse (413/422) -> jobs (rules, shard
request) -> tgi/openai (the dialect's answer: JSON over generation.collect, or a stream, push.event_stream,
its replies pushed from pool.ShardPool through generation.PieceMaker). Service routes are in service.py.
"""
from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import schemas
from .admission import BODY_SEND, Admission, Load
from .config import RouterSettings
from .body import DiscardRestOfBody
from .errors import ApiError, error_response
from .metrics import Metrics
from .openai import chat_completions, completions
from .page import demo_page
from .pool import ShardPool
from .response_store import ResponseStore
from .responses import cancel_response, create_response, delete_response, list_input_items, retrieve_response
from .responses_schemas import ResponsesRequest
from .service import docs, health, info, metrics, models, openapi, openapi_schema, tokenize
from .state import Router
from .streams import StreamStore, resume_stream
from .tenants import Tenants
from .tgi import tgi_compat, tgi_generate, tgi_generate_stream


@dataclass(frozen=True)
class Endpoint:
    """One route: the single table that Starlette's routes, Admission's route sets and the OpenAPI document
    all read."""

    path: str
    method: str
    handler: Callable[[Request], Awaitable[Response]]
    summary: str
    body: type[BaseModel] | None = None
    kind: str = "json"  # what 200 answers: json, sse, both (json or sse), html, text
    generation: bool = False  # counted against max_concurrent_requests by Admission
    returns: str | None = None  # the JSON body's schema: a name in openapi.ANSWERS
    events: str | None = None  # a stream's events: a name in openapi.EVENTS


ENDPOINTS: list[Endpoint] = [
    Endpoint("/", "POST", tgi_compat, "TGI generate; streams when `stream` is true", schemas.GenerateRequest,
             "both", generation=True, returns="GenerateResponses", events="TgiEvent"),
    Endpoint("/", "GET", demo_page, "the streaming demo page, for browsers", kind="html"),
    Endpoint("/generate", "POST", tgi_generate, "TGI generate", schemas.GenerateRequest, generation=True,
             returns="GenerateResponse"),
    Endpoint("/generate_stream", "POST", tgi_generate_stream, "TGI generate, streamed", schemas.GenerateRequest,
             "sse", generation=True, events="TgiEvent"),
    Endpoint("/v1/chat/completions", "POST", chat_completions, "OpenAI chat completions",
             schemas.ChatCompletionRequest, "both", generation=True, returns="ChatCompletion",
             events="ChatCompletionEvent"),
    Endpoint("/v1/completions", "POST", completions, "OpenAI completions", schemas.CompletionRequest, "both",
             generation=True, returns="Completion", events="CompletionEvent"),
    Endpoint("/v1/responses", "POST", create_response, "OpenAI Responses: create (streamed as typed events)",
             ResponsesRequest, "both", generation=True, returns="Response", events="ResponseEvent"),
    Endpoint("/v1/responses/{response_id}", "GET", retrieve_response,
             "a stored response; with ?stream=true a background one's events", kind="both", returns="Response",
             events="ResponseEvent"),
    Endpoint("/v1/responses/{response_id}", "DELETE", delete_response, "delete a stored response",
             returns="ResponseDeleted"),
    Endpoint("/v1/responses/{response_id}/cancel", "POST", cancel_response, "cancel a background response",
             returns="Response"),
    Endpoint("/v1/responses/{response_id}/input_items", "GET", list_input_items, "a stored response's input items",
             returns="ResponseInputItems"),
    Endpoint("/v1/streams/{id}", "GET", resume_stream, "a resumable stream's events after Last-Event-ID "
             "(or ?after=N), then the rest live", kind="sse"),
    Endpoint("/tokenize", "POST", tokenize, "TGI tokenize", schemas.TokenizeRequest, returns="Tokens"),
    Endpoint("/v1/models", "GET", models, "the served model", returns="Models"),
    Endpoint("/health", "GET", health, "200 when a shard answers its health check, else 503", returns="Health"),
    Endpoint("/info", "GET", info, "model and limits", returns="Info"),
    Endpoint("/metrics", "GET", metrics, "Prometheus metrics (text exposition format)", kind="text"),
    Endpoint("/openapi.json", "GET", openapi, "this document", returns="OpenAPI"),
    Endpoint("/docs", "GET", docs, "a page pointing at this document", kind="html"),
]
GENERATION_ROUTES = {e.path for e in ENDPOINTS if e.generation}
# Answered without an API key: probes, scrapers, and the demo page (which asks for the key itself).
OPEN_ROUTES = {("GET", "/health"), ("GET", "/metrics"), ("GET", "/")}


async def _by_method(handlers: dict[str, Callable], request: Request) -> Response:
    # Starlette answers HEAD on GET routes (and only lets through the methods the route lists).
    return await handlers["GET" if request.method == "HEAD" else request.method](request)


async def on_api_error(request: Request, exc: ApiError) -> Response | DiscardRestOfBody:
    # After a 413 the rest of the body is unread: close rather than read it all to reach the next request.
    response = error_response(request.scope["path"], exc.status, exc.message, exc.error_type,
                              {"Connection": "close"} if exc.status == 413 else None)
    return DiscardRestOfBody(response) if exc.unread_body else response


async def on_http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (an unknown path, a method the path does not take) as JSON, never plain
    text: TGI's client decodes every error body as JSON."""
    path = request.scope["path"]
    kinds = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"no route {path}", 405: f"{request.method} is not allowed on {path}"}.get(exc.status_code,
                                                                                               exc.detail)
    return error_response(path, exc.status_code, message, kinds.get(exc.status_code, "validation"), exc.headers)


class RouterApp(Starlette):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The server's own send: a stream's events go there, past the middleware's wrappers, which only
        # watch the response's start (sse.body_send_of).
        scope[BODY_SEND] = send
        await super().__call__(scope, receive, send)


def create_app(settings: RouterSettings, pool: ShardPool | None = None) -> Starlette:
    """The app. With `pool` (the test seam), it serves through that pool instead of connecting its own."""
    metrics_ = Metrics()
    router = Router(settings, metrics_, pool)
    load = Load()
    streams = StreamStore(settings, metrics_, load)
    tenants = Tenants(settings.api_key, settings.api_keys_file, metrics_)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await router.start()
        try:
            yield
        finally:
            await streams.close()
            if router.owns_pool and router.pool is not None:
                await router.pool.close()

    # One Starlette route per path, so that a 405's Allow header names every method the path takes.
    by_path: dict[str, dict[str, Callable]] = {}
    for e in ENDPOINTS:
        by_path.setdefault(e.path, {})[e.method] = e.handler
    routes = [Route(path, partial(_by_method, handlers), methods=list(handlers)) for path, handlers in by_path.items()]
    app = RouterApp(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: on_api_error, HTTPException: on_http_error})
    app.state.router = router
    app.state.load = load
    app.state.responses = ResponseStore(settings.responses_store_max, settings.responses_store_bytes)
    app.state.streams = streams
    app.state.tenants = tenants  # server.py rereads the keys file on SIGHUP
    app.add_middleware(Admission, metrics=metrics_, limit=settings.max_concurrent_requests,
                       generation_routes=GENERATION_ROUTES, known_routes={r.path for r in routes},
                       tenants=tenants, load=load, open_routes=OPEN_ROUTES)
    return app


from .server import serve  # noqa: E402  (sluice.cli imports it from here)

__all__ = ["ENDPOINTS", "GENERATION_ROUTES", "create_app", "openapi_schema", "serve"]
