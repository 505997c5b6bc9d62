"""Deadlines in the router, in-process against a fake pool whose queue and measured rates are injected:
refused at once when the queue cannot meet them (429 before any stream), ended with an
`incomplete_generation` error when they pass while the shard is still working."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx

from api_errors import error_of
from router.app import create_app
from router.config import RouterSettings
from router.deadline import Waiting
from test_app_inprocess import BODIES, FakePool

CHAT = BODIES["/v1/chat/completions"]


def measured_replica(waiting: list[Waiting]) -> SimpleNamespace:
    # 10 prompt tokens a second and 0.1 s a decode step, as a shard's health answer would report them.
    return SimpleNamespace(address="fake", healthy=True, running=0, info=None, prefill_tokens_per_s=10.0,
                           decode_step_s=0.1, waiting=waiting)


async def _with_app(tiny_llama, body):
    pool = FakePool(0)
    app = create_app(RouterSettings(model_id=str(tiny_llama)), pool=pool)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
            await body(client, pool)


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once(tiny_llama):
    async def check(client, pool):
        pool.release.set()
        # Tenant x already has 100 prompt tokens waiting: 10 s of prefill before any of x's next requests.
        pool.replicas = [measured_replica([Waiting(0, "x", 100)])]
        refused = await client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                    headers={"X-Tenant": "x", "X-Request-Deadline": "5"})
        assert refused.status_code == 429, refused.text
        error = error_of(refused)  # OpenAI's shape on /v1, error_type beside it
        assert error["error_type"] == "overloaded" and error["type"] == "rate_limit_error"
        assert "cannot meet" in error["message"]
        refused = await client.post("/generate", json={**BODIES["/generate"], "deadline": 5}, headers={"X-Tenant": "x"})
        assert refused.status_code == 429 and "deadline" in refused.json()["error"]
        assert pool.started == 0, "refused before the shard was asked"
        # Further off, more urgent than the queue, or another tenant (who may go first): admitted.
        for extra, headers in [({"deadline": 60}, {"X-Tenant": "x"}), ({"deadline": 5, "priority": -1}, {"X-Tenant": "x"}),
                               ({"deadline": 5}, {"X-Tenant": "y"})]:
            ok = await client.post("/generate", json={**BODIES["/generate"], **extra}, headers=headers)
            assert ok.status_code == 200, (extra, headers, ok.text)
        bad = await client.post("/generate", json=BODIES["/generate"], headers={"X-Request-Deadline": "soon"})
        assert bad.status_code == 422

    asyncio.run(_with_app(tiny_llama, check))


def test_a_deadline_that_passes_mid_generation_ends_it_with_an_error(tiny_llama):
    async def check(client, pool):
        # The fake shard never answers: the deadline passes while the request is in the engine.
        streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True, "deadline": 0.2})
        assert streamed.status_code == 200
        events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
        assert events[-1]["error_type"] == "incomplete_generation" and "deadline" in events[-1]["error"]
        assert streamed.text.rstrip().endswith("data: [DONE]")
        whole = await client.post("/generate", json=BODIES["/generate"], headers={"X-Request-Deadline": "0.2"})
        assert whole.status_code == 500 and whole.json()["error_type"] == "incomplete_generation"

    asyncio.run(_with_app(tiny_llama, check))
