"""Decode step time with and without `--compile`, in one process, steps interleaved A/B/A/B.

    python bench/bench_compile.py [--batch 1,8] [--dtype bfloat16] [--steps 40] [--check]

Runs the engine in-process on the embedded SmolLM2 (or --model-id): for each batch size, that many
sequences with ~200-token prompts are prefilled, then decode steps alternate between eager and
compiled, so that load from other processes hits both alike. Prints ms/step and tok/s per mode and
the one-off compile time (Engine.warm_up: the batch-1 and the batch-2-and-more graphs). --check also asserts that greedy ids are identical
with and without compile in float32 (a few prompts, 32 new tokens).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shard.engine import Engine, EngineConfig  # noqa: E402
from shard.models.loader import load_model  # noqa: E402
from shard.sampler import SamplingParams  # noqa: E402
from shard.sequence import Sequence  # noqa: E402
from sluice.modelfiles import resolve  # noqa: E402


def prompt(i: int, n: int) -> list[int]:
    return [(1000 + 37 * i + 11 * k) % 40000 + 100 for k in range(n)]


def decode_steps(engine: Engine, batch: int, steps: int, prompt_len: int) -> tuple[list[float], list[float]]:
    """(eager step seconds, compiled step seconds)."""
    compiled = engine.runner.compiled
    for i in range(batch):
        engine.scheduler.waiting.append(Sequence(str(i), prompt(i, prompt_len), SamplingParams(), 2 * steps + 8,
                                                 lambda *_: None, ignore_eos=True))
    while any(s.num_computed < s.prompt_len for s in (*engine.scheduler.running, *engine.scheduler.waiting)):
        engine.runner.compiled = None
        engine.step()
    times: dict[bool, list[float]] = {False: [], True: []}
    for k in range(2 * steps + 1):
        on = k % 2 == 0
        engine.runner.compiled = compiled if on else None
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if k:  # the first step also runs the graph's guards and allocations for the first time
            times[on].append(dt)
    for seq in list(engine.scheduler.running):
        engine.scheduler.remove(seq)
    engine.runner.compiled = compiled
    return times[False], times[True]


def greedy(model, compile: bool, prompts: list[list[int]], new: int, total_tokens: int = 2048,
           prefill_tokens: int = 512) -> list[list[int]]:
    """Each prompt's greedy continuation of `new` tokens (bench_quality.py uses it too)."""
    engine = Engine(model, EngineConfig(max_batch_total_tokens=total_tokens, max_batch_prefill_tokens=prefill_tokens,
                                        compile=compile), eos_token_ids=[])
    outs: list[list[int]] = [[] for _ in prompts]
    for i, ids in enumerate(prompts):
        engine.scheduler.waiting.append(Sequence(str(i), ids, SamplingParams(), new,
                                                 lambda kind, v, i=i: outs[i].append(v.token_id)))
    while engine.scheduler.running or engine.scheduler.waiting:
        engine.step()
    return outs


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=40, help="decode steps per mode and batch size")
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--check", action="store_true", help="also compare greedy ids in float32")
    args = ap.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.set_grad_enabled(False)
    source = resolve(args.model_id)

    if args.check:
        model32 = load_model(source, torch.float32)
        prompts = [prompt(i, 20 + 30 * i) for i in range(4)]
        t0 = time.perf_counter()
        eager = greedy(model32, False, prompts, 32)
        t1 = time.perf_counter()
        compiled = greedy(model32, True, prompts, 32)
        t2 = time.perf_counter()
        print(f"float32 greedy ids, 4 prompts x 32 tokens: compiled == eager: {compiled == eager} "
              f"(eager {t1 - t0:.1f} s, compiled incl. compile {t2 - t1:.1f} s)")
        assert compiled == eager, (eager, compiled)
        del model32
        torch._dynamo.reset()

    t0 = time.perf_counter()
    model = load_model(source, getattr(torch, args.dtype))
    engine = Engine(model, EngineConfig(max_batch_total_tokens=8192, compile=True), eos_token_ids=[])
    print(f"model load {time.perf_counter() - t0:.1f} s, RSS {rss_mb():.0f} MB", flush=True)
    t0 = time.perf_counter()
    engine.warm_up()
    warm = time.perf_counter() - t0
    print(f"warm-up (compiles both decode graphs) {warm:.1f} s, RSS {rss_mb():.0f} MB", flush=True)
    rows = []
    for b in [int(x) for x in args.batch.split(",")]:
        eager, comp = decode_steps(engine, b, args.steps, args.prompt_len)
        rows.append((b, statistics.median(eager), statistics.median(comp)))

    print(f"\n{source.model_id} {args.dtype}, decode steps, context ~{args.prompt_len}-{args.prompt_len + 2 * args.steps}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {args.steps} steps per mode, interleaved, medians")
    print(f"{'batch':>5s}{'eager ms':>10s}{'tok/s':>8s}{'compiled ms':>13s}{'tok/s':>8s}{'speed-up':>10s}")
    for b, e, c in rows:
        print(f"{b:5d}{1000 * e:10.1f}{b / e:8.1f}{1000 * c:13.1f}{b / c:8.1f}{e / c:9.2f}x")
    print(f"compile (warm-up, once at start-up): {warm:.1f} s, RSS {rss_mb():.0f} MB at the end")


if __name__ == "__main__":
    main()
