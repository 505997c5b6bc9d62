"""Unknown body fields are ignored and named in `x-sluice-ignored-fields`, whatever their names hold."""
import pytest

USER = [{"role": "user", "content": "Name a fruit."}]


def test_unknown_fields_are_named(smol):
    body = {"model": "x", "messages": USER, "max_tokens": 1, "store": False, "metadata": {"a": "b"}}
    r = smol.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["x-sluice-ignored-fields"] == "metadata,store"
    r = smol.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1, "foo": 1}})
    assert r.status_code == 200 and r.headers["x-sluice-ignored-fields"] == "parameters.foo"


@pytest.mark.parametrize("name,encoded", [
    ("a\x00b", "a%00b"), ("line\r\nSet-Cookie: x=1", "line%0D%0ASet-Cookie%3A%20x%3D1"), ("a,b", "a%2Cb"),
    ("température", "temp%C3%A9rature"), ("\x7f", "%7F"),
])
def test_any_field_name_comes_back_percent_encoded(smol, name, encoded):
    """A header can't carry control characters (the server would drop the connection) and a comma would
    split the list: each name is percent-encoded, so the client decodes exactly the name it sent."""
    r = smol.post("/generate", json={"inputs": "Hi", name: 1, "parameters": {"max_new_tokens": 1, name: 2}})
    assert r.status_code == 200, r.text
    assert r.headers["x-sluice-ignored-fields"] == f"{encoded},parameters.{encoded}"


def test_huge_and_many_field_names_are_cut_short(smol):
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 1}, "x" * 100_000: 1,
            **{f"f{i:04}": i for i in range(2000)}}
    r = smol.post("/generate", json=body)
    assert r.status_code == 200, r.text
    header = r.headers["x-sluice-ignored-fields"]
    assert len(header) <= 1024 and header.endswith(",...")
    assert header.startswith("f0000,f0001,")  # sorted: the digits come before the long name
