"""The OpenAPI 3.1 document, built from the route table (app.ENDPOINTS), so it cannot miss a route.

Request schemas come from the pydantic bodies (router/schemas.py), all generated together so that their
nested models land once in `components/schemas` and every `$ref` points there (pydantic alone would write
`#/$defs/...`, which resolves against the document's root, where there is no `$defs`). Answers are
described here: each route's 200 body by name (Endpoint.returns), its stream's events (Endpoint.events),
and the one error body every refusal uses. Shapes are open (extra keys allowed) where clients are told to ignore what they do not know.
"""
from __future__ import annotations

import re

from pydantic.json_schema import models_json_schema

import sluice

from .errors import is_openai_path

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _obj(required: list[str], **properties) -> dict:
    return {"type": "object", "required": required, "properties": properties}


_INT, _STR, _BOOL = {"type": "integer"}, {"type": "string"}, {"type": "boolean"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_USAGE = _obj(["prompt_tokens", "completion_tokens", "total_tokens"], prompt_tokens=_INT, completion_tokens=_INT,
              total_tokens=_INT)
_FINISH = _nullable(_STR)

ANSWERS: dict[str, dict] = {
    "Error": _obj(["error", "error_type"], error=_STR, error_type=_STR),
    # The /v1 routes' error body (errors.py): OpenAI's, with TGI's error_type beside it.
    "OpenAIError": _obj(["error", "error_type"], error_type=_STR, error=_obj(
        ["message", "type", "param", "code"], message=_STR, type=_STR, param=_nullable(_STR), code=_nullable(_STR))),
    "GenerateResponse": _obj(["generated_text"], generated_text=_STR, details=_nullable({"type": "object"})),
    "GenerateResponses": {"type": "array", "items": _ref("GenerateResponse")},
    "ChatCompletion": _obj(
        ["id", "object", "created", "model", "choices"], id=_STR, object={"const": "chat.completion"},
        created=_INT, model=_STR, usage=_USAGE,
        choices={"type": "array", "items": _obj(
            ["index", "message", "finish_reason"], index=_INT, finish_reason=_FINISH,
            message=_obj(["role"], role=_STR, content=_nullable(_STR),
                         tool_calls={"type": "array", "items": {"type": "object"}}),
            logprobs=_nullable({"type": "object"}))}),
    "Completion": _obj(
        ["id", "object", "created", "model", "choices"], id=_STR, object={"const": "text_completion"},
        created=_INT, model=_STR, usage=_USAGE,
        choices={"type": "array", "items": _obj(["index", "text", "finish_reason"], index=_INT, text=_STR,
                                                finish_reason=_FINISH, logprobs=_nullable({"type": "object"}))}),
    "Tokens": {"type": "array", "items": _obj(["id", "text", "start", "stop"], id=_INT, text=_STR, start=_INT,
                                              stop=_INT)},
    "Models": _obj(["object", "data"], object={"const": "list"}, data={"type": "array", "items": _obj(
        ["id", "object"], id=_STR, object={"const": "model"}, created=_INT, owned_by=_STR)}),
    "Health": _obj(["shards"], status=_STR, error=_STR, error_type=_STR, shards={"type": "array", "items": _obj(
        ["address", "ok"], address=_STR, ok=_BOOL, running=_nullable(_INT), waiting=_nullable(_INT))}),
    "Info": _obj(["model_id", "max_input_tokens", "max_total_tokens", "version"], model_id=_STR,
                 max_concurrent_requests=_INT, max_best_of=_INT, max_stop_sequences=_INT, max_input_tokens=_INT,
                 max_total_tokens=_INT, max_top_n_tokens=_INT, num_shard=_INT, version=_STR),
    "OpenAPI": _obj(["openapi", "info", "paths"], openapi=_STR, info={"type": "object"}, paths={"type": "object"}),
    # Stream payloads: one per `data:` line; a failure after the stream began is an Error payload instead.
    "StreamToken": _obj(
        ["index", "token", "generated_text", "details"], index=_INT, generated_text=_nullable(_STR),
        details=_nullable({"type": "object"}),
        token=_obj(["id", "text", "logprob", "special"], id=_INT, text=_STR, logprob={"type": "number"},
                   special=_BOOL)),
    "ChatCompletionChunk": _obj(
        ["id", "object", "created", "model", "choices"], id=_STR, object={"const": "chat.completion.chunk"},
        created=_INT, model=_STR, usage=_nullable(_USAGE),
        choices={"type": "array", "items": _obj(["index", "delta"], index=_INT, delta={"type": "object"},
                                                finish_reason=_FINISH)}),
    # The Responses API (responses.py): open shapes, the SDK's types say the rest.
    "Response": _obj(["id", "object", "created_at", "status", "output"], id=_STR, object={"const": "response"},
                     created_at=_INT, status=_STR, output={"type": "array", "items": {"type": "object"}},
                     usage=_nullable({"type": "object"}), error=_nullable({"type": "object"}),
                     incomplete_details=_nullable({"type": "object"})),
    "ResponseDeleted": _obj(["id", "object", "deleted"], id=_STR, object={"const": "response"}, deleted=_BOOL),
    "ResponseInputItems": _obj(["object", "data", "has_more"], object={"const": "list"},
                               data={"type": "array", "items": {"type": "object"}}, first_id=_nullable(_STR),
                               last_id=_nullable(_STR), has_more=_BOOL),
    "ResponseStreamEvent": _obj(["type", "sequence_number"], type=_STR, sequence_number=_INT),
    "CompletionChunk": _obj(
        ["id", "object", "created", "model", "choices"], id=_STR, object={"const": "text_completion"},
        created=_INT, model=_STR, usage=_nullable(_USAGE),
        choices={"type": "array", "items": _obj(["index", "text"], index=_INT, text=_STR, finish_reason=_FINISH)}),
}


def _event(payload: str, done: bool) -> dict:
    """One server-sent event (OpenAPI before 3.2: the event-stream `schema` describes each event): a `data`
    line holding a JSON payload, or, on the /v1 routes, the last one: `[DONE]`."""
    json_data = {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [_ref(payload), _ref("Error")]}}
    data = {"if": {"const": "[DONE]"}, "else": json_data} if done else json_data
    return _obj(["data"], data=data)


def _named_event(payload: str) -> dict:
    """The Responses API's events: an `event:` line naming the type, then the `data` line (no `[DONE]`)."""
    event = _event(payload, done=False)
    return {**event, "properties": {"event": _STR, **event["properties"]}}


EVENTS = {"TgiEvent": _event("StreamToken", done=False), "ChatCompletionEvent": _event("ChatCompletionChunk", done=True),
          "CompletionEvent": _event("CompletionChunk", done=True), "ResponseEvent": _named_event("ResponseStreamEvent")}

# Every answer carries its request id (admission.py); a route with a body may name the fields it ignored.
_HEADERS = {"X-Request-Id": {"required": True, "schema": _STR, "description": "the client's id or a new one"}}
_IGNORED = {"x-sluice-ignored-fields": {"schema": _STR, "description": "unknown body fields, comma-separated, "
                                        "each percent-encoded (RFC 3986); cut short past a size limit"}}

# What each kind of route answers with 200 (Endpoint.kind): a body as `returns` names it, an event stream, or both.
_MEDIA = {"json": ("application/json",), "sse": ("text/event-stream",),
          "both": ("application/json", "text/event-stream"), "html": ("text/html",), "text": ("text/plain",)}


def _responses(e) -> dict:
    # The error body and the validation status are the dialect's (errors.py): OpenAI's and 400 under /v1.
    body, invalid = ("OpenAIError", "400") if is_openai_path(e.path) else ("Error", "422")

    def _error(description: str) -> dict:
        return {"description": description, "headers": _HEADERS,
                "content": {"application/json": {"schema": _ref(body)}}}

    content = {}
    for media in _MEDIA[e.kind]:
        if media == "application/json":
            content[media] = {"schema": _ref(e.returns) if e.returns else {}}
        elif media == "text/event-stream":
            content[media] = {"schema": _ref(e.events) if e.events else {}}
        else:
            content[media] = {"schema": _STR}
    ok = {"description": "OK", "headers": {**_HEADERS, **(_IGNORED if e.body else {})}, "content": content}
    out = {"200": ok,
           "401": _error("with --api-key or --api-keys-file: a missing or wrong key (never on /health, /metrics and GET /)"),
           "503": _error("shutting down (draining); on /health also: no shard answered (then with `shards`)")}
    if e.body is not None:
        out["413"] = _error("the body is larger than --max-body-bytes")
        out[invalid] = _error("the body is not valid JSON, or a field is out of range or unsupported")
    if "{" in e.path:
        out["404"] = _error("nothing by that id: unknown, expired, deleted, evicted, or another API key's")
        if e.path.startswith("/v1/responses/"):
            out[invalid] = _error("a query parameter is out of range, or the response is not a background one")
    if e.kind == "sse" and e.method == "GET" and e.path.startswith("/v1/streams/"):  # a resume (streams.py)
        out["204"] = {"description": "the stream is finished and was read to its end", "headers": _HEADERS}
        out["410"] = _error("the events after that point were dropped from the stream's buffer")
        out[invalid] = _error("a malformed Last-Event-ID or `after`")
    if e.generation:
        out["429"] = _error("overloaded: --max-concurrent-requests are in flight, or the tenant's own limits "
                              "are reached (retry after Retry-After), or the queue cannot meet the deadline")
        out["500"] = _error("the generation failed (a non-streamed request; a stream ends with an error event)")
    return out


def openapi_schema() -> dict:
    from .app import ENDPOINTS  # the route table names the handlers, which import this module's callers

    bodies = list(dict.fromkeys(e.body for e in ENDPOINTS if e.body is not None))
    refs, defs = models_json_schema([(b, "validation") for b in bodies], ref_template=REF)
    request_schemas = defs.get("$defs", {})
    assert not request_schemas.keys() & (ANSWERS.keys() | EVENTS.keys()), "a body model and an answer share a name"
    paths: dict = {}
    for e in ENDPOINTS:
        op: dict = {"summary": e.summary, "operationId": e.handler.__name__, "responses": _responses(e)}
        names = re.findall(r"\{(\w+)\}", e.path)  # /v1/responses/{response_id}
        if names:
            op["parameters"] = [{"name": n, "in": "path", "required": True, "schema": _STR} for n in names]
        if e.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[(e.body, "validation")]}}}
        paths.setdefault(e.path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Sluice", "version": sluice.__version__,
                 "description": "TGI- and OpenAI-compatible text generation"},
        "paths": paths,
        "components": {"schemas": {**request_schemas, **ANSWERS, **EVENTS}},
    }
