"""Reading a request body: the size limit (413 before keeping a byte over it), strict JSON, and the pydantic
parse (422), all before any generation starts."""

from __future__ import annotations

import json
import logging
from urllib.parse import quote

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from . import schemas
from .errors import ApiError

log = logging.getLogger("sluice.router")

# A declared body at most this much over the limit is read and dropped before the 413, so that the client,
# still sending it, reads the answer: closing on unread bytes resets the connection, and most clients then
# report a broken connection instead of the 413. Larger ones are refused unread (nginx's lingering close,
# bounded the same way).
DISCARD_MAX_BYTES = 1 << 20

# x-sluice-ignored-fields stays well inside what HTTP clients accept in a header (h11, which httpx uses,
# gives up on a response head over 16 KiB; proxies often allow 4-8 KiB).
IGNORED_HEADER_MAX = 1024


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit`: from Content-Length before
    keeping a byte, else (chunked uploads) once the bytes read so far pass it. Never holds more than that."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        if int(declared) <= limit + DISCARD_MAX_BYTES:
            async for _ in request.stream():
                pass
        raise ApiError(413, f"request body larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
