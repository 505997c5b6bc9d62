"""What the router and gRPC cost: the same workload through `sluice serve` (HTTP, router, gRPC, shard)
and through the same engine driven in-process, side by side in one run.

    python bench/bench_overhead.py [--concurrency 16] [--requests 48] [--rounds 3] [--prompt-words 128]
        [--output-tokens 128] [--length-spread 0.25 (0: equal lengths)]

NEVER run it while anything else runs on the machine: every number is wall-clock on shared cores.

Both sides get prompts of one shape (bench_llamacpp's generator, one seed, a fresh set for every run: the
server's prefix cache would serve a repeated prompt's prefill), the same forced output length (ignore_eos),
the same closed loop of `--concurrency` requests in flight, and the engine as `sluice serve` builds it
(shard.launch.build_engine with default settings), measured once its decode graphs are compiled.
In-process, the engine loop runs in the main thread, as in the shard, and a second thread submits
sequences and timestamps their tokens as the engine emits them.

The in-process engine and the server are loaded at once and take turns, round after round (the other
side idle): on a shared host the speed drifts over minutes, and a ratio of two runs minutes apart
measured the drift as much as the overhead. Each round's HTTP runs are divided by its in-process run.

With equal output lengths a closed loop can lock into cohorts: sixteen streams finish on one step and the
next sixteen arrive together, prefilled as one batch. In-process they arrive within microseconds and the
cohort holds in some runs (TTFT p50 ~1.0 s instead of ~2.0 s, and ~5% more tokens/s); through HTTP the
arrivals spread over milliseconds and it breaks. That is the workload's artifact, not the router's cost:
`--length-spread 0.25` draws each request's length from 128 x (1 +- 0.25), the same draws on every side of
a round, and no side keeps a cohort (nor does real traffic).

Through HTTP the server is driven twice a round, by two streaming /v1/completions load generators:
bench_llamacpp's (httpx) and sse_client's (a bare asyncio protocol, on uvloop). Both share the two cores with the
server, and whatever CPU the generator takes the engine loses (it has no counterpart in-process): httpx
costs ~4% of a core at c=16, the lean one (on uvloop: ~34 us a token against ~50 on asyncio's own loop, Zen
5 host) about a third of that, so the lean row is the closer measure of the server's own overhead. Overhead = 1 - HTTP tok/s / in-process tok/s (issue 11's target: at most 5% at
c=16).
"""
from __future__ import annotations

import argparse
import asyncio
import random
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sse_client  # noqa: E402
from bench_llamacpp import Result, drive, per_prompt, free_port, make_prompt, serving, sluice_cmd, summarize, CACHE  # noqa: E402


def local_round(engine, tok, prompts: list[str], concurrency: int, max_tokens: int | list[int]) -> tuple[list[Result], float]:
    """The prompts through the in-process engine (its loop runs in the main thread), `concurrency` in flight,
    each token stamped as the engine emits it."""
    from shard.sampler import SamplingParams
    from shard.sequence import Sequence

    ids = [tok(p)["input_ids"] for p in prompts]
    results: list[Result] = []
    slots = threading.Semaphore(concurrency)
    done = threading.Event()
    left = [len(ids)]
    lock = threading.Lock()
    start = time.perf_counter()
    for i, (prompt, tokens) in enumerate(zip(ids, per_prompt(max_tokens, len(ids)))):
        slots.acquire()
        res = Result(start=time.perf_counter(), prompt_tokens=len(prompt))
        results.append(res)

        def on_event(kind: str, value: object, res: Result = res) -> None:
            if kind == "token":
                res.stamps.append(time.perf_counter())
                res.output_tokens += 1
                if value.finish is None:
                    return
            else:
                res.error = str(value)
            slots.release()
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()

        engine.submit(Sequence(f"r{i}", prompt, SamplingParams(), tokens, on_event, ignore_eos=True))
    done.wait()
    return results, time.perf_counter() - start


def row(name: str, s: dict) -> str:
    return (f"{name:<22s}{s['tok_s']:>10.1f}{s['ttft_p50']:>12.0f}{s['itl_p50']:>11.1f}"
            f"{s['itl_p95']:>11.1f}{s['out_per_req']:>9.1f}{int(s['failed']):>8d}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48, help="per side per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-words", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--length-spread", type=float, default=0.25,
                    help="output lengths drawn from output-tokens x (1 +- spread), the same draws on every side of "
                         "a round (0: all equal; see the docstring for why not by default)")
    args = ap.parse_args()
    import torch

    from shard.launch import build_engine
    from shard.settings import ShardSettings
    from sluice.modelfiles import load_tokenizer, resolve

    rng, length_rng = random.Random(11), random.Random(12)

    def new_prompts(n: int) -> list[str]:
        # A fresh set for every run: the server's prefix cache would serve a repeated prompt's prefill.
        return [make_prompt(rng, args.prompt_words) for _ in range(n)]

    print("[in-process] shard.launch.build_engine, default settings", flush=True)
    source = resolve(None)
    tok = load_tokenizer(source)
    engine = build_engine(ShardSettings(), source)
    sides = ("in-process engine", "HTTP, lean client", "HTTP, httpx client")
    runs: dict[str, list[tuple[dict, float]]] = {side: [] for side in sides}

    def measure() -> None:
        try:
            t0 = time.monotonic()
            while engine.runner.compiled is None and engine.compile_thread.is_alive():
                time.sleep(0.5)
            print(f"    in-process engine compiled after {time.monotonic() - t0:.0f} s", flush=True)
            port = free_port()
            CACHE.mkdir(parents=True, exist_ok=True)
            with serving("sluice", sluice_cmd(port, "", 4096), port, CACHE / "sluice-overhead.log",
                         wait_for_log="compiled the decode graphs") as url:
                asyncio.run(drive(url, new_prompts(2), 2, 8))  # warm-up, not measured
                local_round(engine, tok, new_prompts(2), 2, 8)
                for r in range(args.rounds):
                    lengths = [max(1, round(args.output_tokens * (1 + length_rng.uniform(-1, 1) * args.length_spread)))
                               for _ in range(args.requests)]
                    for side in sides:
                        prompts = new_prompts(args.requests)
                        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                        if side == sides[0]:
                            results, wall = local_round(engine, tok, prompts, args.concurrency, lengths)
                        elif side == sides[1]:
                            results, wall = sse_client.run(sse_client.drive(url, prompts, args.concurrency, lengths))
                        else:
                            results, wall = asyncio.run(drive(url, prompts, args.concurrency, lengths))
                        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                        client = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / wall
                        runs[side].append((summarize(results, wall), client))
                        print(f"    round {r + 1}, {side}: {runs[side][-1][0]['tok_s']:.1f} tok/s", flush=True)
        finally:
            engine.stop()

    # The engine's loop keeps the main thread, as in the shard (Engine.start's docstring says why); the rounds
    # run from a second thread, the server idle during in-process rounds and the engine idle during HTTP ones.
    threading.Thread(target=measure, daemon=True).start()
    with torch.inference_mode():
        engine.run()

    print(f"\nc={args.concurrency}, {args.rounds} rounds of {args.requests} requests per side, {args.prompt_words}-word "
          f"prompts, {args.output_tokens} output tokens (x (1 +- {args.length_spread}), ignore_eos); medians over the rounds")
    print(f"{'':<22s}{'out tok/s':>10s}{'TTFT p50 ms':>12s}{'ITL p50 ms':>11s}{'ITL p95 ms':>11s}{'out/req':>9s}"
          f"{'failed':>8s}{'client CPU':>12s}")
    # The summaries' numbers only (a median of an even count averages its middle two).
    median = {side: {k: statistics.median(s[k] for s, _ in runs[side]) for k, v in runs[side][0][0].items()
                     if isinstance(v, (int, float))} for side in sides}
    for side in sides:
        cpu = statistics.median(c for _, c in runs[side])
        print(row(side, median[side]) + (f"{100 * cpu:>10.1f} %" if side != sides[0] else ""))
    local = [s["tok_s"] for s, _ in runs[sides[0]]]
    for side in sides[1:]:
        # Each round's HTTP run against the in-process run just before it: drift on a shared host cancels.
        ratios = [s["tok_s"] / l for (s, _), l in zip(runs[side], local)]
        print(f"{side}: HTTP / in-process throughput by round {', '.join(f'{x:.3f}' for x in ratios)}; median "
              f"{statistics.median(ratios):.3f} (overhead {100 * (1 - statistics.median(ratios)):.1f}%; target <= 5%)")
    print("client CPU: the load generator's own, in % of one core (it shares the two cores with the server); the\n"
          "in-process side's client is a callback in the engine's thread")


if __name__ == "__main__":
    main()
