"""Chat completion streams in-process against scripted generations (tests/scripted_pool.py): tool calls
stream as the model writes them, and the finish reason comes in a last chunk of its own."""
from __future__ import annotations

import json

import pytest

from router.contract import FinishReason
from scripted_pool import run_in_process
from sluice.modelfiles import load_tokenizer, resolve

CALL = '{"name":"get_weather","arguments":{"city":"Paris","days":3}}'
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
CHAT = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(resolve(str(tiny_llama)))


def chunks_of(text: str) -> list[dict]:
    # Each event's data line (an `id:` line comes before it: resumable streams).
    events = [block.split("\n")[-1].removeprefix("data: ") for block in text.strip("\n").split("\n\n")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_tool_call_streams_as_written_then_a_finish_chunk(tiny_llama, tokenizer):
    async def check(client, pool):
        pool.text = CALL
        whole = (await client.post("/v1/chat/completions", json=CHAT)).json()
        call = whole["choices"][0]["message"]["tool_calls"][0]
        assert whole["choices"][0]["finish_reason"] == "tool_calls"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 3}

        chunks = chunks_of((await client.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": 2})).text)
        for index in (0, 1):
            mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
            calls = [d for c in mine for d in c["delta"].get("tool_calls") or []]
            first, rest = calls[0], calls[1:]
            assert first["id"] and first["type"] == "function" and first["function"] == {
                "name": "get_weather", "arguments": ""}
            assert len(rest) > 1 and all(set(d) == {"index", "function"} for d in rest)
            assert "".join(d["function"]["arguments"] for d in rest) == call["function"]["arguments"]
            # The finish comes alone, after the last arguments; no chunk before it has one.
            assert mine[-1] == {"index": index, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
            assert all(c["finish_reason"] is None for c in mine[:-1])

    run_in_process(tiny_llama, tokenizer, check)


def test_tool_call_cut_by_length_is_still_a_call(tiny_llama, tokenizer):
    async def check(client, pool):
        pool.text, pool.finish = CALL[:-12], FinishReason.LENGTH
        whole = (await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 9})).json()
        choice = whole["choices"][0]
        assert choice["finish_reason"] == "length" and choice["message"]["content"] is None
        arguments = choice["message"]["tool_calls"][0]["function"]["arguments"]
        assert CALL.startswith('{"name":"get_weather","arguments":' + arguments)
        chunks = chunks_of((await client.post("/v1/chat/completions", json={**CHAT, "stream": True})).text)
        calls = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls") or []]
        assert "".join(d["function"]["arguments"] for d in calls) == arguments
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    run_in_process(tiny_llama, tokenizer, check)


def test_text_answers_under_tools_and_plain_text(tiny_llama, tokenizer):
    async def check(client, pool):
        pool.text = '{"name":"no_tool","arguments":{"content":"Sunny, \\"warm\\"."}}'
        chunks = chunks_of((await client.post("/v1/chat/completions", json={**CHAT, "stream": True})).text)
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert not any(d.get("tool_calls") for d in deltas)
        assert "".join(d.get("content") or "" for d in deltas) == 'Sunny, "warm".'
        assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "stop"

        pool.text = "Hello there, friend"
        body = {"messages": CHAT["messages"], "stream": True, "logprobs": True}
        chunks = chunks_of((await client.post("/v1/chat/completions", json=body)).text)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = [c["choices"][0] for c in chunks[1:-1]]
        assert "".join(c["delta"]["content"] for c in text) == pool.text
        assert all(c["finish_reason"] is None and c["logprobs"]["content"] for c in text)
        last = chunks[-1]["choices"][0]
        assert last["delta"] == {} and last["finish_reason"] == "stop" and last["logprobs"] is None
        tokens = sum(len(c["logprobs"]["content"]) for c in text)
        assert tokens == len(tokenizer(pool.text, add_special_tokens=False).input_ids)

    run_in_process(tiny_llama, tokenizer, check)
