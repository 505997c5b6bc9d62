"""Reading a request body: the size limit (413 before keeping a byte over it), strict JSON, and the pydantic
parse (422), all before any generation starts."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from urllib.parse import quote

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from . import schemas
from .errors import ApiError

log = logging.getLogger("sluice.router")

# A refusal sent before the request body ended (413) is followed by reading and dropping the rest of the body,
# at most this much for at most this long, before the connection closes: closing a socket with unread bytes
# makes the kernel reset the connection, and a client still sending then gets the reset, often before it has
# read the 413 (RFC 9112 9.6, nginx's lingering close, bounded the same way). A body declared larger than the
# limit by more than this is refused without it.
DISCARD_MAX_BYTES = 1 << 20
DISCARD_MAX_S = 1.0

# x-sluice-ignored-fields stays well inside what HTTP clients accept in a header (h11, which httpx uses,
# gives up on a response head over 16 KiB; proxies often allow 4-8 KiB).
IGNORED_HEADER_MAX = 1024


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit`: from Content-Length before
    keeping a byte, else (chunked uploads) once the bytes read so far pass it. Never holds more than that.
    The 413 goes out at once; the rest of the body is dropped afterwards (`DiscardRestOfBody`)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body larger than {limit} bytes",
                       unread_body=int(declared) <= limit + DISCARD_MAX_BYTES)
    chunks, size, more = [], 0, True
    while more:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body larger than {limit} bytes", unread_body=more)
        chunks.append(chunk)
    return b"".join(chunks)


class DiscardRestOfBody:
    """A response sent whole while the request body is still arriving, whose end (and so the connection's
    close) waits until the rest of the body has been read and dropped: up to DISCARD_MAX_BYTES or
    DISCARD_MAX_S, or the client hanging up. The client has the whole answer (its Content-Length) at once."""

    def __init__(self, response: Response) -> None:
        self.response = response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_holding_the_end(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await send({**message, "more_body": True})
                await discard(receive)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.response(scope, receive, send_holding_the_end)


async def discard(receive: Receive) -> None:
    """Read and drop request body messages until the body ends, the client leaves, or the bounds."""
    deadline, dropped = time.monotonic() + DISCARD_MAX_S, 0
    while dropped <= DISCARD_MAX_BYTES and (left := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        dropped += len(message.get("body", b""))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def load_json(raw: bytes):
    """Strict JSON: no NaN/Infinity (Python's json takes them), valid UTF-8 (decode errors are ValueErrors),
    bounded nesting (RecursionError), and no unpaired surrogates (a `\\ud800` escape parses, but would
    fail later in the tokenizer or when the answer is encoded)."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
        json.dumps(data, ensure_ascii=False).encode()
    except RecursionError as exc:
        raise ApiError(422, "the body is not valid JSON: nested too deeply") from exc
    except UnicodeEncodeError as exc:
        raise ApiError(422, "the body is not valid JSON: a string has an unpaired UTF-16 surrogate") from exc
    except ValueError as exc:
        raise ApiError(422, f"the body is not valid JSON: {exc}") from exc
    return data


async def parse(request: Request, model: type[BaseModel]):
    content_type = request.headers.get("content-type", "application/json")
    if "json" not in content_type:
        raise ApiError(422, f"Content-Type must be application/json, got {content_type!r}")
    data = load_json(await read_body(request, request.app.state.router.settings.max_body_bytes))
    if not isinstance(data, dict):
        raise ApiError(422, "the body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, schemas.describe(exc)) from exc
    ignored = [quote(k, safe="") for k in body.ignored_fields()]
    if isinstance(getattr(body, "parameters", None), schemas.Parameters):
        ignored += [f"parameters.{quote(k, safe='')}" for k in body.parameters.ignored_fields()]
    if ignored:
        named = _within(ignored, IGNORED_HEADER_MAX)
        log.info("%s: ignoring unknown fields %s", request.url.path, ", ".join(named))
        request.scope["sluice.ignored"] = named  # Admission names them in x-sluice-ignored-fields
    return body


def _within(names: list[str], limit: int) -> list[str]:
    """The names, or as many as fit in `limit` characters with a last "..." saying some were left out.
    Each is already percent-encoded: a client's field name may hold any character (a control character
    in a header makes the server drop the connection), and a comma inside a name is encoded."""
    if len(",".join(names)) <= limit:
        return names
    kept, size = [], len(",...")
    for name in names:
        size += len(name) + 1
        if size > limit:
            break
        kept.append(name)
    return [*kept, "..."]
