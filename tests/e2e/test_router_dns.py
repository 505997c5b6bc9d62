"""`--shard-address dns:///NAME:PORT`: the router resolves the name itself and keeps one replica per
address (compose --scale, Kubernetes headless Services). Here a real shard behind `localhost`; the
compose stack test (test_deploy_stack.py) covers two replicas behind one name; tests/unit/test_resolve.py
the name expansion alone.
`sluice health` is the probe the image and the manifests use."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
from servers import ROOT, free_port, wait_healthy

from sluice.process import stop


def test_router_finds_a_shard_by_dns_name(tmp_path):
    shard_port, http_port = free_port(), free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(tmp_path / "log", "wb")
    shard = subprocess.Popen([sys.executable, "-m", "sluice", "shard", "--address", f"127.0.0.1:{shard_port}"],
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    router = subprocess.Popen([sys.executable, "-m", "sluice", "router", "--hostname", "127.0.0.1", "--port",
                               str(http_port), "--shard-address", f"dns:///localhost:{shard_port}"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_healthy(url, [shard, router], tmp_path / "log")
        shards = httpx.get(url + "/health").json()["shards"]
        assert f"ipv4:127.0.0.1:{shard_port}" in [s["address"] for s in shards if s["ok"]]
        # `sluice health`, the probe of the image and the manifests, against both services and a closed port.
        for address, code in ((f"127.0.0.1:{shard_port}", 0), (url + "/health", 0), (f"127.0.0.1:{free_port()}", 1)):
            probe = subprocess.run([sys.executable, "-m", "sluice", "health", "--address", address, "--timeout", "3"],
                                   cwd=ROOT, capture_output=True, text=True)
            assert probe.returncode == code, (address, probe.stdout, probe.stderr)
        r = httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, timeout=60)
        assert r.status_code == 200 and r.json()["generated_text"]
    finally:
        for proc in (router, shard):
            stop(proc, 30)
        log.close()
