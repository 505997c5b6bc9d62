"""Bad input raised as clear errors by the real clients (the rules themselves: tests/router/test_validation.py
and test_errors.py)."""
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
    assert info.value.response.status_code == 400
    # OpenAI's error shape on /v1: the SDK raises BadRequestError, with the message, field and type parsed.
    oai = openai.OpenAI(base_url=server + "/v1", api_key="-", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="suffix") as error:
        oai.completions.create(model="tgi", prompt="Hi", suffix="!")
    assert error.value.status_code == 400 and error.value.param == "suffix"
    assert error.value.type == "invalid_request_error" and error.value.body["message"].startswith("suffix: ")
    with pytest.raises(openai.BadRequestError, match="stream_options") as error:
        oai.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "Hi"}],
                                    stream_options={"include_usage": True})
    assert error.value.param == "stream_options"
    with pytest.raises(openai.BadRequestError, match="49999999") as error:
        oai.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "Hi"}],
                                    logit_bias={"49999999": 5, "50000001": -5, "7": 1})
    assert "50000001" in str(error.value) and error.value.param == "logit_bias"
    # Unknown routes: JSON, as the SDK's NotFoundError parses it.
    with pytest.raises(openai.NotFoundError, match="no route"):
        oai.embeddings.create(model="tgi", input="Hi")
