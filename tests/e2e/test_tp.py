"""Tensor parallelism through the real router and gRPC: N ranks give N=1's greedy tokens."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from servers import ROOT

PROMPTS = [
    "<|im_start|>user\nWhat is deep learning?<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is",
    "def fibonacci(n):",
]


def greedy(url: str, new_tokens: int = 16) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens, "details": True}}
        r = httpx.post(url + "/generate", json=body, timeout=300)
        assert r.status_code == 200, r.text
        out.append([t["id"] for t in r.json()["details"]["tokens"]])
    return out


def test_smollm2_three_ranks_match_one(start_server, fp32_server):
    one = greedy(fp32_server)  # the shared one-rank server, same flags
    url = start_server(dtype="float32", num_shard=3)
    assert httpx.get(url + "/info").json()["num_shard"] == 3
    assert greedy(url) == one


@pytest.mark.parametrize("n", [2, 4])
def test_tiny_llama_ranks_match_one(start_server, tiny_fp32_server, tiny_llama, n):
    # 4 heads, 2 KV heads: N=2 splits both, N=4 replicates each KV head on two ranks.
    one = greedy(tiny_fp32_server.url, 24)  # the shared one-rank server, same flags
    assert greedy(start_server(dtype="float32", model_id=tiny_llama, num_shard=n), 24) == one


def test_indivisible_split_fails_before_starting(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sluice", "serve", "--num-shard", "2", "--port", "0", "--shard-uds-path", str(tmp_path / "s.sock")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "9 attention heads, 3 KV heads" in proc.stderr
    assert "one of [1, 3]" in proc.stderr


def _rank_pids(marker: str, rank: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmd and f"RANK={rank}".encode() in env:
            pids.append(int(proc.name))
    return pids


def test_killed_rank_ends_streams_with_error_and_group_restarts(start_server, tiny_llama):
    url = start_server(dtype="float32", model_id=tiny_llama, num_shard=2, max_total_tokens=512)
    marker = start_server.servers[-1].log_path.name.replace("server-", "shard-").replace(".log", ".sock")
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 400}}
    events = []
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(json.loads(line[5:]))
            if len(events) == 3:
                pids = _rank_pids(marker, 1)
                assert pids, "rank 1 process not found"
                os.kill(pids[0], signal.SIGKILL)
    assert "error" in events[-1], events[-1]
    assert events[-1]["error_type"] == "generation"
    assert events[-1].get("generated_text") is None
    # The launcher restarts the whole group and the same router serves again.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url + "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 4}}, timeout=30)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    assert r.status_code == 200, r.text


def test_sigterm_drains_the_group(start_server, tiny_llama):
    """SIGTERM reaching every rank (as from a launcher or Ctrl-C): rank 0 drains, the others wait for its
    word, the stream in flight finishes whole, and the group exits 0."""
    from servers import children, wait_for

    url = start_server(dtype="float32", model_id=tiny_llama, num_shard=2, max_total_tokens=512)
    srv = start_server.servers[-1]
    marker = srv.log_path.name.replace("server-", "shard-").replace(".log", ".sock")
    (rank0,) = children(srv.proc.pid)
    (rank1,) = _rank_pids(marker, 1)
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 60, "details": True}}
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data:"))
        events = [json.loads(next(lines)[5:])]
        os.kill(rank0, signal.SIGSTOP)  # so the signals surely land mid-stream
        os.kill(rank1, signal.SIGTERM)
        os.kill(rank0, signal.SIGTERM)
        os.kill(rank0, signal.SIGCONT)
        events += [json.loads(line[5:]) for line in lines]
    assert all("error" not in e for e in events), events[-1]
    assert len(events) == 60 and events[-1]["details"]["generated_tokens"] == 60
    wait_for(lambda: "shard exited with code 0" in srv.log_path.read_text())
    assert not os.path.exists(f"/proc/{rank1}") or "zombie" in open(f"/proc/{rank1}/status").read()
