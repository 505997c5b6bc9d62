"""A lean streaming load generator: POST /v1/completions over a bare asyncio protocol, one connection per
request, the same measures as bench_llamacpp's httpx generator (Result: a stamp per chunk with text, usage).

Why a second one: on a 2-core host the load generator shares the cores with the server, and httpx's
stream machinery (anyio, h11, line iteration) costs ~0.2 ms of CPU per token, about 4% of a core at
c=16, which the in-process side of bench_overhead never pays. Parsing here is what the measures need:
the status line, chunked or plain bodies, SSE `data:` lines, one orjson.loads per event.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from bench_llamacpp import CACHE, Result, completion_request, per_prompt


class _Stream(asyncio.Protocol):
    """One response: headers, then the body (chunked or not), split into SSE events as bytes arrive."""

    def __init__(self, res: Result) -> None:
        self.res = res
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.raw = b""  # bytes not yet taken apart: headers, then chunk framing
        self.head: bytes | None = None
        self.chunked = False
        self.sse = b""  # body bytes not yet split into events
        self.chunks = 0

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.raw += data
        if self.head is None:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head, self.raw = self.raw[:end].lower(), self.raw[end + 4:]
            self.chunked = b"\r\ntransfer-encoding: chunked" in self.head
            status = self.head.split(b" ", 2)[1]
            if status != b"200":
                self.res.error = f"HTTP {status.decode()}"
        if self.chunked:
            while True:
                line = self.raw.find(b"\r\n")
                if line < 0:
                    break
                size = int(self.raw[:line].split(b";")[0], 16)
                if len(self.raw) < line + 2 + size + 2:
                    break
                self.sse += self.raw[line + 2:line + 2 + size]
                self.raw = self.raw[line + 2 + size + 2:]
                if size == 0:
                    self._events(now)
                    self._finish()
                    return
        else:
            self.sse, self.raw = self.sse + self.raw, b""
        self._events(now)

    def _events(self, now: float) -> None:
        if self.res.error:
            return
        *events, self.sse = self.sse.replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                body = orjson.loads(data)  # the load generator's own CPU is the engine's loss too
                if "error" in body:
                    self.res.error = str(body["error"])[:200]
                    return
                if any(c.get("text") for c in body.get("choices") or []):
                    self.res.stamps.append(now)
                    self.chunks += 1
                usage = body.get("usage")
                if usage:
                    self.res.output_tokens = usage.get("completion_tokens") or 0
                    self.res.prompt_tokens = usage.get("prompt_tokens")

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head is None or (self.chunked and not self.done.done()):
            self.res.error = self.res.error or f"connection lost: {exc}"
        self._events(time.perf_counter())
        self._finish()


def request_body(prompt: str, max_tokens: int) -> bytes:
    return json.dumps(completion_request(prompt, max_tokens)).encode()


async def one_request(url: str, prompt: str, max_tokens: int) -> Result:
    """bench_llamacpp.one_request's request and measures, without httpx."""
    body = request_body(prompt, max_tokens)
    parts = urlsplit(url)
    res = Result(start=time.perf_counter())
    try:
        transport, stream = await asyncio.get_running_loop().create_connection(
            lambda: _Stream(res), parts.hostname, parts.port)
    except OSError as exc:
        res.error = f"connect: {exc}"
        return res
    try:
        transport.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                        % (parts.netloc.encode(), len(body), body))
        await stream.done
    finally:
        transport.close()
    res.output_tokens = res.output_tokens or stream.chunks
    return res


def run(main):
    """asyncio.run on uvloop where it is installed (the router's loop too): the generator's own CPU per token
    is what the server it measures loses on a small host (~34 us against ~50, c=16, Zen 5 host)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def drive(url: str, prompts: list[str], concurrency: int, max_tokens: int | list[int]) -> tuple[list[Result], float]:
    """bench_llamacpp.drive with this generator: all `prompts`, at most `concurrency` in flight."""
    queue = list(reversed(list(zip(prompts, per_prompt(max_tokens, len(prompts))))))
    results: list[Result] = []

    async def worker() -> None:
        while queue:
            prompt, tokens = queue.pop()
            results.append(await one_request(url, prompt, tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


# ---- the same requests from C (bench/sse_load.c) ----
SSE_LOAD_SOURCE = Path(__file__).with_name("sse_load.c")


def sse_load_binary() -> Path:
    """bench/sse_load.c, compiled once into the bench cache (again when the source is newer)."""
    binary = CACHE / "sse_load"
    if not binary.exists() or binary.stat().st_mtime < SSE_LOAD_SOURCE.stat().st_mtime:
        if shutil.which("gcc") is None:
            raise SystemExit("bench/sse_load.c needs gcc to build (apt-get install gcc)")
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(SSE_LOAD_SOURCE)], check=True)
    return binary


def drive_c(url: str, prompts: list[str], concurrency: int, max_tokens: int | list[int],
            gather_us: int = 0) -> tuple[list[Result], float]:
    """drive() through bench/sse_load.c: the same requests and measures, for a few microseconds of CPU a token
    instead of ~27 (the generator's CPU is the engine's loss on a small host). Its stamps come from
    CLOCK_MONOTONIC, the clock of time.perf_counter."""
    parts = urlsplit(url)
    bodies = b"".join(request_body(p, n) + b"\n" for p, n in zip(prompts, per_prompt(max_tokens, len(prompts))))
    binary = sse_load_binary()  # before the clock starts: the first call compiles it
    t0 = time.perf_counter()
    out = subprocess.run([str(binary), parts.hostname, str(parts.port), str(concurrency), str(gather_us)],
                         input=bodies, capture_output=True, check=True).stdout
    wall = time.perf_counter() - t0
    results = []
    for line in out.decode().splitlines():
        _, error, prompt_tokens, completion_tokens, start, *stamps = line.split()
        res = Result(start=float(start), stamps=[float(t) for t in stamps])
        res.error = "failed (HTTP status, an error event, or a cut stream)" if error == "1" else None
        res.prompt_tokens = int(prompt_tokens) if int(prompt_tokens) >= 0 else None
        res.output_tokens = int(completion_tokens) if int(completion_tokens) >= 0 else len(res.stamps)
        results.append(res)
    return results, wall
