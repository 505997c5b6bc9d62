"""API key, and a shard that dies mid-stream: the client gets an error event, the router keeps serving."""
import json
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import GenerationError

from servers import Server, children, wait_for

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


def wait_healthy(url: str) -> None:
    wait_for(lambda: httpx.get(url + "/health").status_code == 200)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("keyed"), api_key=KEY)
    yield srv
    srv.stop()


def test_api_key(keyed):
    url = keyed.url
    denied = httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert denied.status_code == 401 and denied.json()["error_type"] == "authentication"
    assert httpx.get(url + "/info").status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # probes carry no key
    ok = httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, headers=AUTH,
                    timeout=60)
    assert ok.status_code == 200
    assert InferenceClient(base_url=url, api_key=KEY).text_generation("Hi", max_new_tokens=2) == ok.json()["generated_text"]
    oai = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert oai.models.list().data[0].id
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the shard process")
def test_shard_death_mid_stream(keyed):
    url = keyed.url
    shard = children(keyed.proc.pid)
    assert len(shard) == 1
    body = {"inputs": "1, 2, 3, 4, 5,", "parameters": {"max_new_tokens": 200}}
    with httpx.stream("POST", url + "/generate_stream", json=body, headers=AUTH, timeout=120) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data:"))
        first = json.loads(next(lines).removeprefix("data: "))
        assert first["token"]["text"] is not None
        os.kill(shard[0], signal.SIGKILL)
        events = [json.loads(line.removeprefix("data: ")) for line in lines if line]
    assert events[-1]["error_type"] == "generation" and events[-1]["error"]
    assert all("error" not in e for e in events[:-1])
    assert keyed.metrics()["sluice_requests_in_flight"] == 0

    wait_healthy(url)  # `sluice serve` restarts its shard; the router reconnects by itself
    client = InferenceClient(base_url=url, api_key=KEY)
    assert client.text_generation("Hi", max_new_tokens=3)
    stream = client.text_generation("1, 2, 3,", max_new_tokens=200, stream=True)
    next(iter(stream))
    os.kill(children(keyed.proc.pid)[0], signal.SIGKILL)
    with pytest.raises(GenerationError):
        for _ in stream:
            pass
    wait_healthy(url)


def test_disconnect_while_queued_cancels_at_once(start_server):
    """A stream that has no token to send (queued behind another in the engine) still notices its client
    leaving: the router listens for the disconnect itself instead of waiting for the next send."""
    url = start_server(max_batch_size=1, max_concurrent_requests=4)

    def shards() -> dict:
        return httpx.get(url + "/health").json()["shards"][0]

    client = httpx.Client(timeout=120)
    body = {"inputs": "1, 2, 3, 4, 5,", "parameters": {"max_new_tokens": 300}}
    running = client.send(client.build_request("POST", url + "/generate_stream", json=body), stream=True)
    running_lines = running.iter_lines()
    next(running_lines)
    queued = client.send(client.build_request("POST", url + "/generate_stream", json=body), stream=True)
    assert queued.status_code == 200  # headers go out before the first token
    wait_for(lambda: shards()["waiting"] == 1)
    queued.close()
    wait_for(lambda: shards()["waiting"] == 0)
    assert shards()["running"] == 1  # the first stream is still generating: the cancel did not wait for it
    running.close()
    wait_for(lambda: shards()["running"] == 0)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the shard process")
def test_shard_death_under_eight_streams(keyed):
    """Every one of 8 concurrent streams (TGI and OpenAI) ends with an error event its client understands,
    /health says 503 while the shard is down, and serving resumes with the same router process."""
    import threading

    url, router_pid = keyed.url, keyed.proc.pid
    wait_healthy(url)
    started, results = threading.Barrier(9), [None] * 8

    def stream(i: int) -> None:
        if i % 2:
            route, body = "/v1/completions", {"prompt": "1, 2, 3,", "max_tokens": 300, "stream": True}
        else:
            route, body = "/generate_stream", {"inputs": "1, 2, 3,", "parameters": {"max_new_tokens": 300}}
        with httpx.stream("POST", url + route, json=body, headers=AUTH, timeout=120) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data:"))
            first = next(lines)
            started.wait()
            results[i] = [first, *lines]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait()
    os.kill(children(router_pid)[0], signal.SIGKILL)
    wait_for(lambda: httpx.get(url + "/health").status_code == 503)
    for t in threads:
        t.join()
    for i, lines in enumerate(results):
        events = [line.removeprefix("data: ") for line in lines]
        if i % 2:  # OpenAI: an error event, then [DONE]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["error_type"] == "generation", events[-3:]
        else:
            assert json.loads(events[-1])["error_type"] == "generation", events[-3:]
    wait_healthy(url)
    assert keyed.proc.poll() is None and keyed.proc.pid == router_pid
    ok = httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, headers=AUTH,
                    timeout=60)
    assert ok.status_code == 200
    assert keyed.metrics()["sluice_requests_in_flight"] == 0


def test_shard_refuses_a_remote_bind_unless_asked():
    import subprocess
    import sys

    for address in ("0.0.0.0:50999", "[::]:50999", "example.com:50999"):
        out = subprocess.run([sys.executable, "-m", "sluice", "shard", "--address", address],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "--allow-remote" in out.stderr, out.stderr[-2000:]
    half_tls = subprocess.run([sys.executable, "-m", "sluice", "shard", "--address", "127.0.0.1:50999",
                               "--tls-cert", "cert.pem"], capture_output=True, text=True, timeout=120)
    assert half_tls.returncode != 0 and "--tls-key" in half_tls.stderr
