"""Reading error answers in the dialect of the route that gave them (router/errors.py): TGI's
`{"error": "<message>", "error_type"}` with validation as 422, or on the /v1 routes OpenAI's
`{"error": {"message", "type", "param", "code"}, "error_type"}` with validation as 400. Imported as
`api_errors` (tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import httpx


def openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def invalid_status(path: str) -> int:
    """What a validation error answers on `path`."""
    return 400 if openai_path(path) else 422


def error_of(r: httpx.Response) -> dict:
    """The error's parts, its shape checked for its route: message, error_type, and on /v1 type and param."""
    body = r.json()
    assert r.headers["content-type"] == "application/json", r.headers
    if openai_path(r.request.url.path):
        assert set(body) == {"error", "error_type"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["code"] is None and isinstance(body["error"]["message"], str), body
        return {**body["error"], "error_type": body["error_type"]}
    assert isinstance(body["error"], str) and isinstance(body["error_type"], str), body
    return {"message": body["error"], "error_type": body["error_type"]}


def refusal(r: httpx.Response) -> str:
    """A validation error's message, after checking its status and shape for its route."""
    assert r.status_code == invalid_status(r.request.url.path), (r.status_code, r.text)
    error = error_of(r)
    assert error["error_type"] == "validation", error
    if "type" in error:
        assert error["type"] == "invalid_request_error", error
    return error["message"]
