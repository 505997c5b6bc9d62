"""/v1/completions with several prompts, and its logprobs, in-process: against scripted generations
(tests/scripted_pool.py) for the shapes, and against the embedded SmolLM2 (`smol`) where the prompt's own
logprobs are needed (echo)."""
from __future__ import annotations

import json

import pytest

from scripted_pool import chunks_of, run_in_process


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def test_several_prompts_prompt_major(tiny_llama, tokenizer):
    async def check(client, pool):
        generated = len(tokenizer(pool.text, add_special_tokens=False).input_ids)
        prompts = ["The sky is", "Grass is", "Snow is"]
        lengths = [len(tokenizer(p).input_ids) for p in prompts]
        out = (await client.post("/v1/completions", json={"prompt": prompts, "n": 2, "echo": True})).json()
        assert [c["index"] for c in out["choices"]] == list(range(6))
        # Choice p * n + j belongs to prompt p (echo shows which), and the shard was asked in that order.
        assert [c["text"] for c in out["choices"]] == [p + pool.text for p in prompts for _ in range(2)]
        assert [len(r.input_ids) for r in pool.requests] == [n for n in lengths for _ in range(2)]
        assert out["usage"] == {"prompt_tokens": sum(lengths), "completion_tokens": 6 * generated,
                                "total_tokens": sum(lengths) + 6 * generated}

        # Token-id prompts (one list, or several), streamed: each chunk under its choice's index.
        ids = [tokenizer(p).input_ids for p in prompts[:2]]
        body = {"prompt": ids, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
        chunks = chunks_of((await client.post("/v1/completions", json=body)).text)
        by_index: dict[int, str] = {}
        for c in chunks[:-1]:
            (choice,) = c["choices"]
            by_index[choice["index"]] = by_index.get(choice["index"], "") + choice["text"]
        assert by_index == {i: pool.text for i in range(4)}
        assert chunks[-1]["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
        assert chunks[-1]["usage"]["completion_tokens"] == 4 * generated
        single = (await client.post("/v1/completions", json={"prompt": ids[0]})).json()
        assert len(single["choices"]) == 1 and pool.requests[-1].input_ids == ids[0]

        # best_of per prompt: the n likeliest of each prompt's candidates, indexed per prompt.
        out = (await client.post("/v1/completions", json={"prompt": prompts[:2], "best_of": 3})).json()
        assert [c["index"] for c in out["choices"]] == [0, 1]
        assert out["usage"]["completion_tokens"] == 6 * generated

    run_in_process(tiny_llama, tokenizer, check)


def test_logprobs_zero_gives_each_token_its_own(tiny_llama, tokenizer):
    async def check(client, pool):
        out = (await client.post("/v1/completions", json={"prompt": "Hi", "logprobs": 0})).json()
        lp = out["choices"][0]["logprobs"]
        assert lp["top_logprobs"] == [{t: x} for t, x in zip(lp["tokens"], lp["token_logprobs"])]
        chunks = chunks_of((await client.post("/v1/completions", json={"prompt": "Hi", "logprobs": 0,
                                                                        "stream": True})).text)
        streamed = [t for c in chunks for t in c["choices"][0]["logprobs"]["top_logprobs"]]
        assert streamed[:len(lp["top_logprobs"])] == lp["top_logprobs"]

    run_in_process(tiny_llama, tokenizer, check)


def test_echo_with_top_logprobs(smol):
    body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 2}
    whole = smol.post("/v1/completions", json=body)
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    lp = choice["logprobs"]
    prompt_tokens = whole.json()["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == prompt_tokens + 4 and "".join(lp["tokens"]) == choice["text"]
    assert choice["text"].startswith(body["prompt"]) and lp["text_offset"][0] == 0
    # The prompt's first token has no logprob; the others theirs alone (no alternatives for prompt tokens).
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for token, logprob, top in list(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]))[1:prompt_tokens]:
        assert logprob <= 0 and top == {token: logprob}
    # Generated tokens: the 2 likeliest and the token itself (greedy: it is the likeliest).
    for token, logprob, top in list(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]))[prompt_tokens:]:
        assert len(top) == 2 and top[token] == logprob == max(top.values())
    streamed = smol.post("/v1/completions", json={**body, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    joined = {k: [x for c in chunks for x in c["choices"][0]["logprobs"][k]]
              for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined == {k: lp[k] for k in joined}
