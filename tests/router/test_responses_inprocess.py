"""The Responses API's rules in-process (httpx over ASGI) against a pool that answers with scripted text
(tests/scripted_pool.py): refusals, the typed events and their order, function calls, the store (LRU,
caps, 404), background runs, and what a follow-up's prompt holds. The real SDK against a real server is
in tests/e2e/test_api_responses.py."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from router.contract import FinishReason
from router.response_store import ResponseStore, StoredResponse
from api_errors import refusal
from scripted_pool import run_in_process
from sluice.modelfiles import load_tokenizer, resolve

CALL = '{"name":"get_weather","arguments":{"city":"Paris"}}'
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(resolve(str(tiny_llama)))


def run(tiny_llama, tokenizer, check, **settings) -> None:
    run_in_process(tiny_llama, tokenizer, check, **settings)


def events_of(response: httpx.Response, first: int = 0) -> list[dict]:
    """The SSE events, checking that each one's `event:` line names its data's type and that they are
    numbered on from `first`."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.strip("\n").split("\n\n"):
        event_id, name, data = block.split("\n")  # id: <stream>.<n> (resumable streams), event:, data:
        assert event_id.startswith("id: ") and name.startswith("event: ") and data.startswith("data: "), block
        event = json.loads(data[len("data: "):])
        assert event["type"] == name[len("event: "):]
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(first, first + len(events)))
    return events


USER = "Say hello"
REFUSED = [
    ({"tools": [{"type": "web_search_preview"}]}, "web_search_preview"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "file_search"),
    ({"tools": [{"type": "mcp", "server_label": "x"}]}, "mcp"),
    ({"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"background": True, "store": False}, "background"),
    ({"include": ["file_search_call.results"]}, "file_search_call.results"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"top_logprobs": 21, "include": ["message.output_text.logprobs"]}, "top_logprobs"),
    ({"truncation": "auto"}, "truncation"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_object"}}, "tools": [WEATHER]}, "text.format"),
    ({"text": {"verbosity": "high"}}, "verbosity"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input_image"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "input_audio"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input_file"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"input": [{"type": "function_call_output", "output": "18"}]}, "call_id"),
]


@pytest.mark.parametrize("fields,word", REFUSED, ids=[w for _, w in REFUSED])
def test_refusals_name_the_field_before_any_event(tiny_llama, tokenizer, fields, word):
    async def check(client, pool):
        for stream in (False, True):
            r = await client.post("/v1/responses", json={"input": USER, "stream": stream, **fields})
            assert word in refusal(r), r.json()  # 400, OpenAI's error shape (api_errors.py)
        assert pool.requests == []

    run(tiny_llama, tokenizer, check)


def test_streamed_text_events_in_order(tiny_llama, tokenizer):
    async def check(client, pool):
        events = events_of(await client.post("/v1/responses", json={"input": USER, "stream": True}))
        kinds = [e["type"] for e in events]
        deltas = [e for e in events if e["type"] == "response.output_text.delta"]
        assert len(deltas) > 1
        assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                         "response.output_text.done", "response.content_part.done", "response.output_item.done",
                         "response.completed"]
        assert "".join(d["delta"] for d in deltas) == pool.text
        item_id = events[2]["item"]["id"]
        assert all(e["item_id"] == item_id and e["output_index"] == 0 and e["content_index"] == 0 for e in deltas)
        final = events[-1]["response"]
        assert final["status"] == "completed" and final["id"] == events[0]["response"]["id"]
        assert final["output"][0]["content"][0]["text"] == pool.text == events[-2]["item"]["content"][0]["text"]
        assert final["usage"]["output_tokens"] == len(tokenizer(pool.text, add_special_tokens=False).input_ids)
        assert all("error" not in e for e in events)
        # The same answer, not streamed.
        whole = (await client.post("/v1/responses", json={"input": USER})).json()
        assert whole["output"][0]["content"][0]["text"] == pool.text and whole["status"] == "completed"
        assert whole["usage"] == {**final["usage"]}

    run(tiny_llama, tokenizer, check)


def test_logprobs_when_included(tiny_llama, tokenizer):
    async def check(client, pool):
        body = {"input": USER, "include": ["message.output_text.logprobs"], "top_logprobs": 2}
        part = (await client.post("/v1/responses", json=body)).json()["output"][0]["content"][0]
        n = len(tokenizer(pool.text, add_special_tokens=False).input_ids)
        assert len(part["logprobs"]) == n and all(lp["logprob"] == -0.5 for lp in part["logprobs"])
        assert "".join(lp["token"] for lp in part["logprobs"]) == part["text"] == pool.text
        assert pool.requests[-1].top_n_tokens == 2
        events = events_of(await client.post("/v1/responses", json={**body, "stream": True}))
        deltas = [e for e in events if e["type"] == "response.output_text.delta"]
        assert [lp for d in deltas for lp in d["logprobs"]] == part["logprobs"]
        done = next(e for e in events if e["type"] == "response.output_text.done")
        assert done["logprobs"] == part["logprobs"]
        plain = (await client.post("/v1/responses", json={"input": USER})).json()
        assert plain["output"][0]["content"][0]["logprobs"] == [] and pool.requests[-1].top_n_tokens == 0

    run(tiny_llama, tokenizer, check)


def test_cut_by_max_output_tokens_is_incomplete(tiny_llama, tokenizer):
    async def check(client, pool):
        pool.finish = FinishReason.LENGTH
        body = {"input": USER, "max_output_tokens": 4}
        whole = (await client.post("/v1/responses", json=body)).json()
        assert whole["status"] == "incomplete" and whole["incomplete_details"] == {"reason": "max_output_tokens"}
        assert pool.requests[-1].max_new_tokens == 4
        events = events_of(await client.post("/v1/responses", json={**body, "stream": True}))
        assert events[-1]["type"] == "response.incomplete"
        assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}

    run(tiny_llama, tokenizer, check)


def test_a_failure_mid_stream_is_an_error_event_then_response_failed(tiny_llama, tokenizer):
    async def check(client, pool):
        pool.fail = True
        events = events_of(await client.post("/v1/responses", json={"input": USER, "stream": True}))
        assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
        assert events[-1]["response"]["status"] == "failed" and events[-1]["response"]["error"]["message"]
        assert all("error" not in e for e in events)  # the OpenAI SDK would raise on a top-level error key

    run(tiny_llama, tokenizer, check)


def test_function_call_streamed_and_not(tiny_llama, tokenizer):
    async def check(client, pool):
        pool.text = CALL
        body = {"input": "Weather in Paris?", "tools": [WEATHER], "tool_choice": "required"}
        whole = (await client.post("/v1/responses", json=body)).json()
        (call,) = whole["output"]
        assert call["type"] == "function_call" and call["name"] == "get_weather" and call["call_id"]
        assert json.loads(call["arguments"]) == {"city": "Paris"} and whole["status"] == "completed"
        assert pool.requests[-1].grammar  # constrained to the tool call format
        events = events_of(await client.post("/v1/responses", json={**body, "stream": True}))
        deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
        assert len(deltas) > 1  # as the model writes them
        assert [e["type"] for e in events] == [
            "response.created", "response.in_progress", "response.output_item.added",
            *["response.function_call_arguments.delta"] * len(deltas), "response.function_call_arguments.done",
            "response.output_item.done", "response.completed"]
        added, done, item_done = events[2], events[-3], events[-2]
        assert added["item"]["arguments"] == "" and added["item"]["status"] == "in_progress"
        assert added["item"]["call_id"] == item_done["item"]["call_id"] and added["item"]["id"] == done["item_id"]
        assert "".join(deltas) == done["arguments"] == item_done["item"]["arguments"]
        assert json.loads(done["arguments"]) == {"city": "Paris"}
        assert events[-1]["response"]["output"] == [item_done["item"]]
        # tool_choice auto and the model answering in text: a message item.
        pool.text = '{"name":"no_tool","arguments":{"content":"It is sunny."}}'
        text = (await client.post("/v1/responses", json={**body, "tool_choice": "auto"})).json()
        assert text["output"][0]["type"] == "message"
        assert text["output"][0]["content"][0]["text"] == "It is sunny."

    run(tiny_llama, tokenizer, check)


def test_several_function_calls_streamed_and_not(tiny_llama, tokenizer):
    async def check(client, pool):
        pool.text = CALL + "\n" + CALL.replace("Paris", "Lyon")
        body = {"input": "Weather in Paris and Lyon?", "tools": [WEATHER], "tool_choice": "required",
                "parallel_tool_calls": True}
        whole = (await client.post("/v1/responses", json=body)).json()
        assert [(o["type"], json.loads(o["arguments"])) for o in whole["output"]] == [
            ("function_call", {"city": "Paris"}), ("function_call", {"city": "Lyon"})]
        assert len({o["call_id"] for o in whole["output"]}) == len({o["id"] for o in whole["output"]}) == 2
        assert whole["parallel_tool_calls"] is True
        events = events_of(await client.post("/v1/responses", json={**body, "stream": True}))
        kinds = [(e["type"], e.get("output_index")) for e in events
                 if e["type"] != "response.function_call_arguments.delta"]
        assert kinds == [("response.created", None), ("response.in_progress", None),
                         ("response.output_item.added", 0), ("response.function_call_arguments.done", 0),
                         ("response.output_item.done", 0), ("response.output_item.added", 1),
                         ("response.function_call_arguments.done", 1), ("response.output_item.done", 1),
                         ("response.completed", None)]
        final = events[-1]["response"]["output"]
        for k in (0, 1):
            deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
                      and e["output_index"] == k]
            item = next(e["item"] for e in events
                        if e["type"] == "response.output_item.done" and e["output_index"] == k)
            assert "".join(deltas) == item["arguments"] == final[k]["arguments"] and item == final[k]
        # parallel_tool_calls false or unset: a grammar for one call.
        one = (await client.post("/v1/responses", json={**body, "parallel_tool_calls": False})).json()
        assert '"\\n"' not in pool.requests[-1].grammar and '"\\n"' in pool.requests[-2].grammar
        assert one["parallel_tool_calls"] is False
        await client.post("/v1/responses", json={**body, "parallel_tool_calls": None})
        assert '"\\n"' not in pool.requests[-1].grammar

    run(tiny_llama, tokenizer, check)


def test_previous_response_carries_the_conversation(tiny_llama, tokenizer):
    async def check(client, pool):
        pool.text = CALL
        first = (await client.post("/v1/responses", json={
            "input": "Weather in Paris?", "instructions": "Be brief.", "tools": [WEATHER]})).json()
        call = first["output"][0]
        pool.text = "It is 18 degrees."
        second = (await client.post("/v1/responses", json={
            "previous_response_id": first["id"], "tools": [WEATHER],
            "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "18 degrees"}]})).json()
        assert second["previous_response_id"] == first["id"]
        prompt = pool.prompt()
        assert "Weather in Paris?" in prompt and "18 degrees" in prompt
        assert CALL in prompt  # the call written back as the model wrote it, not double-encoded
        assert "Be brief." not in prompt  # instructions are not carried over, as at OpenAI
        third = (await client.post("/v1/responses", json={"previous_response_id": second["id"],
                                                          "input": "And tomorrow?"})).json()
        assert third["status"] == "completed" and "It is 18 degrees." in pool.prompt()
        # Retrieve, list the input, delete.
        got = await client.get(f"/v1/responses/{second['id']}")
        assert got.status_code == 200 and got.json() == second
        items = (await client.get(f"/v1/responses/{second['id']}/input_items")).json()
        assert [i["type"] for i in items["data"]] == ["function_call_output"] and not items["has_more"]
        gone = await client.delete(f"/v1/responses/{second['id']}")
        assert gone.json() == {"id": second["id"], "object": "response", "deleted": True}
        for r in (await client.get(f"/v1/responses/{second['id']}"),
                  await client.delete(f"/v1/responses/{second['id']}"),
                  await client.post("/v1/responses", json={"previous_response_id": second["id"], "input": "x"})):
            assert r.status_code == 404 and r.json()["error_type"] == "not_found"

    run(tiny_llama, tokenizer, check)


def test_store_is_lru_with_a_count_cap_and_store_false_keeps_nothing(tiny_llama, tokenizer):
    async def check(client, pool):
        a, b = [(await client.post("/v1/responses", json={"input": f"Hi {i}"})).json()["id"] for i in range(2)]
        assert (await client.get(f"/v1/responses/{a}")).status_code == 200  # a is now the most recent
        c = (await client.post("/v1/responses", json={"input": "Hi 2"})).json()["id"]
        assert (await client.get(f"/v1/responses/{b}")).status_code == 404
        assert (await client.get(f"/v1/responses/{a}")).status_code == 200
        assert (await client.get(f"/v1/responses/{c}")).status_code == 200
        unstored = (await client.post("/v1/responses", json={"input": "Hi", "store": False})).json()
        assert unstored["store"] is False
        assert (await client.get(f"/v1/responses/{unstored['id']}")).status_code == 404

    run(tiny_llama, tokenizer, check, responses_store_max=2)


def test_input_items_pages_in_both_orders(tiny_llama, tokenizer):
    async def check(client, pool):
        given = [{"role": "developer", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": [
                     {"type": "input_text", "text": "How "}, {"type": "input_text", "text": "are you?"}]}]
        rid = (await client.post("/v1/responses", json={"input": given})).json()["id"]
        assert "How are you?" in pool.prompt()
        url = f"/v1/responses/{rid}/input_items"
        asc = (await client.get(url, params={"order": "asc"})).json()
        assert [i["role"] for i in asc["data"]] == ["developer", "user", "assistant", "user"]
        assert asc["data"][2]["content"] == [{"type": "output_text", "text": "Hello!"}]
        desc = (await client.get(url)).json()
        assert desc["data"] == asc["data"][::-1]
        page = (await client.get(url, params={"order": "asc", "limit": 2, "after": asc["data"][0]["id"]})).json()
        assert page["data"] == asc["data"][1:3] and page["has_more"]
        assert "limit" in refusal(await client.get(url, params={"limit": 0}))

    run(tiny_llama, tokenizer, check)


def test_overload_is_429_before_any_event(tiny_llama, tokenizer):
    async def check(client, pool):
        pool.release.clear()
        held = asyncio.create_task(client.post("/v1/responses", json={"input": USER, "stream": True}))
        while not pool.requests:
            await asyncio.sleep(0.01)
        r = await client.post("/v1/responses", json={"input": USER, "stream": True})
        assert r.status_code == 429 and r.json()["error_type"] == "overloaded"
        pool.release.set()
        assert events_of(await held)[-1]["type"] == "response.completed"

    run(tiny_llama, tokenizer, check, max_concurrent_requests=1)


def test_background_runs_counted_polled_followed_and_cancelled(tiny_llama, tokenizer):
    async def check(client, pool):
        pool.release.clear()
        queued = (await client.post("/v1/responses", json={"input": USER, "background": True})).json()
        assert queued["status"] == "queued" and queued["background"] is True
        url = f"/v1/responses/{queued['id']}"
        while not pool.requests:
            await asyncio.sleep(0.01)
        # It runs on after its request ended, and still counts against max_concurrent_requests.
        assert (await client.post("/v1/responses", json={"input": USER})).status_code == 429
        assert (await client.get(url)).json()["status"] == "in_progress"
        pool.release.set()
        events = events_of(await client.get(url, params={"stream": "true"}))
        assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
        middle = len(events) // 2
        rest = events_of(await client.get(url, params={"stream": "true", "starting_after": middle}), middle + 1)
        assert rest == events[middle + 1:]  # no gap, no repeat
        done = (await client.get(url)).json()
        assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == pool.text
        assert (await client.post(url + "/cancel")).json() == done  # over already: as it ended

        pool.release.clear()
        running = (await client.post("/v1/responses", json={"input": USER, "background": True})).json()
        while len(pool.requests) < 2:
            await asyncio.sleep(0.01)
        cancelled = (await client.post(f"/v1/responses/{running['id']}/cancel")).json()
        assert cancelled["status"] == "cancelled"
        assert (await client.get(f"/v1/responses/{running['id']}")).json()["status"] == "cancelled"
        pool.release.set()
        assert (await client.post("/v1/responses", json={"input": USER})).status_code == 200  # no longer counted
        plain = (await client.post("/v1/responses", json={"input": USER})).json()
        assert "background" in refusal(await client.post(f"/v1/responses/{plain['id']}/cancel"))
        assert "background" in refusal(await client.get(f"/v1/responses/{plain['id']}", params={"stream": "true"}))

    run(tiny_llama, tokenizer, check, max_concurrent_requests=1)


def test_no_follow_up_on_a_background_response_still_running(tiny_llama, tokenizer):
    async def check(client, pool):
        pool.release.clear()
        running = (await client.post("/v1/responses", json={"input": USER, "background": True})).json()
        follow_up = await client.post("/v1/responses", json={"previous_response_id": running["id"], "input": "Hi"})
        assert "in progress" in refusal(follow_up)
        pool.release.set()
        events_of(await client.get(f"/v1/responses/{running['id']}", params={"stream": "true"}))  # until it ends
        follow_up = await client.post("/v1/responses", json={"previous_response_id": running["id"], "input": "Hi"})
        assert follow_up.status_code == 200 and pool.text in pool.prompt()

    run(tiny_llama, tokenizer, check)


def _record(text: str) -> StoredResponse:
    return StoredResponse({"id": "r", "output": []}, [], [{"type": "message", "content": text}])


def test_store_byte_cap_and_owners_are_separate():
    one = _record("x" * 100)
    store = ResponseStore(max_count=10, max_bytes=one.size * 2)
    assert store.put("alice", "r1", one) and store.put("alice", "r2", _record("x" * 100))
    assert store.put("bob", "r1", _record("y" * 100))  # bob's allowance is his own
    assert store.put("alice", "r3", _record("x" * 100))  # over alice's bytes: her oldest goes
    assert store.get("alice", "r1") is None and store.get("alice", "r2") and store.get("alice", "r3")
    assert store.usage("alice") == (2, one.size * 2) and store.get("bob", "r1").context[0]["content"] == "y" * 100
    assert store.get("bob", "r2") is None and store.get("carol", "r1") is None
    assert not store.put("alice", "big", _record("x" * 1000))  # larger than the whole allowance: not kept
    assert store.usage("alice") == (2, one.size * 2)
    assert store.delete("alice", "r2") and not store.delete("alice", "r2")
    assert store.usage("alice") == (1, one.size)
