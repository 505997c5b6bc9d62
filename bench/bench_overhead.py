"""What the router and gRPC cost: the same workload through `sluice serve` (HTTP, router, gRPC, shard)
and through the same engine driven in-process, side by side in one run.

    python bench/bench_overhead.py [--concurrency 16] [--requests 48] [--rounds 3] [--prompt-words 128]
        [--output-tokens 128] [--length-spread 0.25 (0: equal lengths)] [--num-threads N (both sides)]

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

Through HTTP the server is driven three times a round, by three streaming /v1/completions load generators:
bench/sse_load.c (C, one epoll loop; each wake-up waits GATHER_US so that it reads several streams' events),
sse_client's (a bare asyncio protocol, on uvloop) and bench_llamacpp's (httpx). All share the two cores with
the server, and whatever CPU the generator takes the engine loses (it has no counterpart in-process; a remote
client costs the server nothing): at c=16 the C one takes ~9 us a token, the lean Python one ~22-27, httpx
~4% of a core, so the C row is the closest measure of the router's and gRPC's own overhead. Overhead = 1 -
HTTP tok/s / in-process tok/s (issue 11's target: at most 5% at c=16).

Where the overhead comes from, measured in the same rounds: the CPU each part spends per streamed token on
the C client's side (the router's process; the shard's threads but the engine's, i.e. gRPC's and its serving
loop's; the load generator), and a last side, the in-process engine again while a plain CPU load runs
beside it in a process of its own (bursts every 16 ms, like a step's tokens) taking as much of a core as
that serving path took. When that side loses what the HTTP side loses, the overhead is the serving path's
CPU on cores the engine needs, whatever the code that spends it.

`--num-threads N` runs both sides' engine on N threads: with fewer than the host's cores, the serving path
has cores of its own, as on a host with cores to spare (2-core Zen 5 host, session 28: one engine thread,
overhead 1.4%; two, 8.9%: each microsecond the serving path takes from a core of the engine's stalls both of
its threads, which meet at a barrier after every parallel region).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sse_client  # noqa: E402
from bench_llamacpp import Result, drive, per_prompt, free_port, make_prompt, median_of, serving, sluice_cmd, summarize, CACHE  # noqa: E402

# The C generator's wait on each wake-up (bench/sse_load.c): a step's events for every stream are read on one
# or two wake-ups instead of sixteen (~9 us of its CPU a token against ~16 without, and ~22-27 for the lean
# Python one). Stamps come up to this late: the ITL columns of that side are coarser by as much.
GATHER_US = 1000


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


def _cpu_s(stat_path: str) -> float:
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds a process has spent, all its threads (ended ones too)."""
    return _cpu_s(f"/proc/{pid}/stat")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds by thread, for the threads alive now."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = _cpu_s(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            pass
    return out


def serving_threads_cpu(before: dict[int, float], after: dict[int, float], engine_threads: int) -> float:
    """The shard's CPU outside its engine: every thread but the `engine_threads` busiest (the step loop and
    OpenMP's workers, which compute the model), i.e. gRPC's and the serving loop's."""
    spent = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
    return sum(spent[engine_threads:])


def server_processes(port: int) -> tuple[int, list[int]]:
    """`sluice serve --port PORT`'s process (the router runs in it) and its children (the shard)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and b"--port" in argv and argv[argv.index(b"--port") + 1] == str(port).encode():
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return int(pid), [int(c) for c in f.read().split()]
    raise SystemExit(f"no `sluice serve --port {port}` process found")


# A CPU load of its own process: `duty` of one core, in bursts every `period` seconds.
_LOAD = """
import sys, time
duty, period = float(sys.argv[1]), float(sys.argv[2])
while True:
    time.sleep(period * (1 - duty))
    end, x = time.thread_time() + period * duty, 0
    while time.thread_time() < end:
        for i in range(100):
            x += i
"""


def cpu_load(duty: float, period_s: float = 0.016) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _LOAD, str(max(0.0, min(duty, 0.95))), str(period_s)])


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
    ap.add_argument("--num-threads", type=int, default=None,
                    help="the engine's torch threads on both sides (default: sluice serve's, all cores); fewer than the "
                         "cores leaves the serving path cores of its own, as on a host with cores to spare")
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
    engine = build_engine(ShardSettings(num_threads=args.num_threads), source)
    sides = ("in-process engine", "HTTP, C client", "HTTP, lean client", "HTTP, httpx client", "in-process + CPU load")
    runs: dict[str, list[tuple[dict, float]]] = {side: [] for side in sides}
    # Per round, the C side's CPU per streamed token (us): router, shard, the shard's over the engine
    # in-process, the load generator; and the CPU load's duty (of one core) the last side ran beside.
    parts: list[dict[str, float]] = []

    def measure() -> None:
        try:
            t0 = time.monotonic()
            while engine.runner.compiled is None and engine.compile_thread.is_alive():
                time.sleep(0.5)
            print(f"    in-process engine compiled after {time.monotonic() - t0:.0f} s", flush=True)
            port = free_port()
            CACHE.mkdir(parents=True, exist_ok=True)
            with serving("sluice", sluice_cmd(port, f"--num-threads {args.num_threads}" if args.num_threads else "", 4096), port, CACHE / "sluice-overhead.log",
                         wait_for_log="compiled the decode graphs") as url:
                asyncio.run(drive(url, new_prompts(2), 2, 8))  # warm-up, not measured
                local_round(engine, tok, new_prompts(2), 2, 8)
                router_pid, shard_pids = server_processes(port)
                for r in range(args.rounds):
                    lengths = [max(1, round(args.output_tokens * (1 + length_rng.uniform(-1, 1) * args.length_spread)))
                               for _ in range(args.requests)]
                    part: dict[str, float] = {}
                    for side in sides:
                        prompts = new_prompts(args.requests)
                        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                        server0 = [process_cpu(p) for p in (router_pid, *shard_pids)]
                        threads0 = thread_cpu(shard_pids[0])
                        load = cpu_load(part["duty"]) if side == sides[4] else None
                        try:
                            if side in (sides[0], sides[4]):
                                results, wall = local_round(engine, tok, prompts, args.concurrency, lengths)
                            elif side == sides[1]:
                                results, wall = sse_client.drive_c(url, prompts, args.concurrency, lengths, GATHER_US)
                            elif side == sides[2]:
                                results, wall = sse_client.run(sse_client.drive(url, prompts, args.concurrency, lengths))
                            else:
                                results, wall = asyncio.run(drive(url, prompts, args.concurrency, lengths))
                        finally:
                            if load is not None:
                                load.kill()
                                load.wait()
                        server1 = [process_cpu(p) for p in (router_pid, *shard_pids)]
                        threads1 = thread_cpu(shard_pids[0])
                        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                        own = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
                        if side == sides[1]:  # the C generator's CPU: a child process, counted once waited for
                            own = child1.ru_utime + child1.ru_stime - child0.ru_utime - child0.ru_stime
                        runs[side].append((summarize(results, wall), own / wall))
                        tokens = max(1, sum(len(res.stamps) for res in results))
                        if side == sides[0]:
                            part["engine"] = 1e6 * own / tokens  # the engine's threads and the stamping callback
                        elif side == sides[1]:
                            part["router"] = 1e6 * (server1[0] - server0[0]) / tokens
                            part["shard"] = 1e6 * (sum(server1[1:]) - sum(server0[1:])) / tokens
                            part["shard_serving"] = 1e6 * serving_threads_cpu(threads0, threads1,
                                                                              torch.get_num_threads()) / tokens
                            part["client"] = 1e6 * own / tokens
                            part["serving"] = part["router"] + part["shard_serving"] + part["client"]
                            part["duty"] = part["serving"] * tokens / wall / 1e6
                        print(f"    round {r + 1}, {side}: {runs[side][-1][0]['tok_s']:.1f} tok/s", flush=True)
                    parts.append(part)
        finally:
            engine.stop()

    # The engine's loop keeps the main thread, as in the shard (Engine.start's docstring says why); the rounds
    # run from a second thread, the server idle during in-process rounds and the engine idle during HTTP ones.
    threading.Thread(target=measure, daemon=True).start()
    with torch.inference_mode():
        engine.run()

    threads = f"{args.num_threads} engine thread(s)" if args.num_threads else "the default engine threads"
    print(f"\n{threads} on {os.cpu_count()} cores; c={args.concurrency}, {args.rounds} rounds of {args.requests} requests per side, {args.prompt_words}-word "
          f"prompts, {args.output_tokens} output tokens (x (1 +- {args.length_spread}), ignore_eos); medians over the rounds")
    print(f"{'':<22s}{'out tok/s':>10s}{'TTFT p50 ms':>12s}{'ITL p50 ms':>11s}{'ITL p95 ms':>11s}{'out/req':>9s}"
          f"{'failed':>8s}{'client CPU':>12s}")
    median = {side: median_of([s for s, _ in runs[side]]) for side in sides}
    for side in sides:
        cpu = statistics.median(c for _, c in runs[side])
        print(row(side, median[side]) + (f"{100 * cpu:>10.1f} %" if side in sides[1:4] else ""))
    local = [s["tok_s"] for s, _ in runs[sides[0]]]
    for side in sides[1:]:
        # Each round's HTTP run against the in-process run just before it: drift on a shared host cancels.
        ratios = [s["tok_s"] / l for (s, _), l in zip(runs[side], local)]
        target = "; target <= 5%" if side != sides[4] else ", from the CPU load alone"
        print(f"{side}: throughput / in-process by round {', '.join(f'{x:.3f}' for x in ratios)}; median "
              f"{statistics.median(ratios):.3f} (overhead {100 * (1 - statistics.median(ratios)):.1f}%{target})")
    print("client CPU: the load generator's own, in % of one core (it shares the two cores with the server); the\n"
          "in-process side's client is a callback in the engine's thread")
    med = median_of(parts)
    print(f"\nCPU per streamed token, C client side (medians over the rounds): the router's process {med['router']:.0f} us, "
          f"the shard's serving threads {med['shard_serving']:.0f} us, the load generator {med['client']:.0f} us: the "
          f"serving path\ntook {med['serving']:.0f} us a token, {100 * med['duty']:.1f}% of one core, and the last side "
          f"ran that much CPU load beside the in-process engine.\nThe shard's process in all: {med['shard']:.0f} us a "
          f"token, against {med['engine']:.0f} us in-process (engine and stamping callback).")


if __name__ == "__main__":
    main()
