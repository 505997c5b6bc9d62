"""The JavaScript client of the streaming guide (@huggingface/inference, pinned in tests/js)."""
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def node_modules():
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the JavaScript client test")
    if not (JS / "node_modules" / "@huggingface" / "inference").is_dir():
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
