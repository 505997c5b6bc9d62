"""OpenAI Responses API: `POST /v1/responses` (a JSON body, or typed events with `stream`), and for stored
responses `GET` / `DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items` and
`POST /v1/responses/{id}/cancel`.

A request's input (a string, or message / function_call / function_call_output items) continues the
conversation of its `previous_response_id`; the whole conversation is written as chat messages through
the model's chat template (state.Router.chat_prompt) and becomes one job (jobs.openai_job) under the same
constraints as chat (constraints.structure: `text.format`, function `tools`). The answer's `output` is one
message or one function_call item; response_events.py streams it as typed events, and background.py
runs it on its own (`background`: polled, followed again from any event, cancelled).
"""
from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import constraints, schemas
from .background import BackgroundRun
from .body import parse
from .errors import ApiError
from .contract import FinishReason
from .generation import Generation, collect, guarded, in_app
from .jobs import Job, openai_job
from .response_events import stream_events
from .response_store import ResponseStore, StoredResponse
from .openai import token_logprobs
from .responses_schemas import LOGPROBS, InputItem, ResponsesRequest
from .sse import EventStream
from .state import Router, router_of


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def owner_of(request: Request) -> str:
    """Whose store a request reads: its API key (hashed: the store never holds a key), or everyone's
    when the server has none."""
    return hashlib.sha256(request.headers.get("authorization", "").encode()).hexdigest()


def store_of(request: Request) -> ResponseStore:
    return request.app.state.responses


# ---- input: items, and the chat messages they become ----


def input_items(given: str | list[InputItem] | None) -> list[dict]:
    """The request's input as items with ids, as GET .../input_items lists them."""
    if isinstance(given, str):
        given = [InputItem(role="user", content=given)]
    items = []
    for item in given or []:
        kind = item.type or "message"
        if kind == "message":
            parts = item.content if isinstance(item.content, list) else \
                [schemas.ContentPart(type="output_text" if item.role == "assistant" else "input_text",
                                     text=item.content)]
            items.append({"id": item.id or new_id("msg"), "type": "message", "role": item.role,
                          "content": [{"type": p.type, "text": p.text or ""} for p in parts],
                          "status": item.status or "completed"})
        elif kind == "function_call":
            items.append({"id": item.id or new_id("fc"), "type": "function_call", "call_id": item.call_id,
                          "name": item.name, "arguments": item.arguments, "status": item.status or "completed"})
        else:
            output = item.output if isinstance(item.output, str) else "".join(p.text or "" for p in item.output)
            items.append({"id": item.id or new_id("fco"), "type": "function_call_output", "call_id": item.call_id,
                          "output": output, "status": item.status or "completed"})
    return items


def chat_messages(instructions: str | None, items: list[dict]) -> list[schemas.Message]:
    """The conversation as chat messages: instructions first (they are not carried over from a previous
    response, as at OpenAI), consecutive function calls as one assistant turn, outputs as tool turns."""
    messages = [schemas.Message(role="system", content=instructions)] if instructions else []
    for item in items:
        if item["type"] == "message":
            text = "".join(p["text"] for p in item["content"])
            messages.append(schemas.Message(role=item["role"], content=text))
        elif item["type"] == "function_call":
            call = schemas.ToolCall(id=item["call_id"], function=schemas.FunctionCall(
                name=item["name"], arguments=item["arguments"]))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls:
                last.tool_calls.append(call)
            else:
                messages.append(schemas.Message(role="assistant", tool_calls=[call]))
        else:
            messages.append(schemas.Message(role="tool", content=item["output"], tool_call_id=item["call_id"]))
    return messages


def responses_structure(body: ResponsesRequest) -> constraints.Structure:
    functions = [schemas.Function(name=t.name, description=t.description, parameters=t.parameters).model_dump()
                 for t in body.tools or []]
    choice = body.tool_choice
    named = choice["name"] if isinstance(choice, dict) else None
    fmt = body.text.format if body.text else None
    return constraints.structure(functions, "function" if named else choice, named,
                                 partial(_format_grammar, fmt), bool(fmt and fmt.type != "text"), "text.format",
                                 body.parallel_tool_calls)


def _format_grammar(fmt) -> str | None:
    if fmt is None:
        return None
    spec = {"schema": fmt.schema_} if fmt.schema_ is not None else {}
    return constraints.format_grammar(fmt.type, spec, "text.format", "text.format.schema")


# ---- output: the response object ----


@dataclass
class Draft:
    """One response while it is made: its ids and what it echoes of the request; `object` renders it."""

    body: ResponsesRequest
    model: str
    prompt_tokens: int
    tools: bool  # the output is tool calls under constraints.tools_grammar
    id: str = field(default_factory=lambda: new_id("resp"))
    message_id: str = field(default_factory=lambda: new_id("msg"))
    # Each function_call item's (item id, call_id), by its place in the output, streamed or not.
    call_ids: list[tuple[str, str]] = field(default_factory=list)
    created_at: int = field(default_factory=lambda: int(time.time()))

    def object(self, status: str, output: list[dict], gen: Generation | None = None,
               error: dict | None = None) -> dict:
        b = self.body
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else \
            {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": self.model,
            "output": output,
            "parallel_tool_calls": b.parallel_tool_calls is True,  # what constraints.structure allowed
            "previous_response_id": b.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": b.store is not False,
            "temperature": 1.0 if b.temperature is None else b.temperature,
            "text": {"format": fmt},
            "tool_choice": b.tool_choice or "auto",
            "tools": [t.model_dump() for t in b.tools or []],
            "top_p": 1.0 if b.top_p is None else b.top_p,
            "truncation": "disabled",
            "usage": self.usage(gen) if gen is not None else None,
            "user": b.user, "metadata": b.metadata or {}, "background": bool(b.background),
        }

    def usage(self, gen: Generation) -> dict:
        return {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": len(gen.tokens), "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + len(gen.tokens)}

    def output(self, gen: Generation) -> list[dict]:
        """The finished output: function_call items (one per call), or one message (text, or a `no_tool`
        answer)."""
        status = self.status(gen)
        if self.tools:  # the tokens are the calls' JSON, not the text: no logprobs for a text answer
            content, calls = constraints.parse_tool_calls(gen.text)
            if calls:
                # Every call but the last is complete; the last one is as the generation ended.
                return [self.call(k, name, arguments, status if k == len(calls) - 1 else "completed")
                        for k, (name, arguments) in enumerate(calls)]
            return [self.message(content or "", status)]
        return [self.message(gen.text, status, self.logprobs(gen.tokens, gen.top_tokens))]

    def logprobs(self, tokens: list[dict], tops: list[list[dict]] | None) -> list[dict]:
        """The `include`d logprobs of some tokens (none unless asked for)."""
        if not self.body.logprobs:
            return []
        return token_logprobs(list(zip(tokens, tops or [None] * len(tokens))))

    def call_item(self, index: int) -> tuple[str, str]:
        """The output's `index`-th function call's (item id, call_id): made on first use, kept after."""
        while len(self.call_ids) <= index:
            self.call_ids.append((new_id("fc"), constraints.new_call_id()))
        return self.call_ids[index]

    def call(self, index: int, name: str, arguments: str, status: str) -> dict:
        item_id, call_id = self.call_item(index)
        return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id,
                "name": name, "arguments": arguments}

    def message(self, text: str, status: str, logprobs: list[dict] | None = None) -> dict:
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status,
                "content": [output_text(text, logprobs or [])] if status != "in_progress" else []}

    @staticmethod
    def status(gen: Generation) -> str:
        return "incomplete" if gen.finish_reason is FinishReason.LENGTH else "completed"


def output_text(text: str, logprobs: list[dict]) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


@dataclass
class Keeper:
    """Stores a finished response when the request asked for it (`store`, on by default)."""

    store: ResponseStore
    owner: str
    wanted: bool
    items: list[dict]
    context: list[dict]
    run: BackgroundRun | None = None

    def keep(self, response: dict) -> None:
        if self.wanted:
            record = StoredResponse(response, self.items, self.context + response["output"], self.run)
            self.store.put(self.owner, response["id"], record)


# ---- routes ----


async def create_response(request: Request) -> Response:
    router = router_of(request)
    body = await parse(request, ResponsesRequest)
    store, owner = store_of(request), owner_of(request)
    previous = _stored(store, owner, body.previous_response_id) if body.previous_response_id else None
    if previous is not None and previous.run is not None and not previous.run.done:
        raise ApiError(422, "previous_response_id: that response is still in progress (background)")
    items = input_items(body.input)
    if not items:
        raise ApiError(422, "input: must not be empty")
    context = (previous.context if previous else []) + items
    shape = responses_structure(body)
    prompt = router.chat_prompt(chat_messages(body.instructions, context), shape.functions or None,
                                shape.system_prompt())
    ids = router.encode(prompt, add_special_tokens=False)  # the template already placed them
    if body.top_logprobs and not body.logprobs:
        raise ApiError(422, f"top_logprobs: needs include {LOGPROBS}")
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    job = openai_job(router, body, ids, prompt, body.max_output_tokens, top_n, shape.grammar)
    job.tools = shape.tools
    draft = Draft(body, router.model_id, len(ids), job.tools)
    keeper = Keeper(store, owner, body.store is not False, items, context)
    if body.background:
        if body.store is False:
            raise ApiError(422, "background: needs store (a background response is fetched from the store)")
        return _start_background(request, router, job, draft, keeper, bool(body.stream))
    if body.stream:
        return EventStream(guarded(stream_events(router, job, draft, keeper.keep)), named=True)
    return in_app(partial(_answer, router, job, draft, keeper))


def _start_background(request: Request, router: Router, job: Job, draft: Draft, keeper: Keeper,
                      stream: bool) -> Response:
    queued = draft.object("queued", [])
    keeper.run = BackgroundRun(queued, partial(_cancelled, draft, keeper))
    keeper.keep(queued)  # retrievable, and cancellable, from now on
    keeper.run.start(guarded(stream_events(router, job, draft, keeper.keep)), request.app.state.load, router.metrics)
    if stream:  # this reader may leave: the run goes on, and can be followed again
        return EventStream(keeper.run.follow(), named=True)
    return JSONResponse(queued)


def _cancelled(draft: Draft, keeper: Keeper) -> dict:
    response = draft.object("cancelled", [])
    keeper.keep(response)
    return response


async def _answer(router: Router, job: Job, draft: Draft, keeper: Keeper) -> Response:
    gen = await collect(router, job, hold_back=True)
    response = draft.object(draft.status(gen), draft.output(gen), gen)
    keeper.keep(response)
    return JSONResponse(response)


def _stored(store: ResponseStore, owner: str, response_id: str) -> StoredResponse:
    record = store.get(owner, response_id)
    if record is None:
        raise ApiError(404, f"no stored response with id {response_id!r} (never stored, deleted or evicted)",
                       "not_found")
    return record


async def retrieve_response(request: Request) -> Response:
    """The stored response; a background one as it stands now, or (`stream=true`) its events after
    `starting_after`, then live ones until it ends."""
    record = _stored(store_of(request), owner_of(request), request.path_params["response_id"])
    run = record.run
    if request.query_params.get("stream") not in ("true", "1"):
        return JSONResponse(record.response if run is None or run.done else run.latest)
    if run is None:
        raise ApiError(422, "stream: only background responses can be streamed again")
    after = request.query_params.get("starting_after", "-1")
    if not after.lstrip("-").isdigit() or int(after) < -1:
        raise ApiError(422, f"starting_after: expected a sequence number, got {after!r}")
    return EventStream(run.follow(int(after)), named=True)


async def cancel_response(request: Request) -> Response:
    record = _stored(store_of(request), owner_of(request), request.path_params["response_id"])
    if record.run is None:
        raise ApiError(422, "only background responses can be cancelled")
    await record.run.cancel()
    return JSONResponse(record.run.latest)  # cancelled, or as it ended if it was already over


async def delete_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    if not store_of(request).delete(owner_of(request), response_id):
        _stored(store_of(request), owner_of(request), response_id)  # the 404
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def list_input_items(request: Request) -> Response:
    record = _stored(store_of(request), owner_of(request), request.path_params["response_id"])
    q = request.query_params
    order, after, limit = q.get("order", "desc"), q.get("after"), q.get("limit", "20")
    if order not in ("asc", "desc"):
        raise ApiError(422, f"order: expected asc or desc, got {order!r}")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise ApiError(422, f"limit: expected 1 to 100, got {limit!r}")
    items = record.input_items if order == "asc" else record.input_items[::-1]
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise ApiError(422, f"after: no input item {after!r} in this response")
        items = items[ids.index(after) + 1:]
    page = items[: int(limit)]
    return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)})
