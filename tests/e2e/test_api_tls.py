"""Router and shard as separate processes over TCP with TLS (grpc's own credentials), as between hosts."""
import subprocess
import sys

import grpc
import httpx

from servers import ROOT, free_port
from sluice.pb import shard_pb2, shard_pb2_grpc
from sluice.process import stop
from servers import wait_for


def up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_router_talks_tls_to_a_tcp_shard(tiny_llama, tmp_path):
    cert, key = tmp_path / "shard.pem", tmp_path / "shard.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    shard_port, http_port = free_port(), free_port()
    run = [sys.executable, "-m", "sluice"]
    log = open(tmp_path / "log", "wb")
    procs = [subprocess.Popen([*run, "shard", "--model-id", tiny_llama, "--address", f"127.0.0.1:{shard_port}",
                               "--tls-cert", cert, "--tls-key", key], cwd=ROOT, stdout=log, stderr=log)]
    try:
        procs.append(subprocess.Popen([*run, "router", "--model-id", tiny_llama, "--hostname", "127.0.0.1",
                                       "--port", str(http_port), "--shard-address", f"localhost:{shard_port}",
                                       "--shard-tls-ca", cert], cwd=ROOT, stdout=log, stderr=log))
        url = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: up(url) or any(p.poll() is not None for p in procs), timeout=240)
        assert up(url), (tmp_path / "log").read_text()[-3000:]
        r = httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, timeout=60)
        assert r.status_code == 200 and r.json()["generated_text"] is not None
        with grpc.insecure_channel(f"127.0.0.1:{shard_port}") as plain:  # no TLS, no answer
            try:
                shard_pb2_grpc.ShardStub(plain).Health(shard_pb2.HealthRequest(), timeout=3)
                raise AssertionError("the shard answered plaintext gRPC")
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        for p in procs:
            stop(p, 30)
        log.close()
