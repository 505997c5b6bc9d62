"""Bad input is refused before any byte of a stream, and the server goes on: TGI's 422 on TGI's routes, OpenAI's
400 on /v1 (both with `error_type: validation`; router/errors.py, read by tests/api_errors.py). In-process: the
router on the embedded SmolLM2 over real gRPC."""
import pytest

from api_errors import refusal

USER = [{"role": "user", "content": "Hi"}]
LONG = "word " * 1500  # over the default max_input_tokens (1024)

CASES = [
    # (route, body, a word the message must contain)
    ("/generate", {"inputs": ""}, "inputs"),
    ("/generate", {"parameters": {"max_new_tokens": 5}}, "inputs"),
    ("/generate", {"inputs": 5}, "inputs"),
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": -3}}, "max_new_tokens"),
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 100000}}, "max_total_tokens"),
    ("/generate", {"inputs": LONG, "parameters": {"max_new_tokens": 5}}, "max_input_tokens"),
    ("/generate", {"inputs": "Hi", "parameters": {"temperature": -0.5}}, "temperature"),
    ("/generate", {"inputs": "Hi", "parameters": {"top_p": 0}}, "top_p"),
    ("/generate", {"inputs": "Hi", "parameters": {"top_p": 1.5}}, "top_p"),
    ("/generate", {"inputs": "Hi", "parameters": {"top_k": -1}}, "top_k"),
    ("/generate", {"inputs": "Hi", "parameters": {"repetition_penalty": 0}}, "repetition_penalty"),
    ("/generate", {"inputs": "Hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "stop"),
    ("/generate", {"inputs": "Hi", "parameters": {"best_of": 2}}, "best_of"),
    ("/generate", {"inputs": "Hi", "parameters": {"top_n_tokens": 50}}, "top tokens"),
    ("/generate_stream", {"inputs": ""}, "inputs"),
    ("/generate_stream", {"inputs": "Hi", "parameters": {"temperature": -1}}, "temperature"),
    ("/", {"inputs": "", "stream": True}, "inputs"),
    ("/v1/chat/completions", {"model": "tgi"}, "messages"),
    ("/v1/chat/completions", {"messages": "Hi"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "Hi"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, "role"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 100000}, "max_total_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "max_input_tokens"),
    ("/v1/chat/completions", {"messages": USER, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "top_p": 2}, "top_p"),
    ("/v1/chat/completions", {"messages": USER, "n": 17}, "n"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "yaml"}}, "response_format.type"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "sometimes", "tools": []}, "tool_choice"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "web_search", "function": {"name": "f"}}]},
     "web_search"),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": {"type": "function", "function": {"name": "g"}},
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ("/v1/completions", {"prompt": "Hi", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "Hi", "n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "Hi", "best_of": 9}, "best_of"),
    ("/v1/completions", {"prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": USER, "stream": False, "stream_options": {}}, "stream_options"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("/v1/completions", {"prompt": ["Hi", ""]}, "prompt.1"),
    ("/v1/completions", {"prompt": ["Hi", 5]}, "prompt"),
    ("/v1/completions", {"prompt": ["Hi"] * 17, "n": 4}, "at most 64 generations"),
    ("/generate", {"inputs": "Hi", "parameters": {"watermark": True}}, "watermark"),
    ("/generate", {"inputs": "Hi", "parameters": {"adapter_id": "lora-1"}}, "adapter_id"),
    ("/generate", {"inputs": "Hi", "parameters": {"typical_p": 1.5}}, "typical_p"),
    ("/generate", {"inputs": "Hi", "parameters": {"best_of": 9, "do_sample": True}}, "best_of"),
    ("/generate", {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "(("}}}, "grammar"),
    ("/generate", {"inputs": "Hi", "parameters": {"grammar": {"type": "xml", "value": "a"}}}, "grammar.type"),
    ("/generate_stream", {"inputs": "Hi", "parameters": {"best_of": 2, "do_sample": True}}, "best_of"),
    ("/generate_stream", {"inputs": "Hi", "parameters": {"decoder_input_details": True}}, "decoder_input_details"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {"messages": USER, "stream": True, "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "stream": True, "temperature": -2}, "temperature"),
    ("/tokenize", {"inputs": 3}, "inputs"),
]


@pytest.mark.parametrize("route,body,word", CASES, ids=[f"{r}:{w}:{i}" for i, (r, _, w) in enumerate(CASES)])
def test_bad_body(smol, route, body, word):
    message = refusal(smol.post(route, json=body))
    assert word in message, message


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions"])
def test_malformed_json_and_wrong_content_type(smol, route):
    broken = smol.post(route, content=b'{"inputs": "Hi",', headers={"Content-Type": "application/json"})
    assert "JSON" in refusal(broken)
    assert "Content-Type" in refusal(smol.post(route, data={"inputs": "Hi"}))
    assert "object" in refusal(smol.post(route, json=["Hi"]))


def test_server_serves_after_bad_input(smol):
    for route, body, _ in CASES[:5]:
        smol.post(route, json=body)
    r = smol.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and r.json()["generated_text"]
