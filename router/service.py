"""Service routes: health, info, metrics, tokenize, models, the OpenAPI document and its page."""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

import sluice

from . import schemas
from .body import parse
from .openapi import openapi_schema
from .state import router_of


async def models(request: Request) -> Response:
    router = router_of(request)
    return JSONResponse({"object": "list", "data": [
        {"id": router.model_id, "object": "model", "created": 0, "owned_by": "sluice"}]})


async def health(request: Request) -> Response:
    replies = await router_of(request).pool.health()
    shards = [{"address": replica.address, "ok": bool(r and r.ok), "running": r.running if r else None,
               "waiting": r.waiting if r else None} for replica, r in zip(router_of(request).pool.replicas, replies)]
    if not any(s["ok"] for s in shards):
        return JSONResponse({"error": "no shard answered its health check", "error_type": "unhealthy",
                             "shards": shards}, status_code=503)
    return JSONResponse({"status": "ok", "shards": shards})


async def info(request: Request) -> Response:
    router = router_of(request)
    s, shard = router.settings, router.pool.info
    return JSONResponse({
        "model_id": router.model_id,
        "model_sha": None,
        "model_dtype": shard.dtype,
        "model_device_type": shard.device,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": s.max_concurrent_requests,
        "max_best_of": s.max_best_of,
        "max_stop_sequences": s.max_stop_sequences,
        "max_input_tokens": s.max_input_tokens,
        "max_total_tokens": s.max_total_tokens,
        "max_top_n_tokens": s.max_top_n_tokens,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "num_shard": sum(r.info.num_shard or 1 for r in router.pool.replicas if r.info),
        "num_replicas": len(router.pool.replicas),
        "router": "sluice",
        "version": sluice.__version__,
        "sha": None,
        "docker_label": None,
    })


async def tokenize(request: Request) -> Response:
    router = router_of(request)
    body = await parse(request, schemas.TokenizeRequest)
    enc = router.tokenizer(body.inputs, add_special_tokens=True, return_offsets_mapping=True)
    return JSONResponse([
        {"id": i, "text": body.inputs[a:b], "start": a, "stop": b}
        for i, (a, b) in zip(enc.input_ids, enc.offset_mapping)
    ])


async def metrics(request: Request) -> Response:
    router = router_of(request)
    router.metrics.batch_size.set(sum(r.running for r in router.pool.replicas if r.healthy))
    return Response(router.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_schema())


async def docs(request: Request) -> Response:
    return HTMLResponse('<!doctype html><title>Sluice API</title><p>The OpenAPI description is at '
                        '<a href="/openapi.json">/openapi.json</a>.</p>')
