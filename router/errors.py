"""The one error body: TGI's shape, on every route and in both dialects."""

from __future__ import annotations

from starlette.responses import JSONResponse


class ApiError(Exception):
    """Raised by a handler before any byte is sent; rendered as TGI's error body."""

    def __init__(self, status: int, message: str, error_type: str = "validation") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


def error_response(status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    # TGI's shape on every route: huggingface_hub and the JS client map `error_type` to their exceptions,
    # and the OpenAI SDK reads a string `error` as the message.
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)
