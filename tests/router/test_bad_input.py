"""Hostile bodies get the right 4xx and never a 5xx, a hang or a dead server: a body of exactly the size
limit and one byte over, deeply nested, invalid UTF-8, NaN/Infinity, lone surrogates, 100k stop sequences,
and prompts at the input limit and one token over it. (A 413 before the body is sent, which needs a raw
socket, and request ids in both services' logs are in tests/e2e/test_api_bad_input.py.)"""
import pytest

from api_errors import refusal
from inprocess import InProcessRouter

LIMIT = 65536
MAX_INPUT = 64


@pytest.fixture(scope="module")
def strict(router_loop, smol_shard):
    router = InProcessRouter(router_loop, smol_shard, max_body_bytes=LIMIT, max_input_tokens=MAX_INPUT,
                             max_total_tokens=128)
    yield router
    router.close()


def test_body_of_exactly_the_limit_is_read(strict):
    body = b'{"inputs": "Hi", "parameters": {"max_new_tokens": 1}}'
    r = strict.post("/generate", content=body.ljust(LIMIT), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    over = strict.post("/generate", content=body.ljust(LIMIT + 1), headers={"Content-Type": "application/json"})
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
    r = strict.post("/generate", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"
    assert word in r.json()["error"], r.json()["error"]


def test_hundred_thousand_stop_sequences(smol):
    for route, body in [("/generate", {"inputs": "Hi", "parameters": {"stop": ["x"] * 100_000}}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                  "stop": ["x"] * 100_000})]:
        assert "stop" in refusal(smol.post(route, json=body))


def test_prompt_at_the_input_limit_and_one_over(strict):
    at = strict.post("/v1/completions", json={"prompt": [42] * MAX_INPUT, "max_tokens": 1})
    assert at.status_code == 200, at.text
    assert at.json()["usage"]["prompt_tokens"] == MAX_INPUT
    over = strict.post("/v1/completions", json={"prompt": [42] * (MAX_INPUT + 1), "max_tokens": 1})
    assert "max_input_tokens" in refusal(over)
    # The same through text and the tokenizer, on the TGI route.
    ids = strict.post("/tokenize", json={"inputs": "one " * 200}).json()
    text = "one " * 200
    exact = text[: ids[MAX_INPUT - 1]["stop"]]  # the first MAX_INPUT tokens
    fits = strict.post("/generate", json={"inputs": exact, "parameters": {"max_new_tokens": 1}})
    assert fits.status_code == 200, fits.text
    longer = text[: ids[MAX_INPUT]["stop"]]
    refused = strict.post("/generate", json={"inputs": longer, "parameters": {"max_new_tokens": 1}})
    assert refused.status_code == 422 and "max_input_tokens" in refused.json()["error"]
