"""`GET /`: the streaming guide's side-by-side demo, for browsers (router/page.html: one file, no CDN, no
build step). `POST /` stays TGI's generate; a GET is never an API call there, so every GET gets the page."""
from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

PAGE = (Path(__file__).with_name("page.html")).read_text(encoding="utf-8")


async def demo_page(request: Request) -> Response:
    return HTMLResponse(PAGE)
