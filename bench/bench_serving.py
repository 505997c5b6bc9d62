"""Decode speed, side by side in one run: Sluice through the full HTTP path vs `transformers` generate.

    python bench/bench_serving.py [--tokens 128] [--streams 8] [--dtype bfloat16] [--compile]

Starts `sluice serve` on a free port (embedded SmolLM2 unless --model-id), streams from
/generate_stream with real HTTP clients, and prints one table with ratios. Numbers depend on the
machine and on what else runs on it: run it on a quiet machine. --compile runs a second server
with `--compile` after the first and adds its rows (its warm-up compiles the batch buckets it meets).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from sluice.health import wait_until_healthy
from sluice.process import stop

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe the history of the printing press at length.",
    "Write a detailed travel guide to Nuremberg, Germany.",
    "Explain how vaccines train the immune system, with examples.",
    "Write a long poem about autumn in the mountains.",
    "Describe how to bake sourdough bread from scratch, in detail.",
    "Explain the rules of chess to a beginner, thoroughly.",
]


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, what: str) -> None:
    try:
        wait_until_healthy(url + "/health", [proc])
    except (RuntimeError, TimeoutError) as exc:
        raise SystemExit(f"sluice serve {exc}: {what}") from None


@contextmanager
def sluice_server(*flags: str, wait_compiled: bool = False) -> Iterator[tuple[str, str]]:
    """`sluice serve` on a free port, healthy; yields (base URL, shard socket path). With `wait_compiled`,
    also waits until the background compile has switched decode steps to the compiled graphs (or has
    given up), so that what is measured is the speed the default reaches, not its warm-up."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = tempfile.mkdtemp()
    sock, log = f"{tmp}/shard.sock", Path(tmp) / "serve.log"
    cmd = [sys.executable, "-m", "sluice", "serve", "--port", str(port), "--hostname", "127.0.0.1",
           "--shard-uds-path", sock, *flags]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    started = time.monotonic()
    try:
        wait_healthy(url, proc, " ".join(cmd))
        print(f"sluice serve healthy after {time.monotonic() - started:.0f} s (log: {log})", flush=True)
        if wait_compiled and "--no-compile" not in flags:
            while not any(m in (text := log.read_text()) for m in ("compiled the decode graphs", "serving eagerly")):
                if proc.poll() is not None:
                    raise SystemExit(f"sluice serve exited; see {log}")
                time.sleep(2)
            what = "compiled" if "compiled the decode graphs" in text else "compile failed, eager"
            print(f"sluice serve {what} after {time.monotonic() - started:.0f} s", flush=True)
        yield url, sock
    finally:
        stop(proc, 60)


def stream_once(url: str, prompt: str, max_new: int) -> dict:
    """One /generate_stream request; token arrival times as the client sees them."""
    t0 = time.perf_counter()
    stamps = []
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new, "do_sample": False}}
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                assert "error" not in event, event
                stamps.append(time.perf_counter())
    return {"start": t0, "stamps": stamps}


def run_streams(url: str, n: int, max_new: int) -> dict:
    results: list[dict] = [None] * n  # type: ignore[list-item]

    def work(i: int) -> None:
        results[i] = stream_once(url, chat_prompt(PROMPTS[i % len(PROMPTS)]), max_new)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(len(r["stamps"]) for r in results)
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    ttft = [r["stamps"][0] - r["start"] for r in results]
    return {
        "streams": n,
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        "per_stream_decode_tok_s": statistics.mean(
            (len(r["stamps"]) - 1) / (r["stamps"][-1] - r["stamps"][0]) for r in results
        ),
        "ttft_ms_p50": 1000 * statistics.median(ttft),
        "itl_ms_p50": 1000 * statistics.median(itl),
    }


def measure(flags: list[str], streams: int, tokens: int) -> dict:
    """Start-up to healthy, warm-up (with --compile: the buckets' compiles), 1 stream, `streams` streams."""
    t0 = time.perf_counter()
    with sluice_server(*flags) as (url, _):
        started = time.perf_counter()
        run_streams(url, 1, 16)
        for _ in range(2):  # streams join over a few steps: meet the batch sizes they pass through
            run_streams(url, streams, 16)
        warm = time.perf_counter()
        one = run_streams(url, 1, tokens)
        many = run_streams(url, streams, tokens)
    return {"startup_s": started - t0, "warmup_s": warm - started, "one": one, "many": many}


def transformers_decode(model_path: Path, dtype_name: str, max_new: int) -> float:
    """Batch-1 decode tokens/s of transformers `generate` on the same weights (prefill excluded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    kw = {"gguf_file": model_path.name} if model_path.suffix == ".gguf" else {}
    folder = model_path.parent if model_path.suffix == ".gguf" else model_path
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), **kw)
    ids = tok(chat_prompt(PROMPTS[0]), return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
        total = time.perf_counter() - t0
    return (max_new - 1) / (total - prefill)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--num-shard", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="also run a server with --compile and compare")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from sluice.modelfiles import resolve

    source = resolve(args.model_id)
    flags = ["--dtype", args.dtype, "--num-shard", str(args.num_shard)]
    if args.model_id:
        flags += ["--model-id", args.model_id]
    eager = measure(flags, args.streams, args.tokens)
    one, many = eager["one"], eager["many"]
    compiled = measure(flags + ["--compile"], args.streams, args.tokens) if args.compile else None

    hf32 = transformers_decode(source.path, "float32", args.tokens)
    hf16 = transformers_decode(source.path, "bfloat16", args.tokens)

    print(f"\nSmolLM2 decode on this machine ({os.cpu_count()} cores), {args.tokens} new tokens, sluice {args.dtype}, "
          f"num_shard={args.num_shard}")
    print(f"{'':40s}{'tok/s':>10s}{'ratio':>10s}")
    rows = [
        ("transformers generate fp32, batch 1", hf32, hf32),
        ("transformers generate bf16, batch 1", hf16, hf32),
        ("sluice HTTP, 1 stream (decode)", one["per_stream_decode_tok_s"], hf32),
        ("sluice HTTP, 1 stream (aggregate)", one["aggregate_tok_s"], hf32),
        (f"sluice HTTP, {args.streams} streams (aggregate)", many["aggregate_tok_s"], hf32),
    ]
    if compiled:
        rows += [
            ("sluice --compile, 1 stream (decode)", compiled["one"]["per_stream_decode_tok_s"], hf32),
            (f"sluice --compile, {args.streams} streams (aggregate)", compiled["many"]["aggregate_tok_s"], hf32),
        ]
    for name, value, base in rows:
        print(f"{name:40s}{value:10.1f}{value / base:9.2f}x")
    print(f"\n{args.streams} streams vs 1 stream, aggregate: {many['aggregate_tok_s'] / one['aggregate_tok_s']:.2f}x")
    print(f"1 stream:  TTFT p50 {one['ttft_ms_p50']:.0f} ms, ITL p50 {one['itl_ms_p50']:.1f} ms")
    print(f"{args.streams} streams: TTFT p50 {many['ttft_ms_p50']:.0f} ms, ITL p50 {many['itl_ms_p50']:.1f} ms")
    if compiled:
        c1, cn = compiled["one"], compiled["many"]
        print(f"\n--compile vs eager: 1 stream decode {c1['per_stream_decode_tok_s'] / one['per_stream_decode_tok_s']:.2f}x, "
              f"{args.streams} streams aggregate {cn['aggregate_tok_s'] / many['aggregate_tok_s']:.2f}x")
        print(f"--compile, 1 stream:  TTFT p50 {c1['ttft_ms_p50']:.0f} ms, ITL p50 {c1['itl_ms_p50']:.1f} ms")
        print(f"--compile, {args.streams} streams: TTFT p50 {cn['ttft_ms_p50']:.0f} ms, ITL p50 {cn['itl_ms_p50']:.1f} ms")
        print(f"start-up to healthy: eager {eager['startup_s']:.1f} s, --compile {compiled['startup_s']:.1f} s; "
              f"warm-up requests (compiles included): eager {eager['warmup_s']:.1f} s, --compile {compiled['warmup_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"eager": eager, "compiled": compiled, "hf_fp32": hf32, "hf_bf16": hf16},
                                              indent=2))


if __name__ == "__main__":
    main()
