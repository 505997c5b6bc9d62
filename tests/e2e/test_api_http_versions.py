"""Each HTTP version frames a stream its own way, over a raw socket (router/http_protocol.py): HTTP/1.0
has no chunked encoding, so its stream is the body until the connection closes; HTTP/1.1 streams in
chunks and keeps the connection for the next request. A request head is bounded on either."""
import json
import socket

import pytest

from router.http_protocol import MAX_HEAD_BYTES, protocol_for

BODY = json.dumps({"inputs": "1, 2, 3, 4, 5,", "parameters": {"max_new_tokens": 6}}).encode()


def request(version: bytes) -> bytes:
    return (b"POST /generate_stream " + version + b"\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=60)


def split_response(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {k.strip().lower(): v.strip().lower() for k, v in (x.split(":", 1) for x in lines)}, body


def events(body: bytes) -> list[dict]:
    return [json.loads(line[5:]) for line in body.split(b"\n") if line.startswith(b"data:")]


def test_an_http_1_0_stream_is_the_body_until_close(server_handle):
    with connect(server_handle.url) as s:
        s.sendall(request(b"HTTP/1.0"))
        raw = b""
        while chunk := s.recv(65536):  # the server closes: that is the stream's end
            raw += chunk
    status, headers, body = split_response(raw)
    assert " 200 " in status, status
    assert "transfer-encoding" not in headers, headers
    assert headers["content-type"].startswith("text/event-stream")
    got = events(body)  # not chunk-framed: every line is the SSE's own
    assert len(got) >= 2 and got[-1]["generated_text"] is not None
    assert "".join(e["token"]["text"] for e in got) == got[-1]["generated_text"]


def test_http_1_1_streams_in_chunks_on_a_kept_connection(server_handle):
    with connect(server_handle.url) as s:
        answers = []
        for _ in range(2):  # the second request reuses the connection the first one's stream ended on
            s.sendall(request(b"HTTP/1.1"))
            raw = b""
            while not raw.endswith(b"\r\n0\r\n\r\n"):
                chunk = s.recv(65536)
                assert chunk, f"the server closed the connection: {raw[-200:]!r}"
                raw += chunk
            answers.append(split_response(raw))
    for status, headers, body in answers:
        assert " 200 " in status, status
        assert headers["transfer-encoding"] == "chunked"
        assert events(body)[-1]["generated_text"] is not None


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def head(version: bytes, padding: int, end: bytes = b"\r\n\r\n") -> bytes:
    # Over MAX_HEAD_BYTES by a few KiB at most: all of it arrives in one read, so the refusal closes a
    # connection with nothing left unread (which the kernel would answer with a reset instead).
    return b"GET /health " + version + b"\r\nHost: x\r\nConnection: close\r\nX-Padding: " + b"a" * padding + end


def exchange(url: str, data: bytes) -> bytes:
    with connect(url) as s:
        s.sendall(data)
        return read_all(s)


@pytest.mark.parametrize("version, status", [(b"HTTP/1.1", b" 431 "), (b"HTTP/1.0", b" 400 ")])
def test_an_unfinished_request_head_is_cut_off(server_handle, version, status):
    answer = exchange(server_handle.url, head(version, MAX_HEAD_BYTES + 1024, end=b""))  # and no end to it
    assert status in answer.split(b"\r\n")[0], answer[:200]


def test_a_long_request_head_gets_431(server_handle):
    assert b" 200 " in exchange(server_handle.url, head(b"HTTP/1.1", 8 * 1024)).split(b"\r\n")[0]
    answer = exchange(server_handle.url, head(b"HTTP/1.1", MAX_HEAD_BYTES + 1024))
    assert b" 431 " in answer.split(b"\r\n")[0], answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error_type"] == "validation"
    assert b" 200 " in exchange(server_handle.url, head(b"HTTP/1.1", 16)).split(b"\r\n")[0]  # and the router is fine


@pytest.mark.parametrize("line, name", [
    (b"POST /generate_stream HTTP/1.0", "H11Protocol"),
    (b"GET /health HTTP/1.0\r", "H11Protocol"),
    (b"POST /v1/completions HTTP/1.1", "BoundedHttpTools"),
    (b"GET / HTTP/1.1\r", "BoundedHttpTools"),
])
def test_the_first_request_line_picks_the_protocol(line, name):
    assert protocol_for(line).__name__ == name
