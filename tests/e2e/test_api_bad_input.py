"""Oversized bodies over a raw socket: 413 before the body is sent (declared) or before its end (chunked).
Request ids come back in a header and reach both services' logs. (The other hostile bodies are in-process:
tests/router/test_bad_input.py.)"""
import socket
import threading

import httpx
import pytest

from router.config import RouterSettings

LIMIT = RouterSettings().max_body_bytes  # the shared server's: --max-body-bytes is left at its default


@pytest.fixture(scope="module")
def strict(server_handle):
    return server_handle


def raw_exchange(url: str, head: bytes, body_parts: list[bytes] = ()) -> bytes:
    """Send a request head and some body bytes over a plain socket, then read the answer until close."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head)
        for part in body_parts:
            s.sendall(part)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_declared_oversize_body_is_refused_before_it_is_sent(strict):
    head = (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n")
    answer = raw_exchange(strict.url, head)  # not one body byte sent: the server cannot have read it
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"error_type":"validation"' in answer


def test_chunked_oversize_body_is_refused_without_its_end(strict):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * 4096
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (LIMIT // len(chunk) + 1)
    answer = raw_exchange(strict.url, head, parts)  # the final 0-length chunk is never sent
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_client_still_sending_after_the_413_reads_it_whole(strict):
    """The 413 goes out while the chunked body is still arriving; the server then reads and drops the rest
    before closing. Closing on unread bytes makes the kernel reset the connection, which reaches a client
    still sending before (or instead of) the answer: ConnectionResetError here."""
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * 16384
    part = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    host, port = strict.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head)

        def keep_sending() -> None:  # the limit and half a megabyte more, then the body's end
            try:
                for _ in range((LIMIT + (512 << 10)) // len(chunk)):
                    s.sendall(part)
                s.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the reset this test is about: the assertions below say so

        sender = threading.Thread(target=keep_sending)
        sender.start()
        out = b""
        while chunk_in := s.recv(65536):
            out += chunk_in
        sender.join(timeout=60)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    assert out.endswith(b'"error_type":"validation"}'), out[-200:]


def test_server_is_fine_afterwards_and_request_ids_travel(strict):
    r = httpx.post(strict.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                   headers={"X-Request-Id": "trace-me-42"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-me-42"
    made = httpx.post(strict.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                      headers={"X-Request-Id": "bad id\twith spaces"}, timeout=60)
    assert made.headers["x-request-id"] != "bad id\twith spaces" and len(made.headers["x-request-id"]) == 32
    assert httpx.get(strict.url + "/health").status_code == 200
    log = strict.log_path.read_text()
    # The router's access line and the shard's per-request line both carry the id; the prompt is in neither.
    assert sum("[trace-me-42]" in line for line in log.splitlines()) >= 2, log[-3000:]
    assert "generate finished" in log and '"Hi"' not in log
