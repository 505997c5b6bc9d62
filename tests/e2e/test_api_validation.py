"""Bad input raised as clear errors by the real clients (the rules themselves: tests/router/test_validation.py)."""
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError, ValidationError


def test_clients_raise_clear_errors(server):
    client = InferenceClient(base_url=server)
    with pytest.raises(ValidationError, match="temperature"):
        client.text_generation("Hi", max_new_tokens=5, temperature=-1.0, stream=True)
    with pytest.raises(HfHubHTTPError, match="unknown role") as info:
        client.chat.completions.create(messages=[{"role": "wizard", "content": "Hi"}], stream=True)
    assert info.value.response.status_code == 422
    oai = openai.OpenAI(base_url=server + "/v1", api_key="-", max_retries=0)
    # TGI's flat error shape on every route (as TGI itself answers on /v1): the SDK puts the message in
    # `.body` rather than in str(error).
    with pytest.raises(openai.UnprocessableEntityError) as error:
        oai.completions.create(model="tgi", prompt="Hi", suffix="!")
    assert "suffix" in error.value.body
