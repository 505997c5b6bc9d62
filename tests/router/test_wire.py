"""What goes over the wire: SSE framing, TGI shapes over HTTP, and the service routes (in-process: the
router on the embedded SmolLM2 over real gRPC; the bytes are the router's, whatever socket carries them)."""
import json

import pytest

from shard.hardware import choose_dtype
from shard.models import cpu_kernels

N = 12
CHAT_BODY = {"model": "tgi", "messages": [{"role": "user", "content": "What is deep learning?"}],
             "stream": True, "max_tokens": N}


def post_stream(router, path: str, body: dict) -> str:
    r = router.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.text


def sse_payloads(raw: str) -> list[str]:
    """Checks the framing (each event: an `id: <stream>.<n>` line, one `data: ` line, then a blank line) and
    returns the payloads."""
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    stream_id = events[0].split("\n")[0].removeprefix("id: ").rpartition(".")[0]
    for n, event in enumerate(events, 1):
        id_line, data_line = event.split("\n")
        assert id_line == f"id: {stream_id}.{n}" and data_line.startswith("data: "), repr(event)
    return [e.split("\n")[1][len("data: "):] for e in events]


def test_chat_stream_wire_format(smol):
    payloads = sse_payloads(post_stream(smol, "/v1/chat/completions", CHAT_BODY))
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("error" not in c for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) > 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_carry_tgi_tokens(smol):
    body = {"model": "http://127.0.0.1:8080", "prompt": "Deep learning is", "max_tokens": N, "stream": True, "temperature": 0}
    payloads = sse_payloads(post_stream(smol, "/v1/completions", body))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("error" not in c for c in chunks)
    assert all(c["token"]["text"] == c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["generated_text"] == "".join(c["token"]["text"] for c in chunks)


def test_tgi_stream_has_no_done(smol):
    body = {"inputs": "Deep learning is", "parameters": {"max_new_tokens": N, "details": True}}
    payloads = sse_payloads(post_stream(smol, "/generate_stream", body))
    events = [json.loads(p) for p in payloads]  # no [DONE]: TGI streams just end
    assert all(set(e) == {"index", "token", "generated_text", "details"} for e in events)
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert set(events[-1]["token"]) == {"id", "text", "logprob", "special"}
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert events[-1]["details"]["generated_tokens"] == len(events)


def test_sse_headers(smol):
    r = smol.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"


def test_tgi_generate_and_compat_route(smol):
    body = {"inputs": "Deep learning is", "parameters": {"max_new_tokens": N, "details": True,
                                                          "decoder_input_details": True}}
    out = smol.post("/generate", json=body).json()
    d = out["details"]
    assert d["finish_reason"] in ("length", "eos_token") and d["generated_tokens"] == len(d["tokens"])
    assert [t["text"] for t in d["prefill"]] == ["Deep", " learning", " is"] and d["seed"] is None
    assert d["prefill"][0]["logprob"] is None and all(t["logprob"] < 0 for t in d["prefill"][1:])
    assert "".join(t["text"] for t in d["tokens"]) == out["generated_text"]
    compat = smol.post("/", json={**body, "stream": False}).json()
    assert compat == [out]
    # As in TGI, prompt details are not streamed: a stream asking for them is refused.
    assert smol.post("/", json={**body, "stream": True}).status_code == 422
    body["parameters"]["decoder_input_details"] = False
    streamed = smol.post("/", json={**body, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    last = json.loads(sse_payloads(streamed.text)[-1])
    assert last["generated_text"] == out["generated_text"]
    full = smol.post("/generate", json={"inputs": "Deep learning is", "parameters": {
        "max_new_tokens": N, "return_full_text": True}}).json()
    assert full["generated_text"] == "Deep learning is" + out["generated_text"]


def test_tgi_stop_sequence_keeps_the_match(smol):
    text = smol.post("/generate", json={"inputs": "Deep learning is", "parameters": {"max_new_tokens": N}}).json()["generated_text"]
    stop = text[4:7]
    out = smol.post("/generate", json={"inputs": "Deep learning is", "parameters": {
        "max_new_tokens": N, "stop": [stop], "details": True}}).json()
    assert out["details"]["finish_reason"] == "stop_sequence"
    # TGI stops after the token that completes the match and keeps the whole token.
    tokens = out["details"]["tokens"]
    assert stop in out["generated_text"] and stop not in out["generated_text"][: -len(tokens[-1]["text"])]
    assert text.startswith(out["generated_text"])


def test_truncate_keeps_the_end_of_the_input(smol):
    body = {"inputs": "one two three four five six seven eight nine ten",
            "parameters": {"max_new_tokens": 2, "truncate": 3, "details": True}}
    out = smol.post("/generate_stream", json=body)
    assert json.loads(sse_payloads(out.text)[-1])["details"]["input_length"] == 3


def test_info_health_models(smol):
    info = smol.get("/info").json()
    assert info["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # The default dtype is chosen per machine (shard/hardware.py): float32 rows where our CPU kernels load.
    assert info["model_dtype"] == choose_dtype("auto", "cpu", None, kernels=cpu_kernels.load())
    assert info["max_concurrent_requests"] == 16
    assert info["max_input_tokens"] < info["max_total_tokens"]
    assert info["num_shard"] == 1 and info["router"] == "sluice" and info["version"]
    health = smol.get("/health")
    assert health.status_code == 200 and health.json()["shards"][0]["ok"]
    models = smol.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == info["model_id"]


def test_tokenize(smol):
    text = "Héllo world"
    tokens = smol.post("/tokenize", json={"inputs": text}).json()
    assert "".join(t["text"] for t in tokens) == text
    assert all(text[t["start"]:t["stop"]] == t["text"] and isinstance(t["id"], int) for t in tokens)


def test_metrics(smol):
    smol.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    text = smol.get("/metrics").text
    for name in ("sluice_requests_total", "sluice_requests_in_flight", "tgi_queue_size", "tgi_batch_current_size",
                 "sluice_time_to_first_token_seconds_bucket", "sluice_inter_token_latency_seconds_bucket",
                 "tgi_request_generated_tokens_bucket", "tgi_request_input_length_bucket",
                 "tgi_request_duration_bucket", "tgi_request_count_total", "tgi_request_success_total"):
        assert name in text, name
    assert 'sluice_requests_total{route="/generate",status="200"}' in text


@pytest.mark.parametrize("path", ["/openapi.json", "/docs"])
def test_api_description(smol, path):
    r = smol.get(path)
    assert r.status_code == 200
    if path == "/openapi.json":
        assert "/v1/chat/completions" in r.json()["paths"]
