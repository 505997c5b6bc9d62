"""Soak: a bounded mixed load against one `sluice serve`, checking that nothing leaks or gets lost.

    python bench/soak.py [--requests 3000] [--concurrency 8] [--warmup 300] [--seed 0]

Starts its own server on 127.0.0.1 (embedded SmolLM2 unless --model-id) and sends a fixed number of
requests, then stops: TGI and OpenAI routes, streamed and not, clients that hang up at a random
point, and bad bodies (broken JSON, oversized, out-of-range fields). Every request must end in a
complete answer or a clear error; a stream that just stops is "lost". Prints lost streams (must be 0),
the in-flight gauge at the end (must be 0), and router and shard resident memory after warm-up and at
the end (should be within 5%). Exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import ROOT, free_port, wait_healthy  # noqa: E402

from sluice.process import stop  # noqa: E402

MAX_BODY = 65536
PROMPTS = ["The capital of France is", "1, 2, 3,", "Write a haiku about rain.", "def fib(n):", "Hello"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def settled_rss_mb(router: int, shard: int) -> tuple[float, float]:
    """Resident memory at rest: the shard's engine hands freed heap back to the OS once it idles."""
    time.sleep(2)
    return rss_mb(router), rss_mb(shard)


def shard_pid(pid: int) -> int:
    return int(next(c for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()))


def sse_data(body: bytes) -> list[bytes]:
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


async def one(client: httpx.AsyncClient, url: str, rng: random.Random) -> str:
    """One request of a random kind; returns its outcome: ok, error (clear), disconnect, or lost:<why>."""
    kind = rng.choices(["tgi_stream", "chat_stream", "tgi", "chat", "completion", "disconnect", "bad"],
                       [30, 15, 10, 10, 10, 15, 10])[0]
    try:
        return await request(client, url, rng, kind)
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return f"lost:{kind} {type(exc).__name__}: {exc}"


async def request(client: httpx.AsyncClient, url: str, rng: random.Random, kind: str) -> str:
    n = rng.randint(1, 12)
    prompt = rng.choice(PROMPTS)
    if kind == "disconnect":
        return await disconnect(url, rng, {"inputs": prompt, "parameters": {"max_new_tokens": 40}})
    if kind == "bad":
        body = rng.choice([b'{"inputs": "Hi",', b"x" * (MAX_BODY + 10), b'{"inputs": "Hi", "parameters": {"top_p": 7}}',
                           b'{"messages": NaN}', b"[" * 5000, b'{"inputs": "\xff"}'])
        r = await client.post(url + rng.choice(["/generate", "/v1/chat/completions", "/generate_stream"]),
                              content=body, headers={"Content-Type": "application/json"})
        return "error" if 400 <= r.status_code < 500 and "error" in r.json() else f"lost:bad body got {r.status_code}"
    if kind in ("tgi", "chat", "completion"):
        route, body = {
            "tgi": ("/generate", {"inputs": prompt, "parameters": {"max_new_tokens": n}}),
            "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": n}),
            "completion": ("/v1/completions", {"prompt": prompt, "max_tokens": n}),
        }[kind]
        r = await client.post(url + route, json=body)
        out = r.json()
        if r.status_code == 200 and ("generated_text" in out or out.get("choices")):
            return "ok"
        return "error" if "error" in out else f"lost:{kind} {r.status_code}"
    if kind == "tgi_stream":
        route, body = "/generate_stream", {"inputs": prompt, "parameters": {"max_new_tokens": n}}
    else:
        route, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": n,
                                               "stream": True}
    async with client.stream("POST", url + route, json=body) as r:
        data = sse_data(await r.aread())
    if r.status_code != 200:
        return "error" if r.status_code in (429, 503) else f"lost:{kind} {r.status_code}"
    if any(b'"error"' in d for d in data):
        return "error"
    if kind == "tgi_stream" and data and json.loads(data[-1]).get("generated_text") is not None:
        return "ok"
    if kind == "chat_stream" and data[-1:] == [b"[DONE]"] and b'"finish_reason":"' in data[-2]:
        return "ok"
    return f"lost:{kind} truncated"


async def disconnect(url: str, rng: random.Random, body: dict) -> str:
    """A raw client that leaves at a random point: before sending all of it, before the first token, mid-stream."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    request = b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(data), data)
    when = rng.choice(["mid-body", "before-token", "mid-stream"])
    writer.write(request[: len(request) // 2] if when == "mid-body" else request)
    await writer.drain()
    if when == "mid-stream":
        seen = b""
        while seen.count(b"data:") < rng.randint(1, 5) and not reader.at_eof():
            seen += await reader.read(4096)
    writer.close()
    return "disconnect"


async def load(url: str, count: int, concurrency: int, seed: int) -> Counter:
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    todo = iter(range(count))
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        async def worker() -> None:
            for _ in todo:
                outcome = await one(client, url, rng)
                outcomes[outcome.split(":")[0]] += 1
                if outcome.startswith("lost"):
                    print("  ", outcome, file=sys.stderr)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-every", type=int, default=500, help="print resident memory after each this many requests")
    ap.add_argument("--model-id", default=None)
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = tempfile.mkdtemp(prefix="sluice-soak-")
    argv = [sys.executable, "-m", "sluice", "serve", "--hostname", "127.0.0.1", "--port", str(port),
            "--shard-uds-path", f"{tmp}/shard.sock", "--max-body-bytes", str(MAX_BODY)]
    if args.model_id:
        argv += ["--model-id", args.model_id]
    log = open(f"{tmp}/server.log", "wb")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, LOG_LEVEL="WARNING"))
    try:
        wait_healthy(url, proc, f"see {tmp}/server.log")
        shard = shard_pid(proc.pid)
        asyncio.run(load(url, args.warmup, args.concurrency, args.seed + 1))
        warm = settled_rss_mb(proc.pid, shard)
        t0 = time.monotonic()
        outcomes: Counter = Counter()
        for done in range(0, args.requests, args.report_every):  # the same load, in parts, to show the trend
            n = min(args.report_every, args.requests - done)
            outcomes += asyncio.run(load(url, n, args.concurrency, args.seed + done))
            print("  after %d requests: router RSS %.1f MB, shard RSS %.1f MB" % (done + n, *settled_rss_mb(proc.pid, shard)),
                  flush=True)
        took = time.monotonic() - t0
        end = settled_rss_mb(proc.pid, shard)  # also lets the last disconnects reach the router
        metrics = httpx.get(url + "/metrics").text
        in_flight = float(next(line.split()[-1] for line in metrics.splitlines()
                               if line.startswith("sluice_requests_in_flight ")))
        health = httpx.get(url + "/health").json()["shards"][0]
    finally:
        code = stop(proc, 60)
        log.close()

    lost = outcomes.get("lost", 0)
    print(f"soak: {args.requests} requests after {args.warmup} warm-up, concurrency {args.concurrency}, "
          f"{took:.0f} s ({args.requests / took:.1f} req/s)")
    print(f"outcomes: {dict(sorted(outcomes.items()))}")
    print(f"lost streams: {lost}")
    print(f"in-flight gauge at end: {in_flight:g}; shard running {health['running']}, waiting {health['waiting']}")
    for name, a, b in (("router", warm[0], end[0]), ("shard", warm[1], end[1])):
        print(f"{name} RSS: {a:.1f} MB after warm-up, {b:.1f} MB at end ({(b - a) / a * 100:+.1f}%)")
    print(f"exit code after SIGTERM: {code}")
    ok = lost == 0 and in_flight == 0 and all(abs(b - a) / a <= 0.05 for a, b in zip(warm, end)) and code == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
