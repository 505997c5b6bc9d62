"""Prometheus metrics. One registry per app, so several apps (tests) in one process don't collide."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# The *_created series only double the output; TGI and vLLM dashboards do not use them.
disable_created_metrics()

# Latency buckets from 5 ms (a fast decode step) to two minutes (a long prefill under load).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sluice_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.in_flight = Gauge("sluice_requests_in_flight", "Admitted generation requests not finished yet", registry=r)
        self.queue = Gauge("sluice_queue_size", "Admitted generation requests still waiting for their first token",
                           registry=r)
        self.ttft = Histogram("sluice_time_to_first_token_seconds", "From the shard call to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("sluice_inter_token_latency_seconds", "Between successive tokens of one request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Histogram("sluice_generated_tokens", "Tokens generated per request",
                                          buckets=TOKEN_BUCKETS, registry=r)
        self.duration = Histogram("sluice_request_duration_seconds", "Generation requests, first to last byte",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
