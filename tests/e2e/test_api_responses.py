"""The Responses API through the real `openai` SDK against the shared `sluice serve` (embedded SmolLM2):
create, streamed and not, the `responses.stream` helper, `responses.parse` into a pydantic model, a
function tool round trip with `previous_response_id`, background + re-attach, and 404 for what the store
does not hold. Rules (refusals, event order, the store's LRU and caps, cancel) are checked in-process in
tests/router/test_responses_inprocess.py, where the caps can be small."""
from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel

PROMPT = "Write one sentence about the sea."
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                          "required": ["city"], "additionalProperties": False}}


class Fruit(BaseModel):  # small and bounded: the grammar completes it in a few tokens
    color: Literal["red", "green", "yellow"]
    ripe: bool


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="-", max_retries=0)


def test_create_streamed_equals_not_streamed(client):
    whole = client.responses.create(model="tgi", input=PROMPT, max_output_tokens=8, temperature=0,
                                    include=["message.output_text.logprobs"], top_logprobs=2)
    assert whole.status in ("completed", "incomplete") and whole.output_text
    assert whole.usage.output_tokens <= 8 and whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    logprobs = whole.output[0].content[0].logprobs
    assert len(logprobs) == whole.usage.output_tokens and all(len(lp.top_logprobs) == 2 for lp in logprobs)
    # Greedy: each token is its step's likeliest.
    assert [lp.logprob for lp in logprobs] == pytest.approx([lp.top_logprobs[0].logprob for lp in logprobs], abs=1e-3)
    events = list(client.responses.create(model="tgi", input=PROMPT, max_output_tokens=8, temperature=0,
                                          stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == f"response.{whole.status}"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text == events[-1].response.output_text


def test_stream_helper_and_parse_into_a_model(client):
    input_ = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Describe a banana."}]
    with client.responses.stream(model="tgi", input=input_, text_format=Fruit, max_output_tokens=30,
                                 temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    snapshots = [e.snapshot for e in events if e.type == "response.output_text.delta"]
    assert snapshots and snapshots[-1] == final.output_text
    done = next(e for e in events if e.type == "response.output_text.done")
    assert isinstance(done.parsed, Fruit) and final.output_parsed == done.parsed
    parsed = client.responses.parse(model="tgi", input=input_, text_format=Fruit, max_output_tokens=30,
                                    temperature=0)
    assert parsed.output_parsed == final.output_parsed  # greedy: the same answer, streamed or not


def test_function_tool_round_trip(client):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.responses.create(model="tgi", input=question, tools=[WEATHER], tool_choice="required",
                                    max_output_tokens=40, temperature=0)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    with client.responses.stream(model="tgi", input=question, tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=40, temperature=0) as stream:
        kinds = [e.type for e in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    assert json.loads(streamed.output[0].arguments) == json.loads(call.arguments)
    follow = client.responses.create(model="tgi", previous_response_id=first.id, tools=[WEATHER],
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "18 degrees and sunny"}],
                                     max_output_tokens=4, temperature=0)
    assert follow.previous_response_id == first.id and follow.status in ("completed", "incomplete")
    items = client.responses.input_items.list(follow.id)
    assert [i.type for i in items.data] == ["function_call_output"]


def test_stored_retrieved_deleted_and_404(client):
    first = client.responses.create(model="tgi", input="Say hi.", max_output_tokens=2, temperature=0)
    kept = client.responses.retrieve(first.id)
    assert kept.id == first.id and kept.output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tgi", previous_response_id=first.id, input="Go on.", max_output_tokens=2)
    unstored = client.responses.create(model="tgi", input="Hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_background_is_polled_and_followed_again_from_any_event(client):
    queued = client.responses.create(model="tgi", input=PROMPT, max_output_tokens=8, temperature=0,
                                     background=True)
    assert queued.status == "queued" and queued.background
    events = list(client.responses.retrieve(queued.id, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type in ("response.completed", "response.incomplete")
    rest = list(client.responses.retrieve(queued.id, stream=True, starting_after=3))
    assert [e.to_dict() for e in rest] == [e.to_dict() for e in events[4:]]  # no gap, no repeat
    final = client.responses.retrieve(queued.id)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.status == events[-1].response.status and final.output_text == deltas
    assert client.responses.cancel(queued.id).status == final.status  # over already: as it ended
