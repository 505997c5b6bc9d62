"""Prometheus metrics. One registry per app, so several apps (tests) in one process don't collide.

Names follow TGI where TGI has the metric, so its dashboards and alerts work unchanged; prometheus_client
adds `_total` to counters (TGI's `tgi_request_count` is `tgi_request_count_total` here). The rest are
`sluice_*`, with time to first token and inter-token latency as vLLM's benchmark defines them.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# The *_created series only double the output; TGI and vLLM dashboards do not use them.
disable_created_metrics()

# Latency buckets from 5 ms (a fast decode step) to two minutes (a long prefill under load).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

# HTTP status of a refused or failed generation request -> TGI's `err` label.
FAILURE_KINDS = {401: "authentication", 413: "validation", 422: "validation", 429: "overloaded"}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sluice_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.in_flight = Gauge("sluice_requests_in_flight", "Admitted generation requests not finished yet", registry=r)
        self.queue = Gauge("tgi_queue_size", "Admitted generation requests still waiting for their first token",
                           registry=r)
        self.batch_size = Gauge("tgi_batch_current_size", "Sequences in the shards' running batches (last health poll)",
                                registry=r)
        self.ttft = Histogram("sluice_time_to_first_token_seconds", "From the shard call to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("sluice_inter_token_latency_seconds", "Between successive tokens of one request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Histogram("tgi_request_generated_tokens", "Tokens generated per request",
                                          buckets=TOKEN_BUCKETS, registry=r)
        self.input_length = Histogram("tgi_request_input_length", "Prompt tokens per request",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.duration = Histogram("tgi_request_duration", "Generation requests, first to last byte, seconds",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_count = Counter("tgi_request_count", "Generation requests received", registry=r)
        self.request_success = Counter("tgi_request_success", "Generation requests answered", registry=r)
        self.request_failure = Counter("tgi_request_failure", "Generation requests refused or failed", ["err"],
                                       registry=r)
        # Resumable streams (router/streams.py) and failover (router/pool.py).
        self.streams_kept = Gauge("sluice_streams_kept", "Resumable streams in the store, running or replayable",
                                  registry=r)
        self.stream_buffer_bytes = Gauge("sluice_stream_buffer_bytes", "Bytes of events kept for resumable streams",
                                         registry=r)
        self.stream_resumes = Counter("sluice_stream_resumes", "GET /v1/streams/{id} reconnections served", registry=r)
        self.streams_cut = Counter("sluice_streams_cut", "Resumable streams without a reader cut at a buffer cap",
                                   registry=r)
        self.streams_expired = Counter("sluice_streams_expired", "Resumable streams forgotten after --stream-retention",
                                       registry=r)
        self.failovers = Counter("sluice_failovers", "Generations moved to another replica mid-stream", registry=r)

        # Per tenant, labelled by router/tenants.py: the configured tenants' names, else "other" (bounded).
        self.tenant_in_flight = Gauge("sluice_tenant_requests_in_flight", "Admitted generation requests per tenant",
                                      ["tenant"], registry=r)
        self.tenant_tokens = Counter("sluice_tenant_tokens", "Tokens served per tenant: prompt and generated",
                                     ["tenant", "kind"], registry=r)
        self.tenant_overloaded = Counter("sluice_tenant_overloaded", "Generation requests refused with 429 per tenant",
                                         ["tenant"], registry=r)

    def generation_finished(self, status: int) -> None:
        self.request_count.inc()
        if status < 400:
            self.request_success.inc()
        else:
            self.request_failure.labels(FAILURE_KINDS.get(status, "generation")).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
