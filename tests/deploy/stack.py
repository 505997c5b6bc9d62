"""The compose stack for tests/deploy/test_deploy_stack.py: our own dockerd, a Debian base image built here,
the image built from deploy/Dockerfile, `docker-compose up` with two shard replicas, torn down afterwards.

This machine reaches no image registry, so the base image comes from Debian packages (mmdebstrap |
docker import), pip inside the build gets the host's CA bundle and the torch CPU wheel from local disk
through deploy/local/. Missing Debian packages are installed first. Nothing is skipped: if Docker
cannot run here the test fails and says why.

Why a thread: `StackStart` can bring the stack up (~140 s: packages, dockerd, base image, build, two
replicas healthy) while other work goes on. Started from collection beside the rest of the suite it made
the suite slower on 2 cores (tests/deploy/conftest.py says by how much), so the `stack` fixture starts it
and waits. dockerd and mmdebstrap run under `nice`, for when something else does run beside it.

Imported as `stack` (tests/deploy is on sys.path: it has no __init__.py), so the conftest and the test
module share one module and its `current()` StackStart.
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

PACKAGES = {"dockerd": "docker.io", "docker-compose": "docker-compose", "mmdebstrap": "mmdebstrap"}
BASE_IMAGE = "sluice-base:bookworm"
IMAGE = "sluice:stack-test"
TORCH_WHEELS = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl"))
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LIMIT = 2
REPLICAS = 2
# Background work yields to the tests in the foreground (children inherit it: dockerd's builds and containers).
NICE = ["nice", "-n", "19"]


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
        self.stopped = False
        # Images in memory (~5 GB at the peak of the build): on this machine's disk, writing the layers and
        # deleting them afterwards took minutes; unmounting a tmpfs takes none.
        (self.dir / "data").mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12g", "sluice-docker", str(self.dir / "data")],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            shutil.rmtree(self.dir, ignore_errors=True)
        assert mounted.returncode == 0, f"cannot mount a tmpfs for dockerd's data: {mounted.stderr}"
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.dir}/docker.sock")
        self.log = open(self.dir / "dockerd.log", "wb")
        self.proc = subprocess.Popen(
            [*NICE, "dockerd", "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec"),
             "--pidfile", str(self.dir / "dockerd.pid"), "--host", self.env["DOCKER_HOST"]],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "version"], env=self.env, capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log_tail()
                self.stop()
                pytest.fail(f"dockerd did not start:\n{log}")
            time.sleep(0.5)

    def log_tail(self) -> str:
        try:
            return (self.dir / "dockerd.log").read_text(errors="replace")[-3000:]
        except OSError as exc:
            return f"(no dockerd log: {exc})"

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        stop(self.proc, 60)
        self.log.close()
        subprocess.run(["umount", "-R", str(self.dir / "data")], capture_output=True)  # the tmpfs, and all in it
        shutil.rmtree(self.dir, ignore_errors=True)


def build_base_image(env: dict) -> None:
    debootstrap = subprocess.Popen(
        [*NICE, "mmdebstrap", "--variant=minbase", "--include=python3,python3-pip,python3-venv,ca-certificates",
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


class Cancelled(Exception):
    """down() was called while the stack was still starting."""


class StackStart:
    """Brings the stack up to "REPLICAS replicas healthy" in a thread of its own: `url` once it is, or
    `error` (whatever it raised); `timings` per phase. `wait()` joins it and raises its failure; `down()`
    (idempotent) prints the compose and dockerd logs if it never got up, runs `docker-compose down
    --volumes` and stops dockerd, unmounting its tmpfs."""

    def __init__(self) -> None:
        self.url: str | None = None
        self.error: BaseException | None = None
        self.timings: dict[str, float] = {}
        self.phase = "not started"
        self.docker: Dockerd | None = None
        self.env: dict | None = None
        self.compose = ["docker-compose", "--file", str(ROOT / "docker-compose.yml")]
        self.started = self.ready = None
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="stack-start", daemon=True)

    def start(self) -> StackStart:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _enter(self, phase: str) -> None:
        if self._stopping:
            raise Cancelled(f"stack start cancelled before: {phase}")
        self.phase = phase

    def _run(self) -> None:
        try:
            t = time.monotonic()
            self._enter("installing packages")
            install_packages()
            self._enter("starting dockerd")
            docker = Dockerd()
            # The compose project is named for this process; the router's host port is picked just
            # before `up`, so that no test running meanwhile can be given it first.
            # COMPILE=false: the replicas serve eagerly. Their two background compiles on 2 cores made this
            # test's first 16-token chat completion take 20-29 s, and nothing here checks compiling
            # (tests/engine/test_compile.py does).
            env = dict(docker.env, COMPOSE_PROJECT_NAME=f"sluicetest{os.getpid()}", SLUICE_IMAGE=IMAGE,
                       BASE_IMAGE=BASE_IMAGE, PIP_OPTIONS="", MAX_CONCURRENT_REQUESTS=str(LIMIT), COMPILE="false")
            with self._lock:
                if self._stopping:
                    docker.stop()
                    raise Cancelled("stack start cancelled while dockerd started")
                self.docker, self.env = docker, env
            self.timings["packages and dockerd"] = time.monotonic() - t
            t = time.monotonic()
            self._enter("building the base image")
            build_base_image(env)
            local_build_files()
            self.timings["base image"] = time.monotonic() - t
            t = time.monotonic()
            self._enter("building the image")
            run([*self.compose, "build"], env, 900)
            run(["docker", "image", "prune", "--force"], env, 120)  # the build stage: ~3 GB of memory back
            self.timings["build"] = time.monotonic() - t
            t = time.monotonic()
            self._enter("docker-compose up")
            port = free_port()
            env["HTTP_PORT"] = str(port)
            run([*self.compose, "up", "-d", "--scale", f"shard={REPLICAS}"], env, 600)
            url = f"http://127.0.0.1:{port}"
            self._enter(f"waiting for {REPLICAS} healthy replicas")
            wait_for_replicas(url, REPLICAS, 300)
            self.timings["up until healthy"] = time.monotonic() - t
            self.ready = time.monotonic()
            self.phase = "up"
            self.url = url
        except BaseException as exc:  # pytest.fail raises an Exception-less OutcomeException
            self.error = exc

    def wait(self, timeout: float) -> str:
        """The router's url once REPLICAS replicas are healthy; the start's own failure if it failed."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            pytest.fail(f"the stack was not up {timeout:.0f}s after the tests began to wait; still {self.phase}")
        if self.error is not None:
            raise self.error
        assert self.url, "the stack's start ended without a url or an error"
        return self.url

    def summary(self) -> str:
        t = self.timings
        return (f"stack: base image {t['base image']:.0f}s, build {t['build']:.0f}s, "
                f"up until healthy {t['up until healthy']:.0f}s")

    def down(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            docker = self.docker
        try:
            if docker is not None:
                if self.url is None:
                    logs = subprocess.run([*self.compose, "logs", "--no-color", "--tail", "50"], env=self.env,
                                          capture_output=True, text=True, timeout=120)
                    print(logs.stdout[-6000:], logs.stderr[-2000:], docker.log_tail())
                subprocess.run([*self.compose, "down", "--volumes", "--timeout", "10"], env=self.env,
                               capture_output=True, timeout=300)
        finally:
            if docker is not None:
                docker.stop()
            # Whatever the thread was running fails fast without its dockerd; a dockerd it was starting
            # when _stopping was set, it stops itself. Only an apt-get install is not waited for to the end.
            if self._thread.is_alive():
                self._thread.join(120)


_current: StackStart | None = None


def current() -> StackStart | None:
    """The stack start of this session, if one began."""
    return _current


def begin() -> StackStart:
    """This session's stack start, started now if none was."""
    global _current
    if _current is None:
        _current = StackStart().start()
    return _current
