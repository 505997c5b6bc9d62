"""A stream survives its replica: two shard replicas behind one router, 8 concurrent greedy streams, one
replica killed (SIGKILL) or drained past its shutdown timeout mid-stream. The router resubmits each of
that replica's generations to the other as prompt + the tokens already sent, so every stream completes
with exactly the text of an uninterrupted run, no error event, and /metrics counts the failovers.

Float32, so that the resubmitted prefill and the uninterrupted decode pick the same greedy tokens. The
replica is paused (SIGSTOP) before the signal, so its streams are surely mid-stream when it lands."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from servers import ROOT, free_port, wait_for
from sluice.process import stop
from sse_client import RawStream

PROMPTS = [f"{w} {i}," for i, w in enumerate(["one", "two", "three", "four", "five", "six", "seven", "eight"])]
MAX_TOKENS = 300


def body(prompt: str, stream: bool) -> dict:
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0, "stream": stream}


class Cluster:
    def __init__(self, tiny_llama, tmp) -> None:
        self.tmp, self.model = tmp, str(tiny_llama)
        self.sockets = [f"unix://{tmp}/replica-{i}.sock" for i in range(2)]
        self.log = open(tmp / "log", "wb")
        self.shards = [self._shard(i) for i in range(2)]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.router = subprocess.Popen(
            [sys.executable, "-m", "sluice", "router", "--model-id", self.model, "--hostname", "127.0.0.1",
             "--port", str(self.port), *[a for s in self.sockets for a in ("--shard-address", s)],
             "--max-failovers", "2"], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_both_healthy()

    def _shard(self, i: int) -> subprocess.Popen:
        # --shutdown-timeout 0: a SIGTERM fails what is in flight at once (the drain's timeout ran out).
        return subprocess.Popen([sys.executable, "-m", "sluice", "shard", "--model-id", self.model, "--dtype",
                                 "float32", "--num-threads", "1", "--address", self.sockets[i],
                                 "--shutdown-timeout", "0"],
                                cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def restart(self, i: int) -> None:
        stop(self.shards[i], 30)
        self.shards[i] = self._shard(i)
        self.wait_both_healthy()

    def wait_both_healthy(self) -> None:
        def both() -> bool:
            assert self.router.poll() is None, (self.tmp / "log").read_text()[-3000:]
            try:
                shards = httpx.get(self.url + "/health", timeout=5).json().get("shards", [])
            except httpx.HTTPError:
                return False
            return len(shards) == 2 and all(s["ok"] for s in shards)

        wait_for(both, timeout=240)

    def failovers(self) -> float:
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("sluice_failovers_total "):
                return float(line.split()[1])
        return 0.0

    def close(self) -> None:
        stop(self.router, 30)
        for shard in self.shards:
            stop(shard, 30)
        self.log.close()


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    c = Cluster(tiny_llama, tmp_path_factory.mktemp("failover"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def references(cluster) -> list[str]:
    def one(prompt: str) -> str:
        r = httpx.post(cluster.url + "/v1/completions", json=body(prompt, False), timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    return [one(p) for p in PROMPTS]


def streamed_text(s: RawStream, first) -> str:
    events = first + s.events()
    assert events[-1].data == "[DONE]"
    chunks = [e.json() for e in events[:-1]]
    assert all("error" not in c for c in chunks), [c for c in chunks if "error" in c]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    return "".join(c["choices"][0]["text"] for c in chunks)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "drained"])
def test_streams_survive_their_replica(cluster, references, how):
    before = cluster.failovers()
    streams = [RawStream(cluster.url, "/v1/completions", body(p, True)) for p in PROMPTS]
    firsts = [s.events(1) for s in streams]  # every stream has begun, on one replica or the other
    victim = cluster.shards[0]
    os.kill(victim.pid, signal.SIGSTOP)  # its streams cannot finish now: they are surely cut mid-stream
    os.kill(victim.pid, how)
    os.kill(victim.pid, signal.SIGCONT)
    with ThreadPoolExecutor(len(streams)) as pool:
        texts = list(pool.map(streamed_text, streams, firsts))
    assert texts == references
    assert cluster.failovers() - before >= 1
    victim.wait(60)
    cluster.restart(0)
