"""What a failover costs: the pause a client sees when its stream's replica dies mid-stream.

    python bench/bench_failover.py [--streams 4] [--tokens 128] [--cut-after 48] [--dtype auto]

Starts two `sluice shard` replicas (embedded SmolLM2, eager: two background compiles would fight over
the cores) behind one `sluice router`, all on 127.0.0.1, then runs two phases with the same load
(`--streams` concurrent greedy streams on /v1/completions, ~128-token unique prompts):

1. uncut: TTFT and inter-token latency (ITL) as a client sees them;
2. cut: once every stream has received `--cut-after` tokens, replica 0 is killed (SIGKILL). The router
   resubmits each of its streams to replica 1 as prompt + tokens sent. For each cut stream the pause is
   the longest gap between two tokens; it is compared with the uncut phase's ITL and TTFT.

A failover costs one prefill of prompt + sent tokens on the surviving replica (which has not seen the
prompt: no prefix hit), queued behind that replica's own running streams.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import ROOT, free_port  # noqa: E402

from sluice.health import wait_until_healthy  # noqa: E402
from sluice.process import stop  # noqa: E402

TOPICS = ["rivers", "bridges", "clocks", "bees", "glass", "maps", "salt", "bells", "kites", "ink", "tea", "wool"]


def prompt(i: int, phase: str) -> str:
    topic = TOPICS[i % len(TOPICS)]
    # ~128 tokens, unique per stream and phase, so no prefix is shared between requests.
    filler = " ".join(f"{topic} {phase} note {k}." for k in range(30))
    return f"Notes ({phase} {i}): {filler}\nNow write a long essay about {topic}:"


class Stream(threading.Thread):
    """One streamed completion; the arrival time of each token."""

    def __init__(self, url: str, text: str, tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.text, self.tokens = url, text, tokens
        self.start_t, self.stamps, self.error = 0.0, [], None

    def run(self) -> None:
        body = {"model": "m", "prompt": self.text, "max_tokens": self.tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        self.start_t = time.perf_counter()
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and line != "data: [DONE]":
                    event = json.loads(line[5:])
                    if "error" in event:
                        self.error = event
                    self.stamps.append(time.perf_counter())

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def run_phase(url: str, n: int, tokens: int, phase: str, cut=None) -> list[Stream]:
    streams = [Stream(url, prompt(i, phase), tokens) for i in range(n)]
    for s in streams:
        s.start()
    if cut is not None:
        cut(streams)
    for s in streams:
        s.join()
    return streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--cut-after", type=int, default=48)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    log = open(tmp / "log", "wb")
    sockets = [f"unix://{tmp}/replica-{i}.sock" for i in range(2)]
    shards = [subprocess.Popen([sys.executable, "-m", "sluice", "shard", "--dtype", args.dtype, "--no-compile",
                                "--num-threads", "1", "--address", s], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
              for s in sockets]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    router = subprocess.Popen([sys.executable, "-m", "sluice", "router", "--hostname", "127.0.0.1", "--port", str(port),
                               *[a for s in sockets for a in ("--shard-address", s)]],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(url + "/health", [router, *shards], timeout_s=600)
        while not all(s["ok"] for s in httpx.get(url + "/health").json().get("shards", [{}, {}])):
            time.sleep(1)
        run_phase(url, 2, 8, "warm-up")
        uncut = run_phase(url, args.streams, args.tokens, "uncut")

        def kill_replica_0(streams: list[Stream]) -> None:
            while min(len(s.stamps) for s in streams) < args.cut_after:
                time.sleep(0.005)
            os.kill(shards[0].pid, signal.SIGKILL)

        cut = run_phase(url, args.streams, args.tokens, "cut", kill_replica_0)
    finally:
        stop(router, 30)
        for s in shards:
            stop(s, 30)
        log.close()

    ttft = statistics.median(s.stamps[0] - s.start_t for s in uncut)
    itl = statistics.median(g for s in uncut for g in s.gaps())
    itl_cut = statistics.median(g for s in cut for g in s.gaps())
    pauses = sorted(max(s.gaps()) for s in cut)
    # Streams that stayed on replica 1 pause too: the resubmitted prefills run in their steps.
    affected = [p for p in pauses if p > 5 * itl]
    complete = all(len(s.stamps) == args.tokens and s.error is None for s in cut)
    print(f"{args.streams} streams, {args.tokens} tokens each, replica 0 killed after {args.cut_after} tokens "
          f"(dtype {args.dtype}, eager, 2 replicas x 1 thread)")
    print(f"uncut: TTFT p50 {ttft * 1000:.0f} ms, ITL p50 {itl * 1000:.1f} ms")
    print(f"cut:   {len(affected)} of {len(cut)} streams paused > 5x ITL, all complete with no error: {complete}; "
          f"ITL p50 over all gaps {itl_cut * 1000:.1f} ms")
    if affected:
        p50 = statistics.median(affected)
        print(f"failover pause p50 {p50 * 1000:.0f} ms (max {affected[-1] * 1000:.0f} ms): "
              f"{p50 / itl:.1f}x the ITL, {p50 / ttft:.2f}x the uncut TTFT; each stream's longest gap: "
              + ", ".join(f"{p * 1000:.0f}" for p in pauses) + " ms")


if __name__ == "__main__":
    main()
