"""bench_fairness.py's flood without the server: the engine alone, in this process, on the embedded model.

    python bench/fairness_engine.py [--flood 48] [--duration 40] [--every 1.5] [--tokens 64] [--no-compile]

Tenant A keeps `--flood` sequences of `--tokens` forced tokens in the engine (a new one as each ends);
tenant B submits one 16-token sequence every `--every` seconds. Prints B's time to first token idle and
under the flood, with B as its own tenant (fair) and as A (unfair), and the flood's tokens per second.
With no router, no HTTP and no client on the same cores, what remains is the scheduler and the steps:
compare with bench_fairness.py's figures to see what the serving path adds.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_fairness import B_PROMPT, FLOOD_PROMPT  # noqa: E402  (the same prompts as the server's run)
from shard.engine import Engine, EngineConfig  # noqa: E402
from shard.models.loader import load_model  # noqa: E402
from shard.sampler import SamplingParams  # noqa: E402
from shard.sequence import Sequence  # noqa: E402
from sluice.modelfiles import load_tokenizer, resolve  # noqa: E402

_ids = itertools.count()


def phase(engine: Engine, flood_ids: list[int], b_ids: list[int], flood: int, b_tenant: str,
          args: argparse.Namespace) -> tuple[float, float, float]:
    """(B's TTFT p50, p90, tokens per second) over one phase."""
    stop = threading.Event()
    tokens = [0]
    lock = threading.Lock()

    def flooder(kind: str, value) -> None:
        if kind != "token":
            return
        with lock:
            tokens[0] += 1
        if value.finish and not stop.is_set():
            submit_a()

    def submit_a() -> None:
        engine.submit(Sequence(f"A{next(_ids)}", list(flood_ids), SamplingParams(), args.tokens, flooder,
                               ignore_eos=True, tenant="A"))

    for _ in range(flood):
        submit_a()
    if flood:
        time.sleep(args.warmup)
    ttfts: list[float] = []
    with lock:
        tokens[0] = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.duration:
        sent, first = time.perf_counter(), threading.Event()

        def lone(kind: str, value, sent=sent, first=first) -> None:
            if kind == "token" and not first.is_set():
                ttfts.append(time.perf_counter() - sent)
                first.set()
        engine.submit(Sequence(f"B{next(_ids)}", list(b_ids), SamplingParams(), 16, lone, ignore_eos=True,
                               tenant=b_tenant))
        time.sleep(args.every)
    wall = time.perf_counter() - start
    served = tokens[0]
    stop.set()
    while engine.stats()[0] or engine.stats()[1]:
        time.sleep(0.1)
    ttfts.sort()
    return statistics.median(ttfts), ttfts[int(0.9 * (len(ttfts) - 1))], served / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, default=48)
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--every", type=float, default=1.5)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    source = resolve(None)
    tok = load_tokenizer(source)
    model = load_model(source, torch.float32)
    engine = Engine(model, EngineConfig(compile=not args.no_compile), eos_token_ids=[])
    engine.warm_up()
    flood_ids, b_ids = tok(FLOOD_PROMPT)["input_ids"], tok(B_PROMPT)["input_ids"]
    results = {}

    def drive() -> None:
        try:
            for name, flood, tenant in (("warm", 0, "B"), ("idle", 0, "B"), ("fair", args.flood, "B"),
                                        ("unfair", args.flood, "A")):
                results[name] = phase(engine, flood_ids, b_ids, flood, tenant, args)
        finally:
            engine.stop()

    threading.Thread(target=drive, daemon=True).start()
    engine.run()  # the main thread, as in the shard (OpenMP's pool belongs to it)
    print(f"engine alone, float32, compile={not args.no_compile}, {torch.get_num_threads()} threads, "
          f"prompts {len(flood_ids)}/{len(b_ids)} tokens")
    print(f"{'phase':8} {'B TTFT p50':>11} {'B TTFT p90':>11} {'tok/s':>8}")
    for name in ("idle", "fair", "unfair"):
        p50, p90, tps = results[name]
        print(f"{name:8} {p50:10.3f}s {p90:10.3f}s {tps:8.1f}")
    idle = results["idle"][0]
    print(f"B's TTFT p50 under the flood / idle: fair {results['fair'][0] / idle:.2f}x, "
          f"unfair {results['unfair'][0] / idle:.2f}x")


if __name__ == "__main__":
    main()
