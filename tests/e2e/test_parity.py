"""Greedy decoding through the whole server (HTTP -> router -> gRPC -> engine) gives the same token
ids as `transformers` greedy generation on the same weights, in float32."""
from __future__ import annotations

import httpx
import torch

PROMPTS = [
    "<|im_start|>user\nWhat is deep learning?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is",
    "def fibonacci(n):",
]
NEW_TOKENS = 32


def server_greedy(url: str, prompt: str) -> tuple[list[int], list[int]]:
    ids = [t["id"] for t in httpx.post(url + "/tokenize", json={"inputs": prompt}, timeout=30).json()]
    body = {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True, "do_sample": False}}
    r = httpx.post(url + "/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return ids, [t["id"] for t in r.json()["details"]["tokens"]]


def reference_greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def check_all(url: str, model) -> None:
    for prompt in PROMPTS:
        ids, ours = server_greedy(url, prompt)
        ref = reference_greedy(model, ids)
        assert ours == ref, f"prompt {prompt!r}: ours {ours} != transformers {ref}"


def test_gguf_greedy_matches_transformers(fp32_server, smollm2_reference):
    check_all(fp32_server, smollm2_reference)


def test_safetensors_greedy_matches_transformers(tiny_fp32_server, tiny_llama):
    from transformers import AutoModelForCausalLM

    url = tiny_fp32_server.url
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    check_all(url, model)
    info = httpx.get(url + "/info").json()
    assert info["model_id"] == str(tiny_llama)
