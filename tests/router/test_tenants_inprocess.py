"""Tenants in the router, in-process against a fake pool: per-tenant limits (429 with Retry-After, before
any stream starts), per-tenant metrics with a bounded label set, the tenant and priority in the shard
request, the demo page's route."""
from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from api_errors import error_of
from router.app import create_app
from router.config import RouterSettings
from test_app_inprocess import BODIES, FakePool

KEYS = "k-alice alice max_concurrent=1\nk-bob bob tokens_per_minute=3\n"


async def _with_app(tiny_llama, body, **settings):
    pool = FakePool(0)
    app = create_app(RouterSettings(model_id=str(tiny_llama), **settings), pool=pool)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
            await body(client, pool)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def metric(text: str, name: str, **labels) -> float:
    """A sample's value from the exposition format (labels in any order), 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_a_tenant_over_its_concurrency_is_refused_and_others_are_not(tiny_llama, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(KEYS)

    async def check(client, pool):
        held = asyncio.create_task(client.post("/generate", json=BODIES["/generate"], headers=auth("k-alice")))
        while pool.started == 0:
            await asyncio.sleep(0.01)
        for path, body in BODIES.items():
            refused = await client.post(path, json=body, headers=auth("k-alice"))
            assert refused.status_code == 429, path
            error = error_of(refused)  # each route's dialect, error_type in both
            assert error["error_type"] == "overloaded" and "tenant alice" in error["message"]
            assert refused.headers["retry-after"] == "1"
        page = (await client.get("/metrics")).text
        assert metric(page, "sluice_tenant_requests_in_flight", tenant="alice") == 1
        assert metric(page, "sluice_tenant_overloaded_total", tenant="alice") == len(BODIES)
        assert (await client.post("/generate", json=BODIES["/generate"], headers=auth("nope"))).status_code == 401
        pool.release.set()
        assert (await client.post("/generate", json=BODIES["/generate"], headers=auth("k-bob"))).status_code == 200
        assert (await held).status_code == 200
        assert [r.tenant for r in pool.requests] == ["alice", "bob"]

    asyncio.run(_with_app(tiny_llama, check, api_keys_file=str(keys)))


def test_tokens_per_minute_refuses_until_the_window_frees_them(tiny_llama, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(KEYS)

    async def check(client, pool):
        pool.release.set()
        # The fake shard serves 3 prompt tokens and 1 generated: bob's 3 a minute are spent at once.
        assert (await client.post("/generate", json=BODIES["/generate"], headers=auth("k-bob"))).status_code == 200
        refused = await client.post("/v1/completions", json=BODIES["/v1/completions"], headers=auth("k-bob"))
        assert refused.status_code == 429 and "tokens in the last minute" in error_of(refused)["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        page = (await client.get("/metrics")).text
        assert metric(page, "sluice_tenant_tokens_total", tenant="bob", kind="prompt") == 3
        assert metric(page, "sluice_tenant_tokens_total", tenant="bob", kind="generated") == 1
        # Someone else's budget is their own.
        assert (await client.post("/generate", json=BODIES["/generate"], headers=auth("k-alice"))).status_code == 200

    asyncio.run(_with_app(tiny_llama, check, api_keys_file=str(keys)))


def test_header_tenants_and_priority_reach_the_shard_with_bounded_labels(tiny_llama):
    async def check(client, pool):
        pool.release.set()
        for name in ("team-a", "team-b"):
            ok = await client.post("/generate", json={**BODIES["/generate"], "priority": -2}, headers={"X-Tenant": name})
            assert ok.status_code == 200, ok.text
        ok = await client.post("/v1/chat/completions", json={**BODIES["/v1/chat/completions"], "priority": 3})
        assert ok.status_code == 200, ok.text
        assert [(r.tenant, r.priority) for r in pool.requests] == [("team-a", -2), ("team-b", -2), ("anonymous", 3)]
        bad = await client.post("/generate", json=BODIES["/generate"], headers={"X-Tenant": "a b"})
        assert bad.status_code == 422 and bad.json()["error_type"] == "validation"
        page = (await client.get("/metrics")).text
        assert metric(page, "sluice_tenant_tokens_total", tenant="other", kind="generated") == 2
        assert 'tenant="team-a"' not in page

    asyncio.run(_with_app(tiny_llama, check))


def test_the_page_is_for_browsers_and_needs_no_key(tiny_llama):
    async def check(client, pool):
        page = await client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "Generate" in page.text and "<script" in page.text and "http" not in page.text.split("<body>")[1]
        assert (await client.post("/", json=BODIES["/"])).status_code == 401  # TGI's POST / still needs the key

    asyncio.run(_with_app(tiny_llama, check, api_key="secret"))
