"""What constrained decoding costs: inter-token latency with a json_schema response format and with a
forced tool call, against the same chat requests unconstrained, on one `sluice serve`.

    python bench/bench_constrained.py [--concurrency 1 16] [--requests N] [--max-tokens 128] [--sluice-flags="--quantize int8"]

NEVER run it while anything else runs on the machine. The server is started as bench_llamacpp.py starts
it (and measured once it has switched to its compiled graphs). Each scenario sends streaming
POST /v1/chat/completions at temperature 0:
  * plain: no constraint, ignore_eos (so it runs to --max-tokens like the constrained ones);
  * json_schema: response_format with an object holding a long array of strings (minItems 40), so the
    grammar is still open at --max-tokens;
  * tool: tool_choice "required" on one function whose argument is such an array.
ITL = gaps between chunks that carry content or tool-call arguments (as vLLM's benchmark_serving).
Prints ITL p50/p95 and output tok/s per scenario and concurrency, and the ratio to plain.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp import CACHE, Result, free_port, limits, pct, serving, sluice_cmd, stream_events  # noqa: E402

ITEMS = {"type": "array", "items": {"type": "string"}, "minItems": 40}
SCHEMA = {"type": "object", "properties": {"fruits": ITEMS}, "required": ["fruits"]}
TOOL = {"type": "function", "function": {"name": "add_to_basket", "description": "Add fruits to the basket",
                                         "parameters": {"type": "object", "properties": {"fruits": ITEMS},
                                                        "required": ["fruits"]}}}
SCENARIOS = {
    "plain": {"ignore_eos": True},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "basket", "schema": SCHEMA}}},
    "tool": {"tools": [TOOL], "tool_choice": "required"},
}


def prompt(i: int) -> str:
    return f"Customer {i} asks: name as many different fruits as you can, in a JSON list, one per entry."


async def one_request(client: httpx.AsyncClient, url: str, i: int, extra: dict, max_tokens: int) -> Result:
    body = {"messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    res = Result(start=time.perf_counter())
    try:
        async for event in stream_events(client, url + "/v1/chat/completions", body, res):
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                calls = delta.get("tool_calls") or []
                if delta.get("content") or any((c.get("function") or {}).get("arguments") for c in calls):
                    res.stamps.append(time.perf_counter())
            if event.get("usage"):
                res.output_tokens = event["usage"].get("completion_tokens") or 0
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def drive(url: str, extra: dict, concurrency: int, requests: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits(concurrency)) as client:
        async def run(i: int) -> Result:
            async with sem:
                return await one_request(client, url, i, extra, max_tokens)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if not r.error]
    gaps = [b - a for r in ok for a, b in zip(r.stamps, r.stamps[1:])]
    return {"itl_p50": pct(gaps, 0.5), "itl_p95": pct(gaps, 0.95), "tok_s": sum(r.output_tokens for r in ok) / wall,
            "out_per_req": sum(r.output_tokens for r in ok) / max(1, len(ok)), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if r.error})[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, default=0, help="per scenario (default: 2 x concurrency, at least 6)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--sluice-flags", default="")
    args = ap.parse_args()
    port = free_port()
    cmd = sluice_cmd(port, args.sluice_flags, 1024)
    wait = "" if "--no-compile" in args.sluice_flags else "compiled the decode graphs"
    rows = []
    with serving("sluice " + args.sluice_flags, cmd, port, CACHE / "sluice-constrained.log", wait) as url:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(drive(url, SCENARIOS["json_schema"], 2, 2, 8))  # warm-up: grammar compile paths
        for c in args.concurrency:
            n = args.requests or max(6, 2 * c)
            base = None
            for name, extra in SCENARIOS.items():
                s = loop.run_until_complete(drive(url, extra, c, n, args.max_tokens))
                base = base or s
                rows.append((c, name, s, s["itl_p50"] / base["itl_p50"] if s["itl_p50"] and base["itl_p50"] else None))
                print(f"    c={c} {name}: {s}", flush=True)
        loop.close()
    print(f"\nconstrained decoding, sluice serve {args.sluice_flags}, {args.max_tokens} max tokens, chat route")
    print(f"{'c':>3} {'scenario':<12}{'ITL p50 ms':>12}{'ITL p95 ms':>12}{'tok/s':>9}{'out/req':>9}{'failed':>8}{'ITL vs plain':>14}")
    for c, name, s, ratio in rows:
        p50, p95 = (f"{1000 * s[k]:.1f}" if s[k] else "-" for k in ("itl_p50", "itl_p95"))
        print(f"{c:>3} {name:<12}{p50:>12}{p95:>12}{s['tok_s']:>9.1f}{s['out_per_req']:>9.1f}{s['failed']:>8}"
              f"{(f'{ratio:.2f}x' if ratio else '-'):>14}")


if __name__ == "__main__":
    main()
