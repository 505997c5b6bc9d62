"""Hostile bodies get the right 4xx and never a 5xx, a hang or a dead server: oversized (413 before the
body is read whole), deeply nested, invalid UTF-8, NaN/Infinity, lone surrogates, 100k stop sequences,
and prompts at the input limit and one token over it. Request ids come back in a header and reach the
shard's log."""
import socket

import httpx
import pytest

from servers import Server

LIMIT = 65536
MAX_INPUT = 64


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("strict"), max_body_bytes=LIMIT, max_input_tokens=MAX_INPUT,
                 max_total_tokens=128)
    yield srv
    srv.stop()


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


def test_body_of_exactly_the_limit_is_read(strict):
    body = b'{"inputs": "Hi", "parameters": {"max_new_tokens": 1}}'
    r = httpx.post(strict.url + "/generate", content=body.ljust(LIMIT), timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    over = httpx.post(strict.url + "/generate", content=body.ljust(LIMIT + 1), timeout=60,
                      headers={"Content-Type": "application/json"})
    assert over.status_code == 413


BAD_JSON = [
    (b"[" * 30_000 + b"]" * 30_000, "nested"),
    (b'{"inputs": "' + b"\xff\xfe\xfd" + b'"}', "JSON"),
    (b'{"inputs": "Hi", "parameters": {"temperature": NaN}}', "NaN"),
    (b'{"inputs": "Hi", "parameters": {"temperature": Infinity}}', "Infinity"),
    (b'{"inputs": "Hi", "parameters": {"repetition_penalty": -Infinity}}', "Infinity"),
    (b'{"inputs": "Hi", "parameters": {"temperature": 1e999}}', "finite"),
    (b'{"inputs": "\\ud800 lone surrogate"}', "surrogate"),
    (b'{"inputs": "Hi", "parameters": {"top_k": 99999999999}}', "top_k"),
    (b'{"inputs": "' + b"word " * 12_000 + b'"}', "max_input_tokens"),
    (b'{"inputs": "Hi", "parameters": {"max_new_tokens": 1' + b"0" * 4000 + b'}}', "max_new_tokens"),
]


@pytest.mark.parametrize("body,word", BAD_JSON, ids=[w + str(i) for i, (_, w) in enumerate(BAD_JSON)])
def test_hostile_json_gets_422(strict, body, word):
    r = httpx.post(strict.url + "/generate", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"
    assert word in r.json()["error"], r.json()["error"]


def test_hundred_thousand_stop_sequences(server):
    for route, body in [("/generate", {"inputs": "Hi", "parameters": {"stop": ["x"] * 100_000}}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                  "stop": ["x"] * 100_000})]:
        r = httpx.post(server + route, json=body, timeout=60)
        assert r.status_code == 422 and "stop" in r.json()["error"], r.text


def test_prompt_at_the_input_limit_and_one_over(strict):
    at = httpx.post(strict.url + "/v1/completions", json={"prompt": [42] * MAX_INPUT, "max_tokens": 1}, timeout=60)
    assert at.status_code == 200, at.text
    assert at.json()["usage"]["prompt_tokens"] == MAX_INPUT
    over = httpx.post(strict.url + "/v1/completions", json={"prompt": [42] * (MAX_INPUT + 1), "max_tokens": 1})
    assert over.status_code == 422 and "max_input_tokens" in over.json()["error"]
    # The same through text and the tokenizer, on the TGI route.
    ids = httpx.post(strict.url + "/tokenize", json={"inputs": "one " * 200}).json()
    text = "one " * 200
    exact = text[: ids[MAX_INPUT - 1]["stop"]]  # the first MAX_INPUT tokens
    fits = httpx.post(strict.url + "/generate", json={"inputs": exact, "parameters": {"max_new_tokens": 1}}, timeout=60)
    assert fits.status_code == 200, fits.text
    longer = text[: ids[MAX_INPUT]["stop"]]
    refused = httpx.post(strict.url + "/generate", json={"inputs": longer, "parameters": {"max_new_tokens": 1}})
    assert refused.status_code == 422 and "max_input_tokens" in refused.json()["error"]


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
