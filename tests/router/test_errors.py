"""The one error rule (router/errors.py), in-process against scripted generations: TGI's 422 and flat body on
TGI's routes, OpenAI's 400 with `{"error": {message, type, param, code}}` and `error_type` beside it on /v1;
messages that name the field and every offending value; unknown routes and methods answered in JSON; and the
same shapes for overload and authentication."""
from __future__ import annotations

import asyncio

import pytest

from api_errors import error_of, refusal
from scripted_pool import run_in_process

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def test_validation_in_each_dialect(tiny_llama, tokenizer):
    async def check(client, pool):
        r = await client.post("/v1/chat/completions", json={"messages": USER, "temperature": 3})
        assert r.status_code == 400 and r.json() == {"error": {
            "message": "temperature: Input should be less than or equal to 2, got 3", "type": "invalid_request_error",
            "param": "temperature", "code": None}, "error_type": "validation"}
        for stream in (False, True):
            assert "got 5" in refusal(await client.post("/v1/completions", json={"prompt": 5, "stream": stream}))
        r = await client.post("/generate", json={"inputs": "Hi", "parameters": {"temperature": -1}})
        assert r.status_code == 422 and r.json() == {
            "error": "parameters.temperature: Input should be greater than or equal to 0, got -1",
            "error_type": "validation"}
        # A rule no schema states, named by its field too; one that concerns no field has param null.
        assert error_of(await client.post("/v1/chat/completions", json={"messages": USER, "top_logprobs": 2}))[
            "param"] == "top_logprobs"
        empty = await client.post("/v1/completions", json={"prompt": [[]]})
        assert "empty" in refusal(empty) and error_of(empty)["param"] is None
        assert pool.requests == []

    run_in_process(tiny_llama, tokenizer, check)


def test_messages_name_every_offending_value(tiny_llama, tokenizer):
    async def check(client, pool):
        vocab = len(tokenizer)
        bias = {str(vocab + 7): 1, "3": 2, str(vocab): -1, str(10 * vocab): 5}
        message = refusal(await client.post("/v1/chat/completions", json={"messages": USER, "logit_bias": bias}))
        assert all(str(i) in message for i in (vocab + 7, vocab, 10 * vocab)) and ", 3," not in message, message
        message = refusal(await client.post("/v1/chat/completions", json={"messages": USER,
                                                                          "logit_bias": {"a": 1, "-2": 1, "4": 1}}))
        assert '"a"' in message and '"-2"' in message and '"4"' not in message, message
        message = refusal(await client.post("/v1/completions", json={"prompt": [[1, vocab + 1], [vocab + 2]]}))
        assert message.startswith("prompt.0: ") and str(vocab + 1) in message, message
        message = refusal(await client.post("/v1/completions", json={"prompt": [1, -4, vocab, -4]}))
        assert "-4" in message and str(vocab) in message and message.count("-4") == 1, message
        # A hostile list is named in part: the first 50 and how many more.
        message = refusal(await client.post("/v1/completions", json={"prompt": list(range(vocab, vocab + 500))}))
        assert str(vocab + 49) in message and str(vocab + 50) not in message and "and 450 more" in message
        message = refusal(await client.post("/generate", json={"inputs": "Hi", "parameters": {
            "max_new_tokens": 5, "grammar": {"type": "xml", "value": "a"}}}))
        assert "'xml'" in message, message
        assert pool.requests == []

    run_in_process(tiny_llama, tokenizer, check)


def test_unknown_routes_and_methods_answer_json(tiny_llama, tokenizer):
    async def check(client, pool):
        for method, path, status in [("GET", "/nope", 404), ("POST", "/generate/x", 404), ("DELETE", "/generate", 405),
                                     ("GET", "/generate_stream", 405), ("PUT", "/", 405)]:
            r = await client.request(method, path)
            assert r.status_code == status and error_of(r)["error_type"] == \
                {404: "not_found", 405: "method_not_allowed"}[status], (method, path, r.text)
        for method, path, status in [("POST", "/v1/embeddings", 404), ("GET", "/v1", 404),
                                     ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405)]:
            r = await client.request(method, path)
            error = error_of(r)  # OpenAI's shape
            assert r.status_code == status and error["type"] == "invalid_request_error" and error["param"] is None
            assert path in error["message"], error
        r = await client.get("/v1/completions")
        assert r.headers["allow"] == "POST"
        r = await client.patch("/v1/responses/resp_1")
        assert {"GET", "DELETE"} <= set(r.headers["allow"].split(", "))

    run_in_process(tiny_llama, tokenizer, check)


def test_overload_and_authentication_in_each_dialect(tiny_llama, tokenizer):
    async def check(client, pool):
        auth = {"Authorization": "Bearer k"}
        pool.release.clear()
        held = asyncio.create_task(client.post("/v1/completions", json={"prompt": "Hi"}, headers=auth))
        while not pool.requests:
            await asyncio.sleep(0.01)
        for path, body in [("/v1/chat/completions", {"messages": USER}), ("/generate", {"inputs": "Hi"})]:
            r = await client.post(path, json=body, headers=auth)
            error = error_of(r)
            assert r.status_code == 429 and error["error_type"] == "overloaded" and r.headers["retry-after"]
            assert int(r.headers["content-length"]) == len(r.content)
            if path.startswith("/v1/"):
                assert error["type"] == "rate_limit_error"
        pool.release.set()
        assert (await held).status_code == 200
        for path in ("/v1/models", "/info"):
            r = await client.get(path)
            assert r.status_code == 401 and error_of(r)["error_type"] == "authentication"
        assert error_of(await client.get("/v1/models"))["type"] == "authentication_error"

    run_in_process(tiny_llama, tokenizer, check, max_concurrent_requests=1, api_key="k")
