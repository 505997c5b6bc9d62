"""Tenants through real processes (router and shard over gRPC, the tiny model, one sequence at a time):
a lone tenant's request is not served after another tenant's whole backlog, streamed tokens are counted to
their own tenant, and the keys file is reread on SIGHUP."""
from __future__ import annotations

import signal
import threading

import httpx
import pytest

from servers import Server, wait_for


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("tenants")
    keys = tmp / "keys"
    keys.write_text("k-a A\nk-b B\n")
    srv = Server(tmp, model_id=tiny_llama, dtype="float32", max_batch_size=1, api_keys_file=keys)
    yield srv, keys
    srv.stop()


def complete(url: str, key: str, tokens: int) -> httpx.Response:
    body = {"prompt": "The river flows", "max_tokens": tokens, "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def shard_queue(url: str) -> tuple[int, int]:
    shard = httpx.get(url + "/health", timeout=10).json()["shards"][0]
    return shard["running"], shard["waiting"]


def test_a_lone_tenant_is_not_served_after_the_whole_backlog(keyed):
    srv, _ = keyed
    finished: list[str] = []
    lock = threading.Lock()

    def send(name: str, key: str, tokens: int) -> None:
        response = complete(srv.url, key, tokens)
        assert response.status_code == 200, response.text
        with lock:
            finished.append(name)

    # Long enough that the four are all in before the first one finishes, even when their connections
    # open tens of milliseconds apart and a step takes a millisecond (the tiny model, one at a time).
    backlog = [threading.Thread(target=send, args=(f"A{i}", "k-a", 400)) for i in range(4)]
    for t in backlog:
        t.start()
    wait_for(lambda: shard_queue(srv.url) == (1, 3))  # one of A's running, three waiting
    lone = threading.Thread(target=send, args=("B", "k-b", 150))
    lone.start()
    for t in [*backlog, lone]:
        t.join(timeout=300)
    assert len(finished) == 5
    # First come, first served would finish B last; by service, B is next once A's running one is done
    # (or the one after, if that finished before B arrived).
    assert finished.index("B") <= 2, finished


def test_streamed_tokens_are_counted_to_the_tenant_that_streamed_them(keyed):
    """A stream's replies are handled as the router's shard-stream reader reads them, one reader for every
    stream (router/push.py), not in the request's own task: each tenant is still charged its own tokens."""
    srv, _ = keyed

    def generated(tenant: str) -> float:
        return srv.metrics().get(f'sluice_tenant_tokens_total{{kind="generated",tenant="{tenant}"}}', 0.0)

    ended: list[bool] = []

    def stream(key: str, tokens: int) -> None:
        body = {"prompt": "The river flows", "max_tokens": tokens, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=300,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            ended.append(response.status_code == 200 and response.read().rstrip().endswith(b"data: [DONE]"))

    before = {t: generated(t) for t in "AB"}
    threads = [threading.Thread(target=stream, args=(key, n)) for key, n in (("k-a", 37), ("k-b", 23), ("k-a", 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert ended == [True] * 3
    assert {t: generated(t) - before[t] for t in "AB"} == {"A": 42, "B": 23}


def test_the_keys_file_is_reread_on_sighup(keyed):
    srv, keys = keyed

    def status(key: str) -> int:
        return httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code

    assert status("k-c") == 401
    keys.write_text("k-b B\nk-c C\n")
    srv.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: status("k-c") == 200, timeout=30)
    assert status("k-a") == 401 and status("k-b") == 200
    keys.write_text("k-c\n")  # a key without a tenant does not parse: the table in use stays
    srv.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: b"not reloaded" in srv.log_path.read_bytes(), timeout=30)
    assert status("k-c") == 200 and srv.proc.poll() is None
