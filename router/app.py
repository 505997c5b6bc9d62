"""The HTTP side of Sluice: TGI and OpenAI routes over a pool of gRPC shards.

One request: the handler parses and validates the body (422 before any byte), turns messages or inputs
into prompt ids (chat template + tokenizer), builds a shard GenerateRequest, and answers with either a
Deferred JSON body or an EventStream of SSE events fed by TextGenerator.generate(). Admission (429) and
request metrics wrap every request in asgi.Admission; disconnects cancel the work in asgi's responses.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

import sluice

from . import constraints, schemas
from .body import parse
from .admission import Admission, Load
from .errors import ApiError, error_response
from .sse import Deferred, EventStream
from .config import RouterSettings
from .metrics import Metrics
from .shards import ShardError, ShardPool
from .jobs import Job, check_candidates, completion_prompt, openai_job, tgi_job
from .state import Router, router_of
from .textgen import Generation, IncompleteGeneration, Piece

log = logging.getLogger("sluice.router")



async def collect(router: Router, job: Job, hold_back: bool) -> Generation:
    """Run a whole generation for a non-streamed answer."""
    gen = Generation(prompt_tokens=len(job.request.input_ids))
    try:
        async for _ in router.textgen.generate(job.request, job.stops, hold_back, gen):
            pass
    except ShardError as exc:
        if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
            raise ApiError(422, str(exc)) from exc
        log.warning("generation failed: %s", exc)
        raise ApiError(500, str(exc), "generation") from exc
    except IncompleteGeneration as exc:
        log.warning("generation failed: %s", exc)
        raise ApiError(500, str(exc), "incomplete_generation") from exc
    return gen


async def guarded(events: AsyncIterator[dict | str], done: str | None = None) -> AsyncIterator[dict | str]:
    """Turn a failure mid-stream into a final error event: the status line (200) is long gone."""
    try:
        async for event in events:
            yield event
    except (ShardError, IncompleteGeneration) as exc:
        kind = "incomplete_generation" if isinstance(exc, IncompleteGeneration) else "generation"
        log.warning("stream failed: %s", exc)
        yield {"error": str(exc), "error_type": kind}
        if done:
            yield done
    except Exception as exc:
        log.exception("stream failed")
        yield {"error": f"internal error: {exc}", "error_type": "generation"}
    finally:
        await events.aclose()


def in_app(compute) -> Deferred:
    async def run() -> Response:
        try:
            return await compute()
        except ApiError as exc:
            return error_response(exc.status, exc.message, exc.error_type)

    return Deferred(run)


async def collect_all(router: Router, jobs: list[Job], hold_back: bool) -> list[Generation]:
    """Several generations at once (n choices, best_of candidates): they share the shard's batch."""
    return list(await asyncio.gather(*(collect(router, job, hold_back) for job in jobs)))


async def interleave(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """(index, piece) from several generations as each arrives; leaving early cancels them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[Piece]) -> None:
        try:
            async for piece in stream:
                queue.put_nowait((i, piece))
            queue.put_nowait((i, done))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- TGI routes ----


def tgi_details(gen: Generation, job: Job, streamed: bool) -> dict:
    details = {"finish_reason": gen.finish_reason, "generated_tokens": len(gen.tokens),
               "seed": gen.seed if job.sampled else None}
    if streamed:
        details["input_length"] = gen.prompt_tokens
    else:
        details.update(prefill=gen.prefill, tokens=gen.tokens)
        if job.request.top_n_tokens:
            details["top_tokens"] = gen.top_tokens
    return details


async def tgi_generate(request: Request) -> Response:
    body = await parse(request, schemas.GenerateRequest)
    return tgi_answer(router_of(request), body, as_list=False)


def tgi_answer(router: Router, body: schemas.GenerateRequest, as_list: bool) -> Response:
    job = tgi_job(router, body)
    p = body.parameters or schemas.Parameters()
    prefix = body.inputs if p.return_full_text else ""

    async def compute() -> Response:
        # best_of: that many sampled candidates; the answer is the one the model found likeliest.
        jobs = job.copies(p.best_of or 1)
        gens = await collect_all(router, jobs, hold_back=False)
        best = max(range(len(gens)), key=lambda i: gens[i].logprob_sum)
        gen = gens[best]
        out = {"generated_text": prefix + gen.text}
        if p.details:
            out["details"] = tgi_details(gen, jobs[best], streamed=False)
            if len(gens) > 1:
                out["details"]["best_of_sequences"] = [
                    {"generated_text": prefix + g.text, **tgi_details(g, j, streamed=False)}
                    for i, (g, j) in enumerate(zip(gens, jobs)) if i != best]
        return JSONResponse([out] if as_list else out, headers={"x-generated-tokens": str(len(gen.tokens))})

    return in_app(compute)


async def tgi_generate_stream(request: Request) -> Response:
    router = router_of(request)
    body = await parse(request, schemas.GenerateRequest)
    body.stream = True  # best_of and decoder_input_details are checked as for a stream
    return tgi_stream(router, body, tgi_job(router, body))


def tgi_stream(router: Router, body: schemas.GenerateRequest, job: Job) -> EventStream:
    p = body.parameters or schemas.Parameters()

    async def events() -> AsyncIterator[dict]:
        gen = Generation(prompt_tokens=len(job.request.input_ids))
        index = 0
        async for piece in router.textgen.generate(job.request, job.stops, False, gen):
            index += 1
            token = piece.token or router.textgen.token_dict(gen.tokens[-1]["id"] if gen.tokens else 0, 0.0, "")
            event = {"index": index, "token": token, "generated_text": None, "details": None}
            if job.request.top_n_tokens:
                event["top_tokens"] = piece.top_tokens or []
            if piece.finish_reason:
                event["generated_text"] = (body.inputs if p.return_full_text else "") + gen.text
                if p.details:
                    event["details"] = tgi_details(gen, job, streamed=True)
            yield event

    return EventStream(guarded(events()))


async def tgi_compat(request: Request) -> Response:
    """`POST /`: TGI's original route, streaming or not as the body says; non-streamed answers are a list."""
    body = await parse(request, schemas.GenerateRequest)
    router = router_of(request)
    if body.stream:
        return tgi_stream(router, body, tgi_job(router, body))
    return tgi_answer(router, body, as_list=True)


# ---- OpenAI routes ----


def _usage(prompt_tokens: int, gens: list[Generation]) -> dict:
    # The prompt is counted once however many choices share it, as OpenAI does.
    completion = sum(len(g.tokens) for g in gens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _openai_finish(reason: str | None, tool_calls: bool = False) -> str | None:
    if tool_calls and reason in ("eos_token", "stop_sequence"):
        return "tool_calls"
    return {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}.get(reason) if reason else None


def _chat_logprobs(pieces: list[tuple[dict, list[dict] | None]]) -> dict:
    def entry(token: dict) -> dict:
        return {"token": token["text"], "logprob": token["logprob"], "bytes": list(token["text"].encode())}

    return {"content": [{**entry(t), "top_logprobs": [entry(x) for x in top or []]} for t, top in pieces]}


def _chat_grammar(body: schemas.ChatCompletionRequest) -> tuple[str, list[dict], bool]:
    """(grammar, the functions offered, whether the answer is a tool call under constraints.tools_grammar)."""
    if body.tools and body.response_format and body.response_format.type != "text":
        raise ApiError(422, "response_format: cannot be combined with tools")
    if body.tools:
        choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice
        functions, allow_text = constraints.chosen_tools([t.model_dump() for t in body.tools], choice)
        if functions:
            return constraints.tools_grammar(functions, allow_text), functions, allow_text
    elif body.tool_choice not in (None, "none", "auto"):
        raise ApiError(422, "tool_choice: needs tools")
    if body.response_format:
        return constraints.response_format_grammar(body.response_format.model_dump()) or "", [], False
    return "", [], False


async def chat_completions(request: Request) -> Response:
    router = router_of(request)
    body = await parse(request, schemas.ChatCompletionRequest)
    grammar, functions, allow_text = _chat_grammar(body)
    tool_system = constraints.tool_system_prompt(functions, allow_text) if functions else None
    prompt = router.chat_prompt(body.messages, functions or None, tool_system)
    ids = router.encode(prompt, add_special_tokens=False)  # the template already placed them
    if body.top_logprobs and not body.logprobs:
        raise ApiError(422, "top_logprobs: needs logprobs to be true")
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    job = openai_job(router, body, ids, prompt, body.max_completion_tokens or body.max_tokens, top_n, grammar)
    job.tools = bool(functions)
    jobs = job.copies(body.n or 1)
    base = {"id": f"chatcmpl-{job.request.request_id}", "created": int(time.time()), "model": router.model_id,
            "system_fingerprint": f"sluice-{sluice.__version__}"}

    def message(gen: Generation) -> tuple[dict, bool]:
        if not job.tools:
            return {"role": "assistant", "content": gen.text}, False
        content, calls = constraints.parse_tool_call(gen.text)
        return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}, bool(calls)

    if not body.stream:
        async def compute() -> Response:
            gens = await collect_all(router, jobs, hold_back=True)
            choices = []
            for i, gen in enumerate(gens):
                msg, called = message(gen)
                logprobs = _chat_logprobs(list(zip(gen.tokens, gen.top_tokens or [None] * len(gen.tokens))))
                choices.append({"index": i, "message": msg, "logprobs": logprobs if body.logprobs else None,
                                "finish_reason": _openai_finish(gen.finish_reason, called)})
            return JSONResponse({**base, "object": "chat.completion", "choices": choices,
                                 "usage": _usage(len(ids), gens)})

        return in_app(compute)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk = {**base, "object": "chat.completion.chunk"}
    if include_usage:
        chunk["usage"] = None

    def choice(index: int, delta: dict, piece: Piece | None = None, finish: str | None = None) -> dict:
        lp = _chat_logprobs([(piece.token, piece.top_tokens)]) if body.logprobs and piece and piece.token else None
        return {**chunk, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

    async def events() -> AsyncIterator[dict | str]:
        gens = [Generation(prompt_tokens=len(ids)) for _ in jobs]
        for i in range(len(jobs)):
            yield choice(i, {"role": "assistant", "content": ""})
        streams = [router.textgen.generate(j.request, j.stops, True, g) for j, g in zip(jobs, gens)]
        async for i, piece in interleave(streams):
            if job.tools:
                # A tool call is only known once its JSON is complete: it goes out whole, in one delta
                # (OpenAI's format; clients accumulate deltas, so one is as good as many).
                if piece.finish_reason:
                    msg, called = message(gens[i])
                    delta = {"tool_calls": [{"index": 0, **c} for c in msg["tool_calls"]]} if called else \
                        {"content": msg["content"]}
                    yield choice(i, delta, None, _openai_finish(piece.finish_reason, called))
            elif piece.finish_reason:
                yield choice(i, {"content": piece.text} if piece.text else {}, piece, _openai_finish(piece.finish_reason))
            elif piece.text:
                yield choice(i, {"content": piece.text}, piece)
        if include_usage:
            yield {**chunk, "choices": [], "usage": _usage(len(ids), gens)}
        yield "[DONE]"

    return EventStream(guarded(events(), done="[DONE]"))


def _completion_logprobs(tokens: list[dict], tops: list[list[dict]] | None, offset: int) -> dict:
    """OpenAI's legacy shape: parallel lists, `text_offset` counting characters from the start of the
    returned text's context (the prompt's end, or its start when echoed)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t["text"])
    return {"tokens": [t["text"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{x["text"]: x["logprob"] for x in top} if top is not None else None for top in tops]
            if tops else None,
            "text_offset": offsets}


async def completions(request: Request) -> Response:
    router = router_of(request)
    body = await parse(request, schemas.CompletionRequest)
    ids, prompt = completion_prompt(router, body.prompt)
    n, best_of = body.n or 1, body.best_of or body.n or 1
    temperature = 1.0 if body.temperature is None else body.temperature
    check_candidates(n, best_of, bool(body.stream), temperature > 0, router.settings.max_best_of,
                     greedy_candidates_ok=True)
    if body.echo and body.logprobs:
        raise ApiError(422, "logprobs: with echo only 0 is supported (prompt tokens come without alternatives)")
    echo_logprobs = bool(body.echo and body.logprobs is not None)
    job = openai_job(router, body, ids, prompt, body.max_tokens, body.logprobs or 0, prompt_logprobs=echo_logprobs)
    jobs = job.copies(best_of)
    echo = prompt if body.echo else ""
    base = {"id": f"cmpl-{job.request.request_id}", "created": int(time.time()), "model": router.model_id,
            "system_fingerprint": f"sluice-{sluice.__version__}"}

    def logprobs(gen: Generation) -> dict | None:
        if body.logprobs is None:
            return None
        if echo_logprobs:  # the prompt's tokens first, the first of them without a logprob
            return _completion_logprobs(gen.prefill + gen.tokens, None, 0)
        return _completion_logprobs(gen.tokens, gen.top_tokens, len(prompt))

    if not body.stream:
        async def compute() -> Response:
            gens = await collect_all(router, jobs, hold_back=True)
            # best_of: keep the n likeliest candidates; usage counts every token generated.
            kept = sorted(gens, key=lambda g: -g.logprob_sum)[:n] if best_of > n else gens
            choices = [{"index": i, "text": echo + g.text,
                        "logprobs": logprobs(g),
                        "finish_reason": _openai_finish(g.finish_reason)} for i, g in enumerate(kept)]
            return JSONResponse({**base, "object": "text_completion", "choices": choices,
                                 "usage": _usage(len(ids), gens)})

        return in_app(compute)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[dict | str]:
        gens = [Generation(prompt_tokens=len(ids)) for _ in jobs]
        offsets = [len(prompt)] * len(jobs)
        first = [True] * len(jobs)
        streams = [router.textgen.generate(j.request, j.stops, True, g) for j, g in zip(jobs, gens)]
        async for i, piece in interleave(streams):
            text = (echo if first[i] else "") + piece.text
            token = piece.token or router.textgen.token_dict(0, 0.0, "")
            lp = None
            if body.logprobs is not None:
                tokens = [token]
                if first[i] and echo_logprobs:
                    tokens = gens[i].prefill + tokens
                    offsets[i] = 0
                lp = _completion_logprobs(tokens, [piece.top_tokens] if piece.top_tokens else None, offsets[i])
                offsets[i] += sum(len(t["text"]) for t in tokens)
            first[i] = False
            chunk = {**base, "object": "text_completion",
                     "choices": [{"index": i, "text": text, "logprobs": lp,
                                  "finish_reason": _openai_finish(piece.finish_reason)}],
                     # TGI's token object too: the JS @huggingface/inference stream reads `r.token.text`.
                     "token": {**token, "text": text}}
            if piece.finish_reason:
                chunk["generated_text"] = echo + gens[i].text
            if include_usage:
                chunk["usage"] = None
            yield chunk
        if include_usage:
            yield {**base, "object": "text_completion", "choices": [], "usage": _usage(len(ids), gens)}
        yield "[DONE]"

    return EventStream(guarded(events(), done="[DONE]"))


async def models(request: Request) -> Response:
    router = router_of(request)
    return JSONResponse({"object": "list", "data": [
        {"id": router.model_id, "object": "model", "created": 0, "owned_by": "sluice"}]})


# ---- service routes ----


async def health(request: Request) -> Response:
    replies = await router_of(request).pool.health()
    shards = [{"address": replica.address, "ok": bool(r and r.ok), "running": r.running if r else None,
               "waiting": r.waiting if r else None} for replica, r in zip(router_of(request).pool.replicas, replies)]
    if not any(s["ok"] for s in shards):
        return JSONResponse({"error": "no shard answered its health check", "error_type": "unhealthy",
                             "shards": shards}, status_code=503)
    return JSONResponse({"status": "ok", "shards": shards})


async def info(request: Request) -> Response:
    router = router_of(request)
    s, shard = router.settings, router.pool.info
    return JSONResponse({
        "model_id": router.model_id,
        "model_sha": None,
        "model_dtype": shard.dtype,
        "model_device_type": shard.device,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": s.max_concurrent_requests,
        "max_best_of": s.max_best_of,
        "max_stop_sequences": s.max_stop_sequences,
        "max_input_tokens": s.max_input_tokens,
        "max_total_tokens": s.max_total_tokens,
        "max_top_n_tokens": s.max_top_n_tokens,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "num_shard": sum(r.info.num_shard or 1 for r in router.pool.replicas if r.info),
        "num_replicas": len(router.pool.replicas),
        "router": "sluice",
        "version": sluice.__version__,
        "sha": None,
        "docker_label": None,
    })


async def tokenize(request: Request) -> Response:
    router = router_of(request)
    body = await parse(request, schemas.TokenizeRequest)
    enc = router.tokenizer(body.inputs, add_special_tokens=True, return_offsets_mapping=True)
    return JSONResponse([
        {"id": i, "text": body.inputs[a:b], "start": a, "stop": b}
        for i, (a, b) in zip(enc.input_ids, enc.offset_mapping)
    ])


async def metrics(request: Request) -> Response:
    router = router_of(request)
    router.metrics.batch_size.set(sum(r.running for r in router.pool.replicas if r.healthy))
    return Response(router.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def openapi_schema() -> dict:
    """The OpenAPI document, built from ENDPOINTS (so it cannot miss a route)."""
    errors = {"422": {"description": "validation error"}, "429": {"description": "overloaded"}}
    paths = {}
    for e in ENDPOINTS:
        op: dict = {"summary": e.summary, "responses": dict(RESPONSES[e.kind])}
        if e.body is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": e.body.model_json_schema()}}}
            op["responses"].update(errors)
        paths[e.path] = {e.method.lower(): op}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Sluice", "version": sluice.__version__,
                 "description": "TGI- and OpenAI-compatible text generation"},
        "paths": paths,
    }


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_schema())


async def docs(request: Request) -> Response:
    return HTMLResponse('<!doctype html><title>Sluice API</title><p>The OpenAPI description is at '
                        '<a href="/openapi.json">/openapi.json</a>.</p>')


@dataclass(frozen=True)
class Endpoint:
    """One route: the single table that Starlette's routes, Admission's route sets and the OpenAPI document
    all read."""

    path: str
    method: str
    handler: Callable[[Request], Awaitable[Response]]
    summary: str
    body: type[BaseModel] | None = None
    kind: str = "json"  # the OpenAPI responses: json, sse, both (json or sse), html
    generation: bool = False  # counted against max_concurrent_requests by Admission


_OK = {"200": {"description": "OK", "content": {"application/json": {}}}}
_SSE = {"200": {"description": "server-sent events", "content": {"text/event-stream": {}}}}
RESPONSES = {"json": _OK, "sse": _SSE, "both": {**_OK, **_SSE},
             "html": {"200": {"description": "OK", "content": {"text/html": {}}}}}

ENDPOINTS: list[Endpoint] = [
    Endpoint("/", "POST", tgi_compat, "TGI generate; streams when `stream` is true", schemas.GenerateRequest,
             generation=True),
    Endpoint("/generate", "POST", tgi_generate, "TGI generate", schemas.GenerateRequest, generation=True),
    Endpoint("/generate_stream", "POST", tgi_generate_stream, "TGI generate, streamed", schemas.GenerateRequest,
             "sse", generation=True),
    Endpoint("/v1/chat/completions", "POST", chat_completions, "OpenAI chat completions",
             schemas.ChatCompletionRequest, "both", generation=True),
    Endpoint("/v1/completions", "POST", completions, "OpenAI completions", schemas.CompletionRequest, "both",
             generation=True),
    Endpoint("/tokenize", "POST", tokenize, "TGI tokenize", schemas.TokenizeRequest),
    Endpoint("/v1/models", "GET", models, "the served model"),
    Endpoint("/health", "GET", health, "200 when a shard answers its health check, else 503"),
    Endpoint("/info", "GET", info, "model and limits"),
    Endpoint("/metrics", "GET", metrics, "Prometheus metrics"),
    Endpoint("/openapi.json", "GET", openapi, "this document"),
    Endpoint("/docs", "GET", docs, "a page pointing at this document", kind="html"),
]
GENERATION_ROUTES = {e.path for e in ENDPOINTS if e.generation}


async def on_api_error(request: Request, exc: ApiError) -> Response:
    # After a 413 the rest of the body is unread: close rather than read it to reach the next request.
    return error_response(exc.status, exc.message, exc.error_type, {"Connection": "close"} if exc.status == 413 else None)


def create_app(settings: RouterSettings, pool: ShardPool | None = None) -> Starlette:
    """The app. With `pool` (the test seam), it serves through that pool instead of connecting its own."""
    metrics_ = Metrics()
    router = Router(settings, metrics_, pool)
    load = Load()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await router.start()
        try:
            yield
        finally:
            if router.owns_pool and router.pool is not None:
                await router.pool.close()

    routes = [Route(e.path, e.handler, methods=[e.method]) for e in ENDPOINTS]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={ApiError: on_api_error})
    app.state.router = router
    app.state.load = load
    app.add_middleware(Admission, metrics=metrics_, limit=settings.max_concurrent_requests,
                       generation_routes=GENERATION_ROUTES, known_routes={r.path for r in routes},
                       api_key=settings.api_key, load=load)
    return app


from .server import serve  # noqa: E402  (sluice.cli imports it from here)

__all__ = ["create_app", "serve"]
