"""`GET /` for browsers: the streaming guide's side-by-side demo (router/page.html: one file, no CDN, no
build step). `POST /` stays TGI's generate."""
from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from .errors import error_response

PAGE = (Path(__file__).with_name("page.html")).read_text(encoding="utf-8")


async def demo_page(request: Request) -> Response:
    if "text/html" not in request.headers.get("accept", ""):
        return error_response(405, "GET / is a page for browsers (Accept: text/html); POST / is TGI's generate",
                              "validation", {"Allow": "GET, POST"})
    return HTMLResponse(PAGE)
