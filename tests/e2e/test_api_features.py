"""Issue 5's parameters through the real clients (openai SDK, huggingface_hub) on the embedded model:
n choices, seeds, logprobs against a direct forward, usage counts, constrained decoding, tools,
best_of, echo, logit_bias. (Unknown fields and the OpenAPI document are in-process: tests/router.)"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch
from huggingface_hub import InferenceClient

from sluice.modelfiles import load_tokenizer, resolve

USER = [{"role": "user", "content": "Name a fruit."}]
PROMPT = "The three primary colors are"

# Nested objects, enums and arrays; strings and arrays are bounded so a small model finishes in few tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
        "size": {"type": "object", "properties": {"w": {"type": "integer", "minimum": 0, "maximum": 99},
                                                  "ok": {"type": "boolean"}},
                 "required": ["w", "ok"], "additionalProperties": False},
    },
    "required": ["name", "color", "tags", "size"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="-", max_retries=0)


@pytest.fixture(scope="module")
def fp32(fp32_server):
    return fp32_server  # shared with test_parity (tests/e2e/conftest.py)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve(None))


def test_n_choices_streamed_and_not(fp32, tokenizer):
    # The float32 server: the streamed request's prompt is a prefix-cache hit, and under the default's
    # float16 KV cache the K/V it reads back (written by the first request, rounded to float16) can differ by
    # a float16 step from what the first computed with, enough to move a seeded sample near a tie.
    oai = openai.OpenAI(base_url=fp32 + "/v1", api_key="-", max_retries=0)
    whole = oai.chat.completions.create(model="tgi", messages=USER, n=3, max_tokens=6, seed=11)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in whole.choices)
    # The prompt is counted once, with the tokenizer's own count of the templated prompt.
    prompt = tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert whole.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)

    chunks = list(oai.chat.completions.create(model="tgi", messages=USER, n=3, max_tokens=6, seed=11, stream=True,
                                              stream_options={"include_usage": True}, logprobs=True))
    texts, tokens, finishes = ["", "", ""], [0, 0, 0], [None] * 3
    for c in chunks[:-1]:
        choice = c.choices[0]
        texts[choice.index] += choice.delta.content or ""
        tokens[choice.index] += len(choice.logprobs.content) if choice.logprobs else 0
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    # Same seed, same choices, streamed or not; each choice's own seed comes from the request's.
    assert texts == [c.message.content for c in whole.choices]
    assert all(f in ("stop", "length") for f in finishes)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(tokens) == whole.usage.completion_tokens


def test_seeded_sampling_ignores_batch_company(fp32):
    server = fp32
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 5}
    alone = httpx.post(server + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    others = [{"prompt": f"Story {i}:", "max_tokens": 12, "temperature": 1.0} for i in range(3)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(httpx.post, server + "/v1/completions", json=b, timeout=120) for b in [*others, body]]
        crowded = futures[-1].result().json()["choices"][0]["text"]
    assert crowded == alone


def test_logprobs_equal_log_softmax_of_the_model(fp32, smollm2_reference):
    """Generated and prompt token logprobs from a float32 server against transformers' forward in fp32."""
    url, model = fp32, smollm2_reference
    out = InferenceClient(base_url=url).text_generation(PROMPT, max_new_tokens=4, details=True,
                                                        decoder_input_details=True, top_n_tokens=2)
    prompt_ids = [t.id for t in out.details.prefill]
    generated = [t.id for t in out.details.tokens]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0]
    ref = torch.log_softmax(logits.float(), dim=-1)
    ids = prompt_ids + generated
    ours = [t.logprob for t in out.details.prefill[1:]] + [t.logprob for t in out.details.tokens]
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert out.details.prefill[0].logprob is None
    assert ours == pytest.approx(expected, abs=2e-3)
    for step, top in enumerate(out.details.top_tokens):  # huggingface_hub leaves these as dicts
        vals, top_ids = ref[len(prompt_ids) - 1 + step].topk(2)
        assert [t["id"] for t in top] == top_ids.tolist()
        assert [t["logprob"] for t in top] == pytest.approx(vals.tolist(), abs=2e-3)
    # OpenAI completions with echo give the same prompt logprobs.
    echoed = openai.OpenAI(base_url=url + "/v1", api_key="-").completions.create(
        model="x", prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=0)
    lp = echoed.choices[0].logprobs
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1 : len(prompt_ids)] == pytest.approx(expected[: len(prompt_ids) - 1], abs=2e-3)
    assert echoed.choices[0].text.startswith(PROMPT) and lp.text_offset[:2] == [0, len(lp.tokens[0])]


def test_json_schema_outputs_validate(oai, server):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    whole = oai.chat.completions.create(model="tgi", messages=USER, max_tokens=120, response_format=fmt, seed=1)
    jsonschema.validate(json.loads(whole.choices[0].message.content), SCHEMA)
    assert whole.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model="tgi", messages=USER, max_tokens=120, response_format=fmt, stream=True, temperature=0) if c.choices)
    jsonschema.validate(json.loads(streamed), SCHEMA)
    obj = oai.chat.completions.create(model="tgi", messages=USER, max_tokens=60, temperature=0,
                                      response_format={"type": "json_object"}, n=2)
    for choice in obj.choices:
        if choice.finish_reason == "stop":  # an unbounded object may run out of tokens: then it is "length"
            assert isinstance(json.loads(choice.message.content), dict)
    client = InferenceClient(base_url=server)
    text = client.text_generation("A thing as JSON:", max_new_tokens=120, grammar={"type": "json", "value": SCHEMA})
    jsonschema.validate(json.loads(text), SCHEMA)
    events = list(client.text_generation("Phone:", max_new_tokens=20, stream=True, details=True,
                                         grammar={"type": "regex", "value": r"\d{3}-\d{4}"}))
    assert re.fullmatch(r"\d{3}-\d{4}", events[-1].generated_text)
    assert events[-1].details.finish_reason == "eos_token"


def test_tool_calls(oai):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    whole = oai.chat.completions.create(model="tgi", messages=messages, tools=[WEATHER], tool_choice="required",
                                        max_tokens=60, temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    chunks = list(oai.chat.completions.create(model="tgi", messages=messages, tools=[WEATHER], stream=True,
                                              tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                              max_tokens=60, temperature=0))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments for d in deltas)) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The call and its result go back in as history; the model may answer or call again.
    follow = oai.chat.completions.create(model="tgi", max_tokens=5, temperature=0, tools=[WEATHER], messages=[
        *messages, choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_sdk_stream_helper_accumulates_the_same_tool_call(oai):
    """The SDK's chat.completions.stream(...) closes a call's arguments on the finish chunk, which comes
    after the last arguments delta: the call it accumulates is the non-streamed one."""
    kwargs = {"model": "tgi", "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
              "tools": [WEATHER], "tool_choice": "required", "max_tokens": 60, "temperature": 0}
    whole = oai.chat.completions.create(**kwargs).choices[0].message.tool_calls[0].function
    with oai.chat.completions.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_completion().choices[0]
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    deltas = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len(done) == 1 and done[0].name == whole.name == "get_weather" and len(deltas) > 1
    assert done[0].arguments == "".join(d.arguments_delta for d in deltas) == whole.arguments
    assert final.finish_reason == "tool_calls" and final.message.tool_calls[0].function.arguments == whole.arguments


def test_logit_bias_and_max_completion_tokens(oai, tokenizer):
    forced = tokenizer(" banana", add_special_tokens=False).input_ids[0]
    out = oai.chat.completions.create(model="tgi", messages=USER, max_completion_tokens=3, temperature=0,
                                      logit_bias={str(forced): 100}, user="someone")
    assert out.choices[0].message.content == tokenizer.decode([forced] * 3)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    plain = oai.chat.completions.create(model="tgi", messages=USER, max_tokens=1, temperature=0, logprobs=True)
    first = tokenizer(plain.choices[0].logprobs.content[0].token, add_special_tokens=False).input_ids[0]
    banned = oai.chat.completions.create(model="tgi", messages=USER, max_tokens=1, temperature=0,
                                         logit_bias={str(first): -100})
    assert banned.choices[0].message.content != plain.choices[0].message.content


def test_best_of_and_typical_p(server, oai):
    out = InferenceClient(base_url=server).text_generation(PROMPT, max_new_tokens=4, best_of=3, do_sample=True,
                                                           seed=3, details=True, typical_p=0.9)
    others = out.details.best_of_sequences
    assert len(others) == 2
    best = sum(t.logprob for t in out.details.tokens)
    assert all(best >= sum(t.logprob for t in s.tokens) for s in others)
    assert {out.details.seed, *(s.seed for s in others)} == {3, 4, 5}
    comp = oai.completions.create(model="x", prompt=PROMPT, max_tokens=4, n=2, best_of=3, seed=3, logprobs=1)
    assert len(comp.choices) == 2 and comp.usage.completion_tokens <= 12
    sums = [sum(c.logprobs.token_logprobs) for c in comp.choices]
    assert sums[0] >= sums[1]
    # OpenAI's top_logprobs: the 1 likeliest and the sampled token itself (one entry when they are the same).
    assert all(c.logprobs.tokens[0] in c.logprobs.top_logprobs[0] and 1 <= len(c.logprobs.top_logprobs[0]) <= 2
               for c in comp.choices)
