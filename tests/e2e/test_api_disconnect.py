"""A client that goes away, at any point, gives its slot and its engine sequence back: raw sockets
closed before the first token, mid-stream and during a long (chunked) prefill. A client that stops
reading holds the router back (backpressure) instead of making it buffer the whole answer."""
import json
import re
import socket

import httpx
import pytest

from servers import Server
from servers import wait_for

LONG_PROMPT = "one two three four five six seven eight " * 100  # ~800 tokens: ~100 prefill steps of 8


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("disconnect"), max_batch_prefill_tokens=8)
    yield srv
    srv.stop()


def shard(url: str) -> dict:
    return httpx.get(url + "/health").json()["shards"][0]


def open_stream(url: str, body: dict, rcvbuf: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def read_until(s: socket.socket, marker: bytes, count: int = 1) -> bytes:
    out = b""
    while out.count(marker) < count:
        chunk = s.recv(4096)
        assert chunk, "the server closed the stream"
        out += chunk
    return out


def idle(srv: Server, before: float) -> None:
    wait_for(lambda: srv.metrics()["sluice_requests_in_flight"] == before)
    wait_for(lambda: shard(srv.url)["running"] == 0 and shard(srv.url)["waiting"] == 0)


COUNTING = {"inputs": "1, 2, 3, 4, 5,", "parameters": {"max_new_tokens": 500}}


def test_close_before_first_token(srv):
    before = srv.metrics()["sluice_requests_in_flight"]
    open_stream(srv.url, COUNTING).close()
    idle(srv, before)


def test_close_mid_stream(srv):
    before = srv.metrics()["sluice_requests_in_flight"]
    s = open_stream(srv.url, COUNTING)
    read_until(s, b"data:", 3)
    assert srv.metrics()["sluice_requests_in_flight"] == before + 1
    s.close()
    idle(srv, before)


def test_close_during_long_prefill(srv):
    before = srv.metrics()["sluice_requests_in_flight"]
    s = open_stream(srv.url, {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 5}})
    wait_for(lambda: shard(srv.url)["running"] == 1)  # admitted by the engine: prefilling, chunk by chunk
    s.close()
    idle(srv, before)


def test_stalled_readers_get_whole_streams(tiny_fp32_server):
    """Clients that read nothing until the engine is done. The router writes each event as the shard's
    reply comes; once the socket's buffer passes uvicorn's high-water mark (64 kB), that send waits for the
    drain in a task of its own and the events after it queue behind it, in order (sse.Writer), so neither
    the shard stream that every request shares nor the engine ever waits on one client. When the clients
    read, every stream is whole."""
    tiny = tiny_fp32_server  # shared with test_parity: the tiny model, default limits
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 200, "details": True}}
    socks = [open_stream(tiny.url, body, rcvbuf=4096) for _ in range(4)]
    wait_for(lambda: tiny.metrics()["sluice_requests_in_flight"] == 4)
    wait_for(lambda: shard(tiny.url)["running"] == 0 and shard(tiny.url)["waiting"] == 0)
    for s in socks:
        s.settimeout(120)
        out = read_until(s, b"\r\n0\r\n\r\n")  # chunked encoding's end
        s.close()
        events = [json.loads(e) for e in re.findall(rb"data: (.*?)\n\n", out)]
        assert "error" not in events[-1]
        assert events[-1]["details"]["generated_tokens"] == len(events)
    wait_for(lambda: tiny.metrics()["sluice_requests_in_flight"] == 0)
