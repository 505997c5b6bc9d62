"""Log records carry the request id of the request they belong to ("-" outside one).

The router sets the id per HTTP request (`X-Request-Id` or a fresh one) and sends it to the shard in
gRPC metadata, where the Generate handler sets it again: one grep follows a request through both.
A context variable, not an argument, because asyncio tasks copy it into everything a request spawns.
"""
from __future__ import annotations

import contextvars
import logging
import os

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
METADATA_KEY = "x-request-id"  # gRPC metadata and HTTP header alike
FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def setup() -> None:
    """Root logging with the request id in every line. Attached to the handler, not a logger, so
    records of every library (uvicorn's access log included) get the field."""
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format=FORMAT)
    for handler in logging.root.handlers:
        handler.addFilter(RequestIdFilter())
