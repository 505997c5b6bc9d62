"""`sluice health`: one probe for both services, for Docker's HEALTHCHECK and Kubernetes exec probes.

An http(s):// address is the router: GET it, healthy on 200. Anything else is a shard's gRPC address:
call its Health RPC, healthy when it says ok. Imports neither torch nor the router, so a probe costs
a Python start and one round trip, not a model load.
"""
from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence


def default_address() -> str:
    """The shard's own address when SHARD_ADDRESS is set (the shard container), else the router's /health."""
    shard = os.environ.get("SHARD_ADDRESS")
    if shard:
        # A wildcard bind is not an address to dial.
        return shard.replace("0.0.0.0:", "127.0.0.1:").replace("[::]:", "[::1]:")
    return f"http://127.0.0.1:{os.environ.get('PORT', '8080')}/health"


def check(address: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    if address.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(address, timeout=timeout_s) as reply:
                return reply.status == 200, f"{address}: HTTP {reply.status}"
        except urllib.error.HTTPError as exc:
            return False, f"{address}: HTTP {exc.code}"
        except OSError as exc:
            return False, f"{address}: {exc}"
    import grpc

    from sluice.pb import shard_pb2, shard_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = shard_pb2_grpc.ShardStub(channel).Health(shard_pb2.HealthRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{address}: {exc.code().name}"
    return reply.ok, f"{address}: ok={reply.ok} running={reply.running} waiting={reply.waiting}"


def wait_until_healthy(address: str, procs: Sequence[subprocess.Popen] = (), timeout_s: float = 300.0) -> None:
    """Probe `address` until it is healthy. RuntimeError if one of `procs` (what serves it) exits first,
    TimeoutError if `timeout_s` runs out: start-up scripts, benchmarks and tests wait the same way."""
    deadline = time.monotonic() + timeout_s
    while True:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with code {proc.returncode} before {address} was healthy")
        ok, message = check(address, timeout_s=2.0)
        if ok:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not healthy within {timeout_s:.0f} s ({message})")
        time.sleep(0.1)
