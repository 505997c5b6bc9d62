"""Router settings: one dataclass, filled by the CLI (`sluice router` / `sluice serve`) or by tests."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RouterSettings:
    hostname: str = "0.0.0.0"
    port: int = 8080
    model_id: str | None = None  # None: the embedded SmolLM2 (must match what the shards loaded)
    shard_addresses: list[str] = field(default_factory=lambda: ["unix:///tmp/sluice-shard-0.sock"])
    max_concurrent_requests: int = 128
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    max_body_bytes: int = 4 * 1024 * 1024
    api_key: str | None = None  # when set, every route but /health and /metrics needs `Authorization: Bearer <key>`
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_best_of: int = 4  # candidates per TGI best_of / OpenAI completions best_of
    shard_connect_timeout_s: float = 120.0
    shutdown_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    shard_tls_ca: str | None = None  # PEM file: talk TLS to TCP shards, trusting this CA
