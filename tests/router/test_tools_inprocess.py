"""Tool calls under the real grammar on the embedded SmolLM2 (in-process, real gRPC): the shard compiles the
router's Lark grammar over per-function JSON schemas, whose `$defs` resolve (pydantic's nested models), and
every call the model writes is compact JSON that validates against its function's parameters."""
from __future__ import annotations

import json

import jsonschema
import pytest

from scripted_pool import chunks_of

# What pydantic writes for a model with a nested model: the nested one under $defs, referenced.
PLACE = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
         "required": ["city", "country"]}
BOOKING = {"type": "object", "properties": {"place": {"$ref": "#/$defs/Place"}, "nights": {"type": "integer"}},
           "required": ["place", "nights"], "$defs": {"Place": PLACE}}
TOOLS = [{"type": "function", "function": {"name": "book_hotel", "parameters": BOOKING}},
         {"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
BODY = {"messages": [{"role": "user", "content": "Book a hotel in Paris, France for 2 nights."}], "tools": TOOLS,
        "tool_choice": "required", "max_tokens": 80, "temperature": 0}


@pytest.mark.slow  # ~16 s: constrained generations on SmolLM2; the full suite runs it, the edit-test loop does not
def test_calls_validate_against_their_functions(smol):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for parallel in (None, True):
        r = smol.post("/v1/chat/completions", json={**BODY, "parallel_tool_calls": parallel})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        calls = choice["message"]["tool_calls"]
        # One call unless parallel_tool_calls is true; then as many as the model writes (this one repeats
        # itself until max_tokens, the last call cut).
        assert len(calls) == 1 if not parallel else len(calls) > 1, calls
        assert parallel or choice["finish_reason"] == "tool_calls"
        whole = calls[:-1] if choice["finish_reason"] == "length" else calls
        for call in whole:
            arguments = call["function"]["arguments"]
            jsonschema.validate(json.loads(arguments), schemas[call["function"]["name"]])
            assert arguments == json.dumps(json.loads(arguments), separators=(",", ":"), ensure_ascii=False)
        streamed = chunks_of(smol.post("/v1/chat/completions",
                                       json={**BODY, "parallel_tool_calls": parallel, "stream": True}).text)
        deltas = [d for c in streamed for d in c["choices"][0]["delta"]["tool_calls"] or []]
        assert [(d["function"]["name"]) for d in deltas if "id" in d] == [c["function"]["name"] for c in calls]
        assert ["".join(d["function"]["arguments"] for d in deltas if d["index"] == k)
                for k in range(len(calls))] == [c["function"]["arguments"] for c in calls]
