"""Admission: beyond --max-concurrent-requests a request gets 429 `overloaded` at once; every admitted
request, streaming included, holds its slot until its last byte, an error or a client disconnect.

The chat route answers overload with HTTP 429 too (not an in-stream event): huggingface_hub's chat stream
then raises HfHubHTTPError with status 429, while its text_generation raises OverloadedError.
"""
import threading
import time

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError, OverloadedError

from servers import Server

LIMIT = 2
EXTRA = 3
HOLD_TOKENS = 48  # long enough that held streams outlive the requests fired meanwhile
HELD_STREAM_TOKENS = 1500  # streams held open by open_streams: far longer than any test holds them
PROMPT = "1, 2, 3, 4, 5,"  # greedy counting runs to max_new_tokens, it does not stop early


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("overload"), max_concurrent_requests=LIMIT)
    yield srv
    srv.stop()


def gauge(srv: Server, name: str) -> float:
    return srv.metrics()[name]


def wait_until(predicate, timeout: float = 60.0) -> None:
    """Poll for a state the server reaches on its own (a slot freed); not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the server did not reach the expected state"
        time.sleep(0.1)


def idle(srv: Server) -> None:
    wait_until(lambda: gauge(srv, "sluice_requests_in_flight") == 0)
    wait_until(lambda: all(s["running"] == 0 and s["waiting"] == 0 for s in httpx.get(srv.url + "/health").json()["shards"]))


HOLDER = httpx.Client(timeout=120)  # module-wide: a collected client would close the held connections


def open_streams(srv: Server, n: int) -> list[httpx.Response]:
    """n admitted streams, each past its first token (so surely holding a slot)."""
    held = []
    for _ in range(n):
        r = HOLDER.send(HOLDER.build_request("POST", srv.url + "/generate_stream", json={
            "inputs": PROMPT, "parameters": {"max_new_tokens": HELD_STREAM_TOKENS}}), stream=True)
        assert r.status_code == 200
        r.lines = r.iter_lines()  # keep the iterator: dropping it mid-stream closes the connection
        next(r.lines)
        held.append(r)
    return held


def test_burst_exactly_limit_succeed(small):
    idle(small)
    results: list[str] = []
    barrier = threading.Barrier(LIMIT + EXTRA)

    def one() -> None:
        client = InferenceClient(base_url=small.url)
        barrier.wait()
        try:
            events = list(client.text_generation(PROMPT, max_new_tokens=HOLD_TOKENS, stream=True, details=True))
            results.append("ok" if events[-1].generated_text is not None else "incomplete")
        except OverloadedError:
            results.append("overloaded")

    threads = [threading.Thread(target=one) for _ in range(LIMIT + EXTRA)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] * LIMIT + ["overloaded"] * EXTRA


def test_every_generation_route_says_429_while_full(small):
    idle(small)
    held = open_streams(small, LIMIT)
    try:
        for route, body in [
            ("/generate", {"inputs": "Hi"}),
            ("/generate_stream", {"inputs": "Hi"}),
            ("/", {"inputs": "Hi", "stream": True}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}),
            ("/v1/completions", {"prompt": "Hi", "stream": True}),
        ]:
            r = httpx.post(small.url + route, json=body)
            assert r.status_code == 429, (route, r.text)
            assert r.json()["error_type"] == "overloaded"
            assert r.headers["content-length"] == str(len(r.content))
            assert r.headers["retry-after"] == "1"

        client = InferenceClient(base_url=small.url)
        with pytest.raises(OverloadedError):
            client.text_generation("Hi", max_new_tokens=4, stream=True)
        with pytest.raises(HfHubHTTPError) as info:
            client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], stream=True)
        assert info.value.response.status_code == 429
        oai = openai.OpenAI(base_url=small.url + "/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            oai.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "Hi"}], stream=True)
        with pytest.raises(openai.RateLimitError):
            oai.completions.create(model="tgi", prompt="Hi", stream=True)
        # Service routes are not generation: they still answer.
        assert httpx.get(small.url + "/health").status_code == 200
        assert gauge(small, "sluice_requests_in_flight") == LIMIT
    finally:
        for r in held:
            r.close()
    idle(small)


def test_disconnected_stream_frees_its_slot(small):
    idle(small)
    held = open_streams(small, LIMIT)
    assert httpx.post(small.url + "/generate_stream", json={"inputs": "Hi"}).status_code == 429
    for r in held:
        r.close()  # the client goes away mid-stream
    # The router notices at once and cancels the shard call: both gauges drop and the engine is empty.
    idle(small)
    again = open_streams(small, LIMIT)
    for r in again:
        r.close()
    idle(small)


def test_finished_requests_release_their_slots(small):
    idle(small)
    for _ in range(LIMIT + 1):
        r = httpx.post(small.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        r = httpx.post(small.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200
    assert gauge(small, "sluice_requests_in_flight") == 0
