"""The compose stack for real: our own dockerd, a Debian base image built here, the image built from
deploy/Dockerfile, `docker-compose up` with two shard replicas, then the README's Python client against
it from the host, a 429 past the limit, and everything torn down.

This machine reaches no image registry, so the base image comes from Debian packages (mmdebstrap |
docker import), pip inside the build gets the host's CA bundle and the torch CPU wheel from local disk
through deploy/local/. Missing Debian packages are installed first. Nothing is skipped: if Docker
cannot run here the test fails and says why.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from servers import ROOT, free_port
from sluice.process import stop

pytestmark = [pytest.mark.stack, pytest.mark.timeout(1200)]

PACKAGES = {"dockerd": "docker.io", "docker-compose": "docker-compose", "mmdebstrap": "mmdebstrap"}
BASE_IMAGE = "sluice-base:bookworm"
IMAGE = "sluice:stack-test"
TORCH_WHEELS = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl"))
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LIMIT = 2


def run(argv: list[str], env: dict, timeout: float, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, env=env, timeout=timeout, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(argv)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def install_packages() -> None:
    missing = [pkg for binary, pkg in PACKAGES.items() if not shutil.which(binary)]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-q"], env, 600)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, "iptables"], env, 900)


class Dockerd:
    """A dockerd of our own: data, exec root and socket in a temp dir, stopped by PID."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-docker-"))  # short: the socket path has a length limit
        # Images in memory (~5 GB at the peak of the build): on this machine's disk, writing the layers and
        # deleting them afterwards took minutes; unmounting a tmpfs takes none.
        (self.dir / "data").mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12g", "sluice-docker", str(self.dir / "data")],
                                 capture_output=True, text=True)
        assert mounted.returncode == 0, f"cannot mount a tmpfs for dockerd's data: {mounted.stderr}"
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.dir}/docker.sock")
        self.log = open(self.dir / "dockerd.log", "wb")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec"),
             "--pidfile", str(self.dir / "dockerd.pid"), "--host", self.env["DOCKER_HOST"]],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "version"], env=self.env, capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"dockerd did not start:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self) -> str:
        return (self.dir / "dockerd.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        stop(self.proc, 60)
        self.log.close()
        subprocess.run(["umount", "-R", str(self.dir / "data")], capture_output=True)  # the tmpfs, and all in it
        shutil.rmtree(self.dir, ignore_errors=True)


def build_base_image(env: dict) -> None:
    debootstrap = subprocess.Popen(
        ["mmdebstrap", "--variant=minbase", "--include=python3,python3-pip,python3-venv,ca-certificates",
         "bookworm", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    imported = subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=debootstrap.stdout, env=env,
                              capture_output=True, text=True, timeout=600)
    debootstrap.stdout.close()
    err = debootstrap.communicate(timeout=60)[1]
    assert debootstrap.returncode == 0 and imported.returncode == 0, (
        f"base image: mmdebstrap {debootstrap.returncode}, docker import {imported.returncode}\n"
        f"{err.decode(errors='replace')[-2000:]}\n{imported.stderr}")


def local_build_files() -> None:
    """deploy/local/ (git-ignored) goes into the build stage: the torch wheel, the CA bundle, a pip.conf."""
    assert TORCH_WHEELS, "no torch CPU wheel in /opt/wheels"
    local = ROOT / "deploy" / "local"
    for src in (*TORCH_WHEELS, CA_BUNDLE):
        if not (local / src.name).exists():
            shutil.copy(src, local / src.name)
    (local / "pip.conf").write_text("[global]\nfind-links = /tmp/local\ncert = /tmp/local/ca-certificates.crt\n")


@pytest.fixture(scope="module")
def stack():
    install_packages()
    docker = Dockerd()
    port = free_port()
    env = dict(docker.env, COMPOSE_PROJECT_NAME=f"sluicetest{port}", SLUICE_IMAGE=IMAGE, BASE_IMAGE=BASE_IMAGE,
               PIP_OPTIONS="", HTTP_PORT=str(port), MAX_CONCURRENT_REQUESTS=str(LIMIT))
    compose = ["docker-compose", "--file", str(ROOT / "docker-compose.yml")]
    try:
        t0 = time.monotonic()
        build_base_image(env)
        local_build_files()
        t1 = time.monotonic()
        run([*compose, "build"], env, 900)
        run(["docker", "image", "prune", "--force"], env, 120)  # the build stage: ~3 GB of memory back
        t2 = time.monotonic()
        run([*compose, "up", "-d", "--scale", "shard=2"], env, 600)
        url = f"http://127.0.0.1:{port}"
        wait_for_replicas(url, 2, 300)
        print(f"\nstack: base image {t1 - t0:.0f}s, build {t2 - t1:.0f}s, up until healthy {time.monotonic() - t2:.0f}s")
        yield url
    except BaseException:
        logs = subprocess.run([*compose, "logs", "--no-color", "--tail", "50"], env=env, capture_output=True, text=True)
        print(logs.stdout[-6000:], logs.stderr[-2000:], docker.log_tail())
        raise
    finally:
        subprocess.run([*compose, "down", "--volumes", "--timeout", "10"], env=env, capture_output=True, timeout=300)
        docker.stop()


def wait_for_replicas(url: str, replicas: int, timeout: float) -> None:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url + "/health", timeout=5)
            if last.status_code == 200 and sum(s["ok"] for s in last.json()["shards"]) == replicas:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(2)
    pytest.fail(f"router at {url} did not see {replicas} healthy shards in {timeout:.0f}s: {last!r}")


def test_readme_client_streams_a_chat_completion(stack):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=stack)
    chunks = list(client.chat.completions.create(
        messages=[{"role": "user", "content": "Count to 10"}], stream=True, max_tokens=16))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) > 2 and text.strip()
    assert httpx.get(stack + "/info").json()["num_replicas"] == 2


def test_burst_past_the_limit_gets_429(stack):
    """LIMIT + 4 requests at once: greedy counting runs to max_new_tokens, so the first LIMIT admitted are
    still generating when the rest arrive, and those are refused with 429 before any stream starts."""
    body = {"inputs": "1, 2, 3, 4, 5,", "parameters": {"max_new_tokens": 24}}
    barrier = threading.Barrier(LIMIT + 4)
    replies: list[httpx.Response] = []

    def one() -> None:
        barrier.wait()
        replies.append(httpx.post(stack + "/generate_stream", json=body, timeout=300))

    threads = [threading.Thread(target=one) for _ in range(LIMIT + 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    codes = sorted(r.status_code for r in replies)
    assert len(codes) == LIMIT + 4 and set(codes) == {200, 429}, codes
    assert all(r.json()["error_type"] == "overloaded" for r in replies if r.status_code == 429)
    metrics = httpx.get(stack + "/metrics").text
    assert f'tgi_request_failure_total{{err="overloaded"}} {codes.count(429)}.0' in metrics
