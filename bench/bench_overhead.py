"""What the router and gRPC cost: the same workload through `sluice serve` (HTTP, router, gRPC, shard)
and through the same engine driven in-process, side by side in one run.

    python bench/bench_overhead.py [--concurrency 16] [--requests 48] [--prompt-words 128] [--output-tokens 128]

NEVER run it while anything else runs on the machine: every number is wall-clock on shared cores.

Both sides get the same prompts (bench_llamacpp's generator, one seed), the same forced output length
(ignore_eos), the same closed loop of `--concurrency` requests in flight, and the engine as `sluice serve`
builds it (shard.launch.build_engine with default settings), measured once its decode graphs are
compiled. In-process, the engine loop runs in the main thread, as in the shard, and a second thread
submits sequences and timestamps their tokens as the engine emits them. Through HTTP the same server is
driven twice, by two streaming /v1/completions load generators: bench_llamacpp's (httpx) and
sse_client's (a bare asyncio protocol). Both share the two cores with the server, and whatever CPU the
generator takes the engine loses (it has no counterpart in-process): httpx costs ~4% of a core at c=16,
the lean one about a third of that, so the lean row is the closer measure of the server's own overhead.
Overhead = 1 - HTTP tok/s / in-process tok/s (issue 11's target: at most 5% at c=16).
"""
from __future__ import annotations

import argparse
import asyncio
import random
import resource
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sse_client  # noqa: E402
from bench_llamacpp import Result, drive, free_port, make_prompt, serving, sluice_cmd, summarize, CACHE  # noqa: E402


def in_process(prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list[Result], float]:
    import torch

    from shard.launch import build_engine
    from shard.sampler import SamplingParams
    from shard.sequence import Sequence
    from shard.settings import ShardSettings
    from sluice.modelfiles import load_tokenizer, resolve

    source = resolve(None)
    tok = load_tokenizer(source)
    ids = [tok(p)["input_ids"] for p in prompts]
    engine = build_engine(ShardSettings(), source)
    t0 = time.monotonic()
    while engine.runner.compiled is None and engine.compile_thread.is_alive():
        time.sleep(0.5)
    print(f"    in-process engine compiled after {time.monotonic() - t0:.0f} s", flush=True)
    results: list[Result] = []
    wall = [0.0]

    def client() -> None:
        slots = threading.Semaphore(concurrency)
        done = threading.Event()
        left = [len(ids)]
        lock = threading.Lock()
        start = time.perf_counter()
        for i, prompt in enumerate(ids):
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

            engine.submit(Sequence(f"r{i}", prompt, SamplingParams(), max_tokens, on_event, ignore_eos=True))
        done.wait()
        wall[0] = time.perf_counter() - start
        engine.stop()

    threading.Thread(target=client, daemon=True).start()
    with torch.inference_mode():
        engine.run()  # the main thread, as in the shard (Engine.start's docstring says why)
    return results, wall[0]


def row(name: str, s: dict) -> str:
    return (f"{name:<22s}{s['tok_s']:>10.1f}{s['ttft_p50']:>12.0f}{s['itl_p50']:>11.1f}"
            f"{s['itl_p95']:>11.1f}{s['out_per_req']:>9.1f}{s['failed']:>8d}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--prompt-words", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    args = ap.parse_args()
    rng = random.Random(11)

    def new_prompts(n: int) -> list[str]:
        # A fresh set for every run: the server's prefix cache would serve a repeated prompt's prefill.
        return [make_prompt(rng, args.prompt_words) for _ in range(n)]

    prompts = new_prompts(args.requests)

    print("[in-process] shard.launch.build_engine, default settings", flush=True)
    local = summarize(*in_process(prompts, args.concurrency, args.output_tokens))

    port = free_port()
    cmd = sluice_cmd(port, "", 4096)
    CACHE.mkdir(parents=True, exist_ok=True)
    http = {}
    with serving("sluice", cmd, port, CACHE / "sluice-overhead.log", wait_for_log="compiled the decode graphs") as url:
        asyncio.run(drive(url, new_prompts(2), 2, 8))  # warm-up, not measured
        for name, generator in (("HTTP, lean client", sse_client.drive), ("HTTP, httpx client", drive)):
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            results, wall = asyncio.run(generator(url, new_prompts(args.requests), args.concurrency, args.output_tokens))
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            # The client shares the cores with the server here, and has no counterpart in-process.
            client = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / wall
            http[name] = summarize(results, wall), client

    print(f"\nc={args.concurrency}, {args.requests} requests, {args.prompt_words}-word prompts, "
          f"{args.output_tokens} output tokens (ignore_eos)")
    print(f"{'':<22s}{'out tok/s':>10s}{'TTFT p50 ms':>12s}{'ITL p50 ms':>11s}{'ITL p95 ms':>11s}{'out/req':>9s}"
          f"{'failed':>8s}{'client CPU':>12s}")
    print(row("in-process engine", local))
    for name, (s, client) in http.items():
        print(row(name, s) + f"{100 * client:>10.1f} %")
    for name, (s, _) in http.items():
        ratio = s["tok_s"] / local["tok_s"]
        print(f"{name}: HTTP / in-process throughput {ratio:.3f} (overhead {100 * (1 - ratio):.1f}%; target <= 5%), "
              f"ITL p50 {s['itl_p50'] / local['itl_p50']:.3f}")
    print("client CPU: the load generator's own, in % of one core (it shares the two cores with the server)")


if __name__ == "__main__":
    main()
