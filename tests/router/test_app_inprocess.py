"""The router in-process (httpx over ASGI, no ports, no subprocess) against a fake pool that yields scripted
tokens and can be held open: rules of the router alone, in milliseconds."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from router.app import ENDPOINTS, GENERATION_ROUTES, create_app
from router.config import RouterSettings
from router.contract import FinishReason, Reply, ShardInfo, Token
from scripted_pool import Pushed


class FakePool:
    """The ShardPool interface the app uses: info, replicas, health, generate, start, close, abort_all."""

    def __init__(self, eos_id: int) -> None:
        self.info = ShardInfo(model_id="fake", vocab_size=100, eos_token_ids=[eos_id], max_position_embeddings=512)
        self.replicas: list = []
        self.release = asyncio.Event()
        self.started = 0
        self.requests: list = []

    async def health(self) -> list:
        return []

    async def generate(self, request):
        self.started += 1
        self.requests.append(request)
        await self.release.wait()
        yield Reply(tokens=[Token(id=5, logprob=-0.5)], prompt_tokens=3, finish_reason=FinishReason.LENGTH)

    def start(self, request, on_reply, on_end) -> Pushed:
        return Pushed(self.generate(request), on_reply, on_end)

    def abort_all(self, reason: str) -> int:
        return 0

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tiny_eos(tiny_llama) -> int:
    from sluice.modelfiles import load_tokenizer, resolve

    return load_tokenizer(resolve(str(tiny_llama))).eos_token_id


async def _with_client(tiny_llama, eos_id: int, body):
    pool = FakePool(eos_id)
    app = create_app(RouterSettings(model_id=str(tiny_llama), max_concurrent_requests=1), pool=pool)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
            await body(client, pool)


def test_route_table_feeds_the_openapi_document():
    from router.service import openapi_schema

    assert set(openapi_schema()["paths"]) == {e.path for e in ENDPOINTS}
    assert GENERATION_ROUTES == {"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions",
                                 "/v1/responses"}


BODIES = {
    "/": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/generate": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/generate_stream": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    "/v1/responses": {"input": "hi", "max_output_tokens": 1},
}


def test_one_in_flight_then_429_on_every_generation_route(tiny_llama, tiny_eos):
    asyncio.run(_with_client(tiny_llama, tiny_eos, _overload))


async def _overload(client, pool) -> None:
    held = asyncio.create_task(client.post("/generate", json=BODIES["/generate"]))
    while pool.started == 0:
        await asyncio.sleep(0.01)
    for path, body in BODIES.items():
        assert (await client.post(path, json=body)).status_code == 429, path
    pool.release.set()
    assert (await held).status_code == 200
    assert (await client.post("/generate", json=BODIES["/generate"])).status_code == 200


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "The river", "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
])
def test_ignore_eos_on_openai_routes_reaches_the_shard(tiny_llama, tiny_eos, route, body):
    async def check(client, pool):
        pool.release.set()
        plain = await client.post(route, json=body)
        ignoring = await client.post(route, json={**body, "ignore_eos": True})
        assert plain.status_code == ignoring.status_code == 200, (plain.text, ignoring.text)
        assert "x-sluice-ignored-fields" not in ignoring.headers
        first, second = pool.requests
        assert not first.ignore_eos and tiny_eos in first.stop_token_ids
        assert second.ignore_eos and tiny_eos not in second.stop_token_ids

    asyncio.run(_with_client(tiny_llama, tiny_eos, check))
