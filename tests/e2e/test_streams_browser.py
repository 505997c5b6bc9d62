"""A browser's own EventSource (headless Chromium, Debian's `chromium`, driven by playwright) resumes a
resumable stream after the connection drops: a proxy between them cuts its first connection after a few
events, the browser reconnects by itself with Last-Event-ID, and what it got joins up into exactly the
events of an uncut run."""
from __future__ import annotations

import asyncio
import json
import shutil
import threading

import pytest

from sse_client import RawStream

BODY = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 20, "temperature": 0, "stream": True}
CUT_AFTER = 4

# Runs in the page: every message until [DONE], then closes (EventSource would reconnect for ever).
COLLECT = """async (id) => await new Promise((resolve) => {
  const got = [];
  const source = new EventSource(`/v1/streams/${id}`);
  source.onmessage = (e) => {
    got.push({id: e.lastEventId, data: e.data});
    if (e.data === "[DONE]") { source.close(); resolve(got); }
  };
})"""


class CuttingProxy:
    """TCP to the server; the first /v1/streams connection is cut after CUT_AFTER events, as a network
    would drop it. Notes each such request's Last-Event-ID."""

    def __init__(self, upstream: str) -> None:
        self.host, port = upstream.removeprefix("http://").split(":")
        self.upstream_port = int(port)
        self.last_event_ids: list[str | None] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(30)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = [x for x in head.decode("latin-1").split("\r\n")[:-2] if not x.lower().startswith("connection:")]
        cut = False
        if lines[0].startswith("GET /v1/streams/"):
            fields = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
            self.last_event_ids.append(fields.get("last-event-id"))
            cut = len(self.last_event_ids) == 1
        up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        # One request per connection (so each passes through here), in HTTP/1.0: the answer is not chunked
        # and ends when the connection does, so the cut can fall just after an event.
        lines[0] = lines[0].rsplit(" ", 1)[0] + " HTTP/1.0"
        up_writer.write("\r\n".join([*lines, "Connection: close", "", ""]).encode("latin-1"))
        sent, written = b"", 0
        try:
            while chunk := await up_reader.read(65536):
                sent += chunk
                end = _end_of_event(sent, CUT_AFTER) if cut else None
                writer.write(sent[written:end])
                written = len(sent) if end is None else end
                await writer.drain()
                if end is not None:
                    break
        finally:
            up_writer.close()
            if cut:
                writer.transport.abort()  # as a dropped network connection: no clean end of the response
            else:
                writer.close()


def _end_of_event(data: bytes, n: int) -> int | None:
    """The offset just past the n-th SSE event (`data:` ... blank line) of a response, None before it came."""
    if b"\r\n\r\n" not in data:
        return None
    at, seen = data.index(b"\r\n\r\n") + 4, 0
    while seen < n:
        end = data.find(b"\n\n", at)
        if end < 0:
            return None
        seen += b"data: " in data[at:end]
        at = end + 2
    return at


def payloads(items: list[str]) -> list:
    out = []
    for data in items:
        body = json.loads(data) if data != "[DONE]" else data
        if isinstance(body, dict):
            body.pop("id", None)
            body.pop("created", None)
        out.append(body)
    return out


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed (apt-get install chromium): scripts/test.sh installs it"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
        yield b
        b.close()


def test_event_source_resumes_after_the_connection_drops(server, browser):
    plain = RawStream(server, "/v1/completions", BODY)
    uncut = [e.data for e in plain.events()]
    assert len(uncut) > CUT_AFTER + 2

    # The stream starts (from Python), its client goes away at once; the browser picks it up.
    first = RawStream(server, "/v1/completions", BODY, {"X-Sluice-Resumable": "1"})
    stream_id = first.headers["x-sluice-stream-id"]
    first.events(1)
    first.close()

    proxy = CuttingProxy(server)
    page = browser.new_page()
    page.goto(proxy.url + "/docs")  # the page's origin is the proxy's: EventSource stays same-origin
    got = page.evaluate(COLLECT, stream_id)
    page.close()

    assert proxy.last_event_ids[:2] == [None, f"{stream_id}.{CUT_AFTER}"]
    assert [g["id"] for g in got] == [f"{stream_id}.{n}" for n in range(1, len(got) + 1)]
    assert payloads([g["data"] for g in got]) == payloads(uncut)
