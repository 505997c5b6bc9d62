"""Real Sluice servers for the end-to-end tiers: `sluice serve` as a subprocess (router + shard over
gRPC), and small polling helpers. Imported by tests as `servers` (tests/ is on pytest's pythonpath).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from sluice.health import wait_until_healthy
from sluice.process import stop

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, procs: list[subprocess.Popen], log_path: Path, timeout: float = 240.0) -> None:
    try:
        wait_until_healthy(url + "/health", procs, timeout)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"server {exc}:\n{log_path.read_text()[-4000:]}") from None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus samples without labels or with them, as {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Server:
    def __init__(self, tmp: Path, **flags) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.shard_address = f"unix://{tmp / f'shard-{self.port}.sock'}"
        argv = [sys.executable, "-m", "sluice", "serve", "--hostname", "127.0.0.1", "--port", str(self.port),
                "--shard-uds-path", self.shard_address.removeprefix("unix://")]
        for key, value in flags.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        self.log_path = tmp / f"server-{self.port}.log"
        self.log = open(self.log_path, "wb")
        # The conversion cache (SLUICE_CACHE, default ~/.cache/sluice) is the user's own, as the test process's:
        # the embedded GGUF and its tokenizer are converted once on a machine, not once per server.
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 240.0) -> None:
        wait_healthy(self.url, [self.proc], self.log_path, timeout)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)

    def stop(self) -> int:
        code = stop(self.proc, 30)
        self.log.close()
        return code



def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def wait_for(predicate, timeout: float = 120.0) -> None:
    """Poll for a state the server reaches on its own; not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the server did not reach the expected state"
        time.sleep(0.1)
