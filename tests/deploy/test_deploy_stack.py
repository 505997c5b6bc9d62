"""The compose stack for real: our own dockerd, a Debian base image built here, the image built from
deploy/Dockerfile, `docker-compose up` with two shard replicas, then the README's Python client against
it from the host, a 429 past the limit, and everything torn down.

The machinery is in tests/deploy/stack.py; these tests run last in a session (tests/deploy/conftest.py).
Nothing is skipped: if Docker cannot run here the test fails and says why.
"""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from stack import LIMIT, begin

pytestmark = [pytest.mark.stack, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def stack():
    """The router's url once two replicas are healthy (a start begun elsewhere, or one begun now)."""
    start, waiting = begin(), time.monotonic()
    try:
        url = start.wait(1000)  # within the 1200 s timeout, with time left for the logs and the teardown
        print(f"\n{start.summary()}")
        print(f"stack: packages and dockerd {start.timings['packages and dockerd']:.0f}s; up "
              f"{start.ready - start.started:.0f}s after it began, the tests waited {time.monotonic() - waiting:.0f}s")
        yield url
    finally:
        start.down()  # the compose and dockerd logs first if it never came up


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
