"""The JavaScript clients (pinned in tests/e2e/js): the streaming guide's @huggingface/inference, and the
openai package's Responses stream helper."""
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def node_modules():
    assert shutil.which("node") and shutil.which("npm"), "node and npm are needed for the JavaScript client test"
    if not all((JS / "node_modules" / pkg).is_dir() for pkg in ("@huggingface/inference", "hf-inference-v2", "openai")):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=300)


def test_text_generation_stream(server, node_modules):
    prompt, n = "Deep learning is", 12
    greedy = httpx.post(server + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": n}},
                        timeout=60).json()["generated_text"]
    out = subprocess.run(["node", "stream.mjs", server, prompt, str(n)], cwd=JS, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    via_function, via_client = out.stdout.split("\n---\n")
    assert via_function == greedy
    assert via_client == greedy


def test_streaming_guide_example_verbatim(server, node_modules):
    """The guide's own code (HfInferenceEndpoint, default parameters) on the 2.x client it was written for."""
    prompt = "What can you do in Nuremberg, Germany? Give me 3 Tips"
    greedy = httpx.post(server + "/generate", json={"inputs": prompt}, timeout=300).json()["generated_text"]
    out = subprocess.run(["node", "guide.mjs", server], cwd=JS, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == greedy
    assert len(out.stdout) > 0


def test_openai_responses_stream_helper(server, node_modules):
    # A bounded JSON answer: the grammar completes it, so the stream ends with response.completed.
    schema = {"type": "object", "properties": {"fruit": {"enum": ["apple", "banana", "cherry"]},
                                               "ripe": {"type": "boolean"}},
              "required": ["fruit", "ripe"], "additionalProperties": False}
    body = {"model": "tgi", "input": "Name a fruit.", "max_output_tokens": 40, "temperature": 0,
            "text": {"format": {"type": "json_schema", "name": "fruit", "strict": True, "schema": schema}}}
    whole = httpx.post(server + "/v1/responses", json=body, timeout=120).json()
    out = subprocess.run(["node", "responses.mjs", server, json.dumps(body)], cwd=JS, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    streamed = json.loads(out.stdout)
    assert streamed["types"][:2] == ["response.created", "response.in_progress"]
    assert streamed["types"][-1] == "response.completed" and streamed["status"] == whole["status"] == "completed"
    assert "".join(streamed["deltas"]) == streamed["text"] == whole["output"][0]["content"][0]["text"]
    assert json.loads(streamed["text"])["fruit"] in ("apple", "banana", "cherry")
