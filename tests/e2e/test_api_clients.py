"""The Python clients of the streaming guide, unchanged, against a real `sluice serve`."""
import asyncio

import httpx
import openai
import pytest
from huggingface_hub import AsyncInferenceClient, InferenceClient

PROMPT = "The three primary colors are"
CHAT = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Count to 10"}]
N = 16


def in_flight(base: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("sluice_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no in-flight gauge in /metrics")


def test_hf_text_generation_stream_matches_non_streamed(server):
    client = InferenceClient(base_url=server)
    whole = client.text_generation(PROMPT, max_new_tokens=N)
    events = list(client.text_generation(PROMPT, max_new_tokens=N, stream=True, details=True))
    assert len(events) > 1
    assert all(e.generated_text is None for e in events[:-1])
    assert "".join(e.token.text for e in events) == events[-1].generated_text == whole
    details = events[-1].details
    assert details.finish_reason in ("length", "eos_token")
    assert details.generated_tokens == len(events)
    texts = list(client.text_generation(PROMPT, max_new_tokens=N, stream=True))
    assert "".join(texts) == whole


def test_hf_text_generation_details(server):
    out = InferenceClient(base_url=server).text_generation(PROMPT, max_new_tokens=N, details=True, top_n_tokens=2)
    assert out.details.generated_tokens == len(out.details.tokens) <= N
    assert "".join(t.text for t in out.details.tokens) == out.generated_text
    assert all(t.logprob <= 0 for t in out.details.tokens)
    assert all(len(top) == 2 for top in out.details.top_tokens)


def test_tokens_arrive_while_the_generation_runs(server):
    client = InferenceClient(base_url=server)  # keep it: the client owns the open response
    stream = client.text_generation(PROMPT, max_new_tokens=64, stream=True)
    first = next(iter(stream))
    assert isinstance(first, str)
    # A token has arrived and the request is still admitted: it was sent before the generation ended.
    assert in_flight(server) >= 1
    stream.close()


def test_hf_chat_stream_matches_non_streamed(server):
    client = InferenceClient(base_url=server)
    whole = client.chat.completions.create(messages=CHAT, max_tokens=N, temperature=0)
    chunks = list(client.chat.completions.create(messages=CHAT, stream=True, max_tokens=N, temperature=0))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert sum(1 for p in pieces if p) > 1
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= N


def test_hf_async_clients(server):
    async def main():
        client = AsyncInferenceClient(base_url=server)
        chat = await client.chat.completions.create(messages=CHAT, stream=True, max_tokens=N, temperature=0)
        chat_text = "".join([c.choices[0].delta.content or "" async for c in chat])
        gen = await client.text_generation(PROMPT, max_new_tokens=N, stream=True, details=True)
        events = [e async for e in gen]
        return chat_text, events

    chat_text, events = asyncio.run(main())
    sync = InferenceClient(base_url=server)
    assert chat_text == sync.chat.completions.create(messages=CHAT, max_tokens=N, temperature=0).choices[0].message.content
    assert "".join(e.token.text for e in events) == events[-1].generated_text == sync.text_generation(
        PROMPT, max_new_tokens=N)


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="-", max_retries=0)


def test_openai_chat_stream(oai):
    whole = oai.chat.completions.create(model="tgi", messages=CHAT, max_tokens=N, temperature=0)
    stream = oai.chat.completions.create(model="tgi", messages=CHAT, max_tokens=N, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_openai_completions_stream(oai):
    whole = oai.completions.create(model="dummy", prompt=PROMPT, max_tokens=N, temperature=0)
    chunks = list(oai.completions.create(model="dummy", prompt=PROMPT, max_tokens=N, temperature=0, stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_stop_sequence_is_not_emitted(oai):
    text = oai.completions.create(model="x", prompt=PROMPT, max_tokens=N, temperature=0).choices[0].text
    assert len(text) > 12, text
    stop = text[6:9]  # three characters that likely span a token boundary
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model="x", prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop], stream=True))
    assert streamed == text[: text.index(stop)]
    messages = [{"role": "user", "content": "What is deep learning?"}]
    content = oai.chat.completions.create(model="x", messages=messages, max_tokens=N, temperature=0).choices[0].message.content
    stop = content[6:9]
    short = oai.chat.completions.create(model="x", messages=messages, max_tokens=N, temperature=0, stop=stop)
    assert short.choices[0].message.content == content[: content.index(stop)]
    assert short.choices[0].finish_reason == "stop"


def test_same_seed_same_sample(server):
    client = InferenceClient(base_url=server)
    runs = [client.text_generation(PROMPT, max_new_tokens=N, do_sample=True, temperature=0.9, seed=7, details=True)
            for _ in range(2)]
    assert runs[0].generated_text == runs[1].generated_text
    assert runs[0].details.seed == 7


def test_tgi_python_client_chat_and_errors(server):
    """TGI's own Python client (text-generation 0.7) validates every chunk: every delta needs `role` and
    `tool_calls`, and every `data:` line must be JSON (its User-Agents, requests' and aiohttp's, get no
    `[DONE]`). Its errors come from `error_type`, in either dialect's body."""
    import text_generation
    from text_generation.types import Message

    messages = [Message(role="user", content="Count to 10")]
    client = text_generation.Client(server, timeout=120)
    whole = client.chat(messages=messages, max_tokens=N, temperature=0)
    chunks = list(client.chat(messages=messages, max_tokens=N, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices[0].delta.content) > 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    async def streamed() -> list:
        return [c async for c in await text_generation.AsyncClient(server, timeout=120).chat(
            messages=messages, max_tokens=N, temperature=0, stream=True)]

    assert [c.choices[0].delta.content for c in asyncio.run(streamed())] == [c.choices[0].delta.content for c in chunks]
    with pytest.raises(text_generation.errors.ValidationError):
        client.generate("word " * 1500, max_new_tokens=5)  # TGI's route: 422
    with pytest.raises(text_generation.errors.ValidationError):
        client.chat(messages=messages, max_tokens=100_000)  # /v1: OpenAI's 400, error_type beside it
