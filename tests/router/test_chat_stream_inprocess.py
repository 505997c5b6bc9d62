"""Chat completion streams in-process against scripted generations (tests/scripted_pool.py): tool calls
stream as the model writes them (several in one answer, each under its own index), the finish reason comes
in a last chunk of its own, and every chunk is one that TGI's own client (text-generation) and the openai
SDK's stream helper both read."""
from __future__ import annotations

import json

import pytest

from router.contract import FinishReason
from scripted_pool import chunks_of, run_in_process
from sluice.modelfiles import load_tokenizer, resolve

CALL = '{"name":"get_weather","arguments":{"city":"Paris","days":3}}'
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
CHAT = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]}
# A delta with nothing in it (the finish chunk's): the two keys every delta carries (router/openai.py).
NOTHING = {"role": "", "tool_calls": None}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(resolve(str(tiny_llama)))


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
            assert mine[-1] == {"index": index, "delta": NOTHING, "logprobs": None, "finish_reason": "tool_calls"}
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
        assert chunks[-1]["choices"][0]["delta"] == NOTHING and chunks[-1]["choices"][0]["finish_reason"] == "stop"

        pool.text = "Hello there, friend"
        body = {"messages": CHAT["messages"], "stream": True, "logprobs": True}
        chunks = chunks_of((await client.post("/v1/chat/completions", json=body)).text)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "tool_calls": None}
        text = [c["choices"][0] for c in chunks[1:-1]]
        assert "".join(c["delta"]["content"] for c in text) == pool.text
        assert all(c["finish_reason"] is None and c["logprobs"]["content"] for c in text)
        last = chunks[-1]["choices"][0]
        assert last["delta"] == NOTHING and last["finish_reason"] == "stop" and last["logprobs"] is None
        tokens = sum(len(c["logprobs"]["content"]) for c in text)
        assert tokens == len(tokenizer(pool.text, add_special_tokens=False).input_ids)

    run_in_process(tiny_llama, tokenizer, check)


CITY = {"type": "function", "function": {"name": "local_time", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
TWO_CALLS = CALL + '\n{"name":"local_time","arguments":{"city":"Paris"}}'


def sdk_accumulates(chunks: list[dict], tools: list[dict]) -> tuple[list, object]:
    """The openai SDK's own stream helper (what `chat.completions.stream(...)` runs) over the chunks:
    (its events, its final completion). Chunks are built as the SDK builds them: without validation."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state = ChatCompletionStreamState(input_tools=tools)
    events = [e for c in chunks for e in state.handle_chunk(ChatCompletionChunk.construct(**c))]
    return events, state.get_final_completion()


def test_several_calls_in_one_answer(tiny_llama, tokenizer):
    async def check(client, pool):
        pool.text = TWO_CALLS
        body = {**CHAT, "tools": [WEATHER, CITY], "parallel_tool_calls": True}
        whole = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
        calls = whole["message"]["tool_calls"]
        assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("get_weather", {"city": "Paris", "days": 3}), ("local_time", {"city": "Paris"})]
        assert len({c["id"] for c in calls}) == 2
        # The prompt offers several calls, one per line, and the grammar lets the model write them.
        assert "one such object per line" in pool.prompt() and '("\\n" call)*' in pool.requests[-1].grammar

        chunks = chunks_of((await client.post("/v1/chat/completions", json={**body, "stream": True})).text)
        deltas = [d for c in chunks for d in c["choices"][0]["delta"]["tool_calls"] or []]
        assert [d["index"] for d in deltas] == sorted(d["index"] for d in deltas)  # call 0 whole, then call 1
        for k, call in enumerate(calls):
            mine = [d for d in deltas if d["index"] == k]
            assert mine[0]["id"] and mine[0]["function"] == {"name": call["function"]["name"], "arguments": ""}
            assert all("id" not in d for d in mine[1:])
            assert "".join(d["function"]["arguments"] for d in mine[1:]) == call["function"]["arguments"]
        events, final = sdk_accumulates(chunks, body["tools"])
        done = [(e.index, e.name, e.arguments) for e in events if e.type == "tool_calls.function.arguments.done"]
        assert done == [(k, c["function"]["name"], c["function"]["arguments"]) for k, c in enumerate(calls)]
        message = final.choices[0].message
        assert message.role == "assistant" and final.choices[0].finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in calls]

        # parallel_tool_calls false or unset: one call, by the grammar and by the prompt.
        for fields in ({"parallel_tool_calls": False}, {"parallel_tool_calls": None}, {}):
            await client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER, CITY], **fields})
            assert "per line" not in pool.prompt() and '"\\n"' not in pool.requests[-1].grammar

    run_in_process(tiny_llama, tokenizer, check)


def test_every_chunk_reads_in_tgi_client_and_sdk_helper(tiny_llama, tokenizer):
    """TGI's text-generation client requires `role` and `tool_calls` in every delta; the SDK's helper
    concatenates every role it is given. Both read the same stream, text or n > 1."""
    from text_generation.types import ChatCompletionChunk as TgiChunk

    async def check(client, pool):
        body = {"messages": CHAT["messages"], "stream": True, "n": 2, "logprobs": True}
        chunks = chunks_of((await client.post("/v1/chat/completions", json=body)).text)
        for chunk in chunks:
            TgiChunk(**chunk)  # raises on a chunk the client cannot read
        events, final = sdk_accumulates(chunks, [])
        assert [c.message.role for c in final.choices] == ["assistant", "assistant"]
        assert [c.message.content for c in final.choices] == [pool.text, pool.text]
        assert [e.content for e in events if e.type == "content.done"] == [pool.text, pool.text]

    run_in_process(tiny_llama, tokenizer, check)


def test_done_marker_except_for_tgi_clients_user_agents(tiny_llama, tokenizer):
    async def check(client, pool):
        body = {"messages": CHAT["messages"], "stream": True}
        for agent, done in [("python-requests/2.32.3", False), ("Python/3.11 aiohttp/3.9.5", False),
                            ("OpenAI/Python 3.63.0", True), ("curl/8.5.0", True), (None, True)]:
            headers = {"User-Agent": agent} if agent else {}
            for route, extra in [("/v1/chat/completions", {}), ("/v1/completions", {"prompt": "Hi"})]:
                text = (await client.post(route, json={**body, **extra}, headers=headers)).text
                assert text.rstrip().endswith("data: [DONE]") is done, (agent, route, text[-80:])
                assert "[DONE]" not in text.rstrip().rpartition("\n")[0]

    run_in_process(tiny_llama, tokenizer, check)
