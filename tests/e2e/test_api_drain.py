"""Graceful drain: on SIGTERM the router refuses new work with 503 (and /health says 503, so load balancers
stop sending), lets the streams in flight finish, then exits 0 and only then stops its shard.

The shard is paused (SIGSTOP) while the checks run, so the stream is surely still in flight then: no race
with how fast the model generates.
"""
import json
import os
import signal

import httpx

from servers import children, wait_for

BODY = {"inputs": "1, 2, 3, 4, 5,", "parameters": {"max_new_tokens": 30, "details": True}}


def test_sigterm_finishes_the_stream_in_flight_then_exits_0(start_server):
    url = start_server(shutdown_timeout=300)
    srv = start_server.servers[-1]
    (shard,) = children(srv.proc.pid)
    with httpx.stream("POST", url + "/generate_stream", json=BODY, timeout=120) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data:"))
        first = json.loads(next(lines).removeprefix("data: "))
        os.kill(shard, signal.SIGSTOP)
        try:
            srv.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(url + "/health").status_code == 503)
            health = httpx.get(url + "/health")
            assert health.json()["error_type"] == "unavailable"
            for route in ("/generate", "/v1/completions"):
                refused = httpx.post(url + route, json={"inputs": "Hi", "prompt": "Hi"})
                assert refused.status_code == 503, refused.text
                assert refused.json()["error_type"] == "unavailable"
                assert refused.headers["x-request-id"]
            assert srv.metrics()["sluice_requests_in_flight"] == 1  # /metrics still answers while draining
            assert srv.proc.poll() is None
        finally:
            os.kill(shard, signal.SIGCONT)
        events = [json.loads(line.removeprefix("data: ")) for line in lines if line]
    assert all("error" not in e for e in events)
    assert 1 + len(events) == 30 and events[-1]["details"]["generated_tokens"] == 30
    assert first["token"]["text"] is not None
    assert srv.proc.wait(timeout=60) == 0
    wait_for(lambda: not os.path.exists(f"/proc/{shard}") or "zombie" in open(f"/proc/{shard}/status").read())


def test_sigterm_when_idle_exits_0_at_once(start_server):
    start_server()
    srv = start_server.servers[-1]
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0
    assert "draining 0 request(s)" in srv.log_path.read_text()


def test_streams_left_at_the_shutdown_timeout_end_with_an_error_event(start_server):
    url = start_server(shutdown_timeout=1)
    srv = start_server.servers[-1]
    (shard,) = children(srv.proc.pid)
    chat = {"messages": [{"role": "user", "content": "Count to 100."}], "max_tokens": 30, "stream": True}
    with httpx.stream("POST", url + "/generate_stream", json=BODY, timeout=120) as tgi:
        tgi_lines = (line for line in tgi.iter_lines() if line.startswith("data:"))
        assert "error" not in json.loads(next(tgi_lines).removeprefix("data: "))
        os.kill(shard, signal.SIGSTOP)  # nothing more is generated: both streams are surely in flight
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=chat, timeout=120) as openai:
                assert openai.status_code == 200
                srv.proc.send_signal(signal.SIGTERM)
                chat_events = [line.removeprefix("data: ") for line in openai.iter_lines() if line.startswith("data:")]
            tgi_events = [json.loads(line.removeprefix("data: ")) for line in tgi_lines if line]
        finally:
            os.kill(shard, signal.SIGCONT)
    # TGI route: the last event is TGI's error event, which huggingface_hub raises as an error.
    assert tgi_events[-1]["error_type"] == "generation" and "shutting down" in tgi_events[-1]["error"]
    # OpenAI route: an error event, then the [DONE] the openai SDK waits for.
    assert chat_events[-1] == "[DONE]"
    error = json.loads(chat_events[-2])
    assert "shutting down" in error["error"] and error["error_type"] == "generation"
    assert srv.proc.wait(timeout=60) == 0
    assert "shutdown timeout: stopping 2 request(s)" in srv.log_path.read_text()


def test_sigterm_to_the_shard_alone_drains_it(start_server):
    """Kubernetes and compose stop the shard container on its own: SIGTERM lets its stream finish, then it
    exits 0 (here `sluice serve` starts it again, and the same router serves on)."""
    url = start_server(shutdown_timeout=300)  # a slow machine still finishes the stream: no race with a timeout
    srv = start_server.servers[-1]
    (shard,) = children(srv.proc.pid)
    with httpx.stream("POST", url + "/generate_stream", json=BODY, timeout=120) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data:"))
        next(lines)
        os.kill(shard, signal.SIGSTOP)  # so the SIGTERM surely lands mid-stream
        os.kill(shard, signal.SIGTERM)
        os.kill(shard, signal.SIGCONT)
        events = [json.loads(line.removeprefix("data: ")) for line in lines if line]
    assert all("error" not in e for e in events)
    assert 1 + len(events) == 30 and events[-1]["details"]["generated_tokens"] == 30
    wait_for(lambda: "shard exited with code 0" in srv.log_path.read_text())
    log = srv.log_path.read_text()
    assert "draining 1 request(s) in flight" in log
    wait_for(lambda: httpx.get(url + "/health").status_code == 200)
    again = httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, timeout=120)
    assert again.status_code == 200 and again.json()["generated_text"]
