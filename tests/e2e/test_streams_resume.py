"""Resumable streams end to end (router/streams.py): a greedy stream cut by its client after 5 events and
resumed with Last-Event-ID (or ?after=N) joins up with no gap and no repeat into exactly the events of an
uncut run, on every streaming route, while the generation still runs or after it finished; and keep-alive
comments while a stream waits (the shard paused), which every client parses through; and the byte caps
holding under many abandoned streams (last: it leaves the store full)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from api_errors import refusal
from servers import Server, children, wait_for
from sse_client import Event, RawStream

RESUMABLE = {"X-Sluice-Resumable": "1"}
PER_STREAM, TOTAL = 16 << 10, 256 << 10  # room for every stream here but those abandoned on purpose
ROUTES = {
    "/generate_stream": {"inputs": "1, 2, 3, 4, 5,", "parameters": {"max_new_tokens": 24, "details": True}},
    "/": {"inputs": "1, 2, 3, 4, 5,", "stream": True, "parameters": {"max_new_tokens": 24}},
    "/v1/completions": {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 24, "temperature": 0, "stream": True},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Count from 1 to 20."}], "max_tokens": 24,
                             "temperature": 0, "stream": True,
                             "stream_options": {"include_usage": True}},
}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama):
    # The tiny model, in float32: fast, and streams sharing a batch pick the greedy tokens the references,
    # run alone, picked.
    srv = Server(tmp_path_factory.mktemp("streams"), model_id=tiny_llama, dtype="float32", sse_keepalive=0.2,
                 max_concurrent_requests=64, stream_buffer_bytes=PER_STREAM, stream_buffer_total_bytes=TOTAL)
    yield srv
    srv.stop()


def payloads(events: list[Event]) -> list:
    """What must be equal between two runs of one greedy request: all but the response's own id and time."""
    out = []
    for e in events:
        if e.data == "[DONE]":
            out.append(e.data)
            continue
        body = e.json()
        body.pop("id", None)
        body.pop("created", None)
        out.append(body)
    return out


def in_flight(srv: Server) -> float:
    return srv.metrics()["sluice_requests_in_flight"]


def reference(srv: Server, route: str) -> list[Event]:
    s = RawStream(srv.url, route, ROUTES[route])
    assert s.status == 200
    events = s.events()
    s.close()
    assert len(events) > 8, "the prompt should give a stream longer than the cut"
    return events


def cut_after_5(srv: Server, route: str) -> tuple[str, list[Event]]:
    s = RawStream(srv.url, route, ROUTES[route], RESUMABLE)
    assert s.status == 200
    stream_id = s.headers["x-sluice-stream-id"]
    first = s.events(5)
    s.close()
    return stream_id, first


def check_joined(stream_id: str, joined: list[Event], uncut: list[Event]) -> None:
    assert [e.id for e in joined] == [f"{stream_id}.{n}" for n in range(1, len(joined) + 1)]
    assert payloads(joined) == payloads(uncut)


@pytest.mark.parametrize("route", list(ROUTES))
def test_cut_after_5_events_and_resumed_with_last_event_id(srv, route):
    uncut = reference(srv, route)
    assert all(e.id for e in uncut)  # plain streams carry ids too
    stream_id, first = cut_after_5(srv, route)
    again = RawStream(srv.url, f"/v1/streams/{stream_id}", headers={"Last-Event-ID": first[-1].id})
    assert again.status == 200 and again.headers["x-sluice-stream-id"] == stream_id
    check_joined(stream_id, first + again.events(), uncut)


@pytest.mark.parametrize("route", ["/generate_stream", "/v1/chat/completions"])
def test_resumed_after_the_generation_finished(srv, route):
    uncut = reference(srv, route)
    before = in_flight(srv)
    stream_id, first = cut_after_5(srv, route)
    # The generation runs on without its client, counted against the limit, until it ends.
    wait_for(lambda: in_flight(srv) == before)
    again = RawStream(srv.url, f"/v1/streams/{stream_id}?after=5")
    rest = again.events()
    check_joined(stream_id, first + rest, uncut)
    # Nothing left: 204, which tells a browser's EventSource to stop reconnecting.
    done = RawStream(srv.url, f"/v1/streams/{stream_id}", headers={"Last-Event-ID": rest[-1].id})
    assert done.status == 204
    # The whole stream can be read again from the start within the retention window.
    assert payloads(RawStream(srv.url, f"/v1/streams/{stream_id}").events()) == payloads(uncut)


def test_unknown_foreign_and_malformed_resumes(srv):
    stream_id, first = cut_after_5(srv, "/generate_stream")
    unknown = httpx.get(srv.url + "/v1/streams/" + "0" * 32)
    assert unknown.status_code == 404 and unknown.json()["error_type"] == "not_found"
    # Another key's stream is as unknown as a made-up one (no --api-key here: any header is let through).
    foreign = httpx.get(srv.url + f"/v1/streams/{stream_id}", headers={"Authorization": "Bearer someone-else"})
    assert foreign.status_code == 404 and foreign.json() == unknown.json()
    for headers, params in (({"Last-Event-ID": "nonsense"}, {}), ({}, {"after": "x"}), ({}, {"after": "100000"})):
        bad = httpx.get(srv.url + f"/v1/streams/{stream_id}", headers=headers, params=params)
        refusal(bad)  # a /v1 route: OpenAI's 400
    # A plain stream's id is not resumable.
    plain = RawStream(srv.url, "/generate_stream", ROUTES["/generate_stream"])
    plain_id = plain.headers["x-sluice-stream-id"]
    plain.events()
    assert httpx.get(srv.url + f"/v1/streams/{plain_id}").status_code == 404


# ---- keep-alive ----

JS = Path(__file__).parent / "js"
PROMPT, N = "The three primary colors are", 12


@pytest.fixture(scope="module")
def node_modules():
    if not (JS / "node_modules" / "@huggingface" / "inference").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=300)


def test_keepalive_comments_while_the_shard_is_paused_and_every_client_parses_through(srv, node_modules):
    client = InferenceClient(base_url=srv.url)
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0)
    chat = [{"role": "user", "content": "Name three colors."}]
    want_tgi = client.text_generation(PROMPT, max_new_tokens=N)
    want_chat = oai.chat.completions.create(model="tgi", messages=chat, max_tokens=N, temperature=0)
    got: dict[str, object] = {}

    def hf() -> None:
        got["hf"] = "".join(client.text_generation(PROMPT, max_new_tokens=N, stream=True))

    def sdk() -> None:
        chunks = oai.chat.completions.create(model="tgi", messages=chat, max_tokens=N, temperature=0, stream=True)
        got["openai"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def js() -> None:
        got["js"] = subprocess.run(["node", "stream.mjs", srv.url, PROMPT, str(N)], cwd=JS, capture_output=True,
                                   text=True, timeout=300)

    (shard,) = children(srv.proc.pid)
    os.kill(shard, signal.SIGSTOP)  # nothing is generated: every stream below waits for its first token
    try:
        threads = [threading.Thread(target=f) for f in (hf, sdk, js)]
        for t in threads:
            t.start()
        wait_for(lambda: srv.metrics()["tgi_queue_size"] >= len(threads))
        raw = RawStream(srv.url, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": N}})
        raw.wait_bytes(b": keep-alive\n", 3)  # 0.2 s apart: the other streams have waited as long
    finally:
        os.kill(shard, signal.SIGCONT)
    for t in threads:
        t.join(300)
    events = raw.events()
    assert set(raw.comments) == {"keep-alive"}
    assert "".join(e.json()["token"]["text"] for e in events) == want_tgi
    assert got["hf"] == want_tgi
    assert got["openai"] == want_chat.choices[0].message.content
    assert got["js"].returncode == 0, got["js"].stderr
    assert got["js"].stdout.split("\n---\n") == [want_tgi, want_tgi]


def test_keepalive_is_raw_bytes_on_the_wire(srv):
    """The comment is exactly a `: keep-alive` line, between whole events, without the blank line that would
    end an (empty) event."""
    (shard,) = children(srv.proc.pid)
    os.kill(shard, signal.SIGSTOP)
    try:
        raw = RawStream(srv.url, "/v1/completions", {**ROUTES["/v1/completions"], "max_tokens": 3})
        raw.wait_bytes(b": keep-alive\n", 2)
    finally:
        os.kill(shard, signal.SIGCONT)
    body = raw.body()
    assert body.startswith(b": keep-alive\n: keep-alive\n") and b": keep-alive\n\n" not in body
    assert body.rstrip().endswith(b"data: [DONE]")
    assert json.loads(body.split(b"data: ", 1)[1].split(b"\n", 1)[0])["object"] == "text_completion"


# ---- byte caps (last: the store stays full of what it kept for the retention time) ----

LONG = {"prompt": "1, 2, 3,", "max_tokens": 300, "ignore_eos": True, "temperature": 0, "stream": True}
# A cut stream's last two events (the error, [DONE]) may go past the caps: they end it.
SLACK = 1024


def test_byte_caps_hold_under_many_abandoned_streams(srv):
    before = srv.metrics()
    opened = []
    for _ in range(30):  # each would need ~75 KB: far past its cap, and all of them past the total
        s = RawStream(srv.url, "/v1/completions", LONG, RESUMABLE)
        opened.append(s.headers["x-sluice-stream-id"])
        s.events(1)
        s.close()
    peak = 0.0

    def settled() -> bool:
        nonlocal peak
        m = srv.metrics()
        peak = max(peak, m["sluice_stream_buffer_bytes"])
        return m["sluice_requests_in_flight"] == before["sluice_requests_in_flight"]

    wait_for(settled)  # every abandoned generation ended
    after = srv.metrics()
    assert peak <= TOTAL + 30 * SLACK and after["sluice_stream_buffer_bytes"] <= TOTAL + 30 * SLACK
    # Cut, all but any whose first connection was handed the whole stream before its close was noticed.
    assert 1 <= after["sluice_streams_cut_total"] - before.get("sluice_streams_cut_total", 0) <= 30
    for stream_id in opened:
        again = RawStream(srv.url, f"/v1/streams/{stream_id}?after=1")
        assert again.status in (200, 410), again.status  # 410: what it was handed is dropped to make room
        if again.status == 200:
            kept = again.events()
            assert sum(len(e.data) for e in kept) <= PER_STREAM + SLACK
            last = kept[-2].json()
            assert kept[-1].data == "[DONE]"
            assert "buffer" in last.get("error", "") or last["choices"][0]["finish_reason"] == "length", last
            assert kept[0].id == f"{stream_id}.2"
