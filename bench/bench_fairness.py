"""Fairness under a flood: does one tenant's flood make the server useless for another?

    python bench/bench_fairness.py [--flood 48] [--duration 60] [--every 3] [--tokens 64] [--server-flags="..."]

Starts its own `sluice serve` on 127.0.0.1 and runs three phases:

1. idle: tenant B alone sends one request every `--every` seconds;
2. fair: tenant A keeps `--flood` streams open (a new one as each ends) while B goes on as before;
3. unfair: the same, but B's requests carry tenant A's name, so the shard cannot tell them apart
   (one tenant: first come, first served, as before fair scheduling).

It prints B's time to first token (p50, p90) in each phase, B's p50 under the flood over idle (the issue
asks for at most 2x), and the total token throughput of the fair phase over the unfair one (at least 0.9).
Requests are streamed `/v1/completions` with `ignore_eos`, so each generates exactly its token count.
Tenants are sent as `X-Tenant` (no API key). Fair scheduling only matters when requests wait: with the
default `--max-batch-size` of 64, a flood of 48 fits in the batch; pass `--server-flags="--max-batch-size 16"` (with `=`: argparse takes a value that starts with `--` only so)
to see the queue.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import sluice_server  # noqa: E402

# Chat-formatted, and every request generates exactly its max_tokens (`ignore_eos`): a raw prompt that the
# tiny model answers with an immediate end-of-text would turn the flood into a storm of one-token requests.
FLOOD_PROMPT = ("<|im_start|>user\nWrite a long, detailed essay about the history of rivers, canals and locks"
                " in Europe.<|im_end|>\n<|im_start|>assistant\n")
B_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


async def stream(client: httpx.AsyncClient, url: str, tenant: str, prompt: str, tokens: int,
                 served: list[int]) -> float | None:
    """One streamed request: seconds to its first token; every token received is counted in `served[0]`."""
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "stream": True}
    start, first = time.perf_counter(), None
    async with client.stream("POST", url + "/v1/completions", json=body, headers={"X-Tenant": tenant}) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"{r.status_code}: {r.text}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            served[0] += 1
            if first is None:
                first = time.perf_counter() - start
    return first


async def phase(url: str, flood: int, b_tenant: str, args: argparse.Namespace) -> dict:
    """B every `every` seconds for `duration`, with `flood` streams of A around it; B's TTFTs and the
    tokens per second of everyone."""
    limits = httpx.Limits(max_connections=flood + 16, max_keepalive_connections=flood + 16)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        stop = asyncio.Event()
        tokens = [0]

        async def flooder() -> None:
            while not stop.is_set():
                await stream(client, url, "A", FLOOD_PROMPT, args.tokens, tokens)

        async def lone() -> float:
            return await stream(client, url, b_tenant, B_PROMPT, args.b_tokens, tokens)

        floods = [asyncio.create_task(flooder()) for _ in range(flood)]
        if flood:
            await asyncio.sleep(args.warmup)  # let the flood fill the batch first
        start, b = time.perf_counter(), []
        tokens[0] = 0  # throughput counts from here
        while time.perf_counter() - start < args.duration:
            b.append(asyncio.create_task(lone()))
            await asyncio.sleep(args.every)
        ttfts = await asyncio.gather(*b)
        served, wall = tokens[0], time.perf_counter() - start
        stop.set()
        await asyncio.gather(*floods)
    ttfts = sorted(t for t in ttfts if t is not None)
    return {"b_ttft_p50": statistics.median(ttfts), "b_ttft_p90": ttfts[math.ceil(0.9 * len(ttfts)) - 1],
            "b_requests": len(ttfts), "tokens_per_s": served / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, default=48, help="tenant A's concurrent streams")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds B sends requests, per phase")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between B's requests")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds the flood runs before B starts")
    parser.add_argument("--tokens", type=int, default=64, help="max_new_tokens of A's requests")
    parser.add_argument("--b-tokens", type=int, default=16, help="max_new_tokens of B's requests")
    parser.add_argument("--server-flags", default="", help="extra `sluice serve` flags, e.g. \"--max-batch-size 16\"")
    args = parser.parse_args()
    with sluice_server("--max-concurrent-requests", str(args.flood + 64), *args.server_flags.split(),
                       wait_compiled=True) as (url, _):
        asyncio.run(phase(url, 0, "B", argparse.Namespace(**{**vars(args), "duration": 2 * args.every})))  # warm-up
        results = {name: asyncio.run(phase(url, flood, tenant, args))
                   for name, flood, tenant in (("idle", 0, "B"), ("fair", args.flood, "B"), ("unfair", args.flood, "A"))}
    print(f"{'phase':8} {'B TTFT p50':>11} {'B TTFT p90':>11} {'B reqs':>7} {'tok/s':>8}")
    for name, r in results.items():
        print(f"{name:8} {r['b_ttft_p50']:10.3f}s {r['b_ttft_p90']:10.3f}s {r['b_requests']:7d} {r['tokens_per_s']:8.1f}")
    idle, fair, unfair = results["idle"], results["fair"], results["unfair"]
    print(f"B's TTFT p50 under the flood / idle: fair {fair['b_ttft_p50'] / idle['b_ttft_p50']:.2f}x, "
          f"unfair {unfair['b_ttft_p50'] / idle['b_ttft_p50']:.2f}x (goal: fair <= 2x)")
    print(f"throughput fair / unfair: {fair['tokens_per_s'] / unfair['tokens_per_s']:.3f} (goal: >= 0.9)")


if __name__ == "__main__":
    main()
