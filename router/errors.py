"""The one error rule: which body and status a refusal gets, by the route's dialect.

- TGI's routes (and the service routes): `{"error": "<message>", "error_type": "<kind>"}`, validation as 422,
  as TGI answers (huggingface_hub, the text-generation client and the JS client map `error_type` to their
  exceptions).
- The `/v1` routes: OpenAI's `{"error": {"message", "type", "param", "code"}}`, validation as **400** (the
  openai SDK raises BadRequestError for it, and code written for OpenAI catches that), with `error_type`
  kept beside it at the top level, so that clients reading TGI's field still find it.

Every error answer goes through `error_response`: ApiError raised by a handler (app.on_api_error), Starlette's
own 404/405 (app.on_http_error) and Admission's refusals (401, 429, 503) alike.
"""

from __future__ import annotations

import re

from starlette.responses import JSONResponse

# A message names its field first ("temperature: ...", "messages.0.role: ..."), the house style of every
# refusal here: that name is OpenAI's `param`. Messages about no one field ("the prompt has ...") have none.
_FIELD = re.compile(r"([A-Za-z_][\w.\-\[\]]*): ")

# OpenAI's error types by our error_type; anything else (generation failures, shutdown) is a server error.
_OPENAI_TYPES = {"validation": "invalid_request_error", "not_found": "invalid_request_error",
                 "method_not_allowed": "invalid_request_error", "gone": "invalid_request_error",
                 "authentication": "authentication_error", "overloaded": "rate_limit_error"}


class ApiError(Exception):
    """Raised by a handler before any byte is sent; rendered by `error_response` for the route's dialect."""

    def __init__(self, status: int, message: str, error_type: str = "validation", unread_body: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.unread_body = unread_body  # raised before the request body ended: drop the rest after answering


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def param_of(message: str) -> str | None:
    """The field a message names first, or None."""
    named = _FIELD.match(message)
    return named.group(1) if named else None


def listed(values: list, most: int = 50) -> str:
    """Every offending value in a message, comma-separated: the first `most` of them and how many more, so
    that a hostile body cannot make a megabyte message."""
    shown = ", ".join(str(v) for v in values[:most])
    return shown + (f" (and {len(values) - most} more)" if len(values) > most else "")


def error_response(path: str, status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    """The error answer for a request to `path`."""
    if not is_openai_path(path):
        return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)
    body = {"error": {"message": message, "type": _OPENAI_TYPES.get(error_type, "server_error"),
                      "param": param_of(message) if error_type == "validation" else None, "code": None},
            "error_type": error_type}
    return JSONResponse(body, status_code=400 if status == 422 else status, headers=headers)
