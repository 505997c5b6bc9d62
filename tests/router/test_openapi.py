"""/openapi.json is a valid OpenAPI 3.1 document: every route, every `$ref` resolvable, and the answers
the router gives match the schemas it declares for them."""
import json

import jsonschema
import pytest
from openapi_spec_validator import validate


@pytest.fixture(scope="module")
def doc(smol) -> dict:
    r = smol.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def inline(doc: dict, schema):
    """`schema` with every `$ref` replaced by what it points at (the body schemas are not recursive)."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            node = doc
            for part in schema["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            return inline(doc, node)
        return {k: inline(doc, v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [inline(doc, v) for v in schema]
    return schema


def test_openapi_covers_routes_and_schemas(smol, doc):
    routes = {"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/v1/models",
              "/health", "/info", "/metrics", "/tokenize", "/openapi.json", "/docs"}
    assert routes <= set(doc["paths"])
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    text = json.dumps(inline(doc, chat))
    for field in ("n", "logit_bias", "response_format", "tools", "tool_choice", "top_logprobs", "stream_options"):
        assert f'"{field}"' in text, field
    tgi = json.dumps(inline(doc, doc["paths"]["/generate"]["post"]["requestBody"]))
    assert all(f'"{f}"' in tgi for f in ("grammar", "best_of", "typical_p", "decoder_input_details"))
    assert smol.get("/info").json()["max_best_of"] == 4


def test_the_document_is_valid_openapi_3_1(doc):
    validate(doc)  # openapi-spec-validator: the 3.1 meta-schema, and every $ref resolved
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert refs and all(r.startswith("#/components/schemas/") for r in refs), refs
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(doc["components"]["schemas"])


def test_content_types_per_route(doc):
    ok = {path: set(ops[next(iter(ops))]["responses"]["200"]["content"]) for path, ops in doc["paths"].items()}
    assert ok["/metrics"] == {"text/plain"}
    assert ok["/generate_stream"] == {"text/event-stream"}
    assert ok["/v1/chat/completions"] == ok["/v1/completions"] == ok["/"] == {"application/json", "text/event-stream"}
    assert ok["/docs"] == {"text/html"} and ok["/generate"] == {"application/json"}
    generate = doc["paths"]["/generate"]["post"]["responses"]
    assert {"200", "413", "422", "429"} <= set(generate)


ANSWERS = [  # (method, path, body, status): one of each answer the document describes
    ("POST", "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "details": True}}, 200),
    ("POST", "/", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, 200),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                      "logprobs": True}, 200),
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "logprobs": 1}, 200),
    ("POST", "/tokenize", {"inputs": "Hi there"}, 200),
    ("GET", "/v1/models", None, 200),
    ("GET", "/health", None, 200),
    ("GET", "/info", None, 200),
    ("GET", "/openapi.json", None, 200),
    ("POST", "/generate", {"inputs": ""}, 422),
    ("POST", "/v1/completions", {"prompt": [[42, 43], [44]], "max_tokens": 2, "n": 2}, 200),
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400),  # OpenAI's error shape on /v1
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream_options": {}}, 400),
]


@pytest.mark.parametrize("method,path,body,status", ANSWERS, ids=[f"{m} {p} {s}" for m, p, _, s in ANSWERS])
def test_answers_match_the_declared_schemas(smol, doc, method, path, body, status):
    r = smol.request(method, path, json=body)
    assert r.status_code == status, r.text
    declared = doc["paths"][path][method.lower()]["responses"][str(status)]
    assert r.headers["content-type"].split(";")[0] in declared["content"]
    jsonschema.Draft202012Validator(inline(doc, declared["content"]["application/json"]["schema"])).validate(r.json())
    assert all(r.headers.get(h) for h, spec in declared["headers"].items() if spec.get("required"))
