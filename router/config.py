"""The router's settings, declared once: each field with `option(...)` is also a `sluice router` flag (and a
`sluice serve` flag unless `only=ROUTER`) and an environment variable (sluice/options.py)."""
from __future__ import annotations

from dataclasses import dataclass

from sluice.options import ROUTER, option


@dataclass
class RouterSettings:
    model_id: str | None = option(None, env="MODEL_ID",
                                  help="a folder (config.json + *.safetensors), a .gguf file or a Hub id; "
                                       "default: the embedded SmolLM2-135M-Instruct")
    hostname: str = option("0.0.0.0", env="HOSTNAME_BIND", help="router HTTP address")
    port: int = option(8080, env="PORT", type=int, help="router HTTP port")
    max_concurrent_requests: int = option(128, env="MAX_CONCURRENT_REQUESTS", type=int,
                                          help="requests in flight, streams until their last byte; beyond it: 429")
    max_input_tokens: int = option(1024, env="MAX_INPUT_TOKENS", type=int, help="prompt tokens per request")
    max_total_tokens: int = option(2048, env="MAX_TOTAL_TOKENS", type=int,
                                   help="prompt + generated tokens per request")
    max_best_of: int = option(4, env="MAX_BEST_OF", type=int, help="TGI best_of / completions best_of candidates")
    max_stop_sequences: int = option(4, env="MAX_STOP_SEQUENCES", type=int, help="stop sequences per request")
    max_top_n_tokens: int = option(5, env="MAX_TOP_N_TOKENS", type=int, help="alternatives with logprobs per token")
    api_key: str | None = option(None, env="SLUICE_API_KEY",
                                 help="require `Authorization: Bearer KEY` on every route but /health and /metrics")
    api_keys_file: str | None = option(None, env="SLUICE_API_KEYS_FILE",
                                       help="one `KEY TENANT [max_concurrent=N] [tokens_per_minute=N] [weight=W]` "
                                            "per line: every key is accepted, each for its tenant; reread on SIGHUP")
    max_body_bytes: int = option(4 * 1024 * 1024, env="MAX_BODY_BYTES", type=int,
                                 help="larger request bodies get 413 without being read")
    shutdown_timeout_s: float = option(30.0, flag="--shutdown-timeout", env="SHUTDOWN_TIMEOUT", type=float,
                                       help="seconds requests in flight may take to finish after SIGTERM")
    responses_store_max: int = option(1000, env="RESPONSES_STORE_MAX", type=int,
                                      help="stored /v1/responses kept per API key, least recently used evicted "
                                           "first; 0 keeps none")
    responses_store_bytes: int = option(64 * 1024 * 1024, env="RESPONSES_STORE_BYTES", type=int,
                                        help="bytes of stored /v1/responses (JSON) kept per API key")
    shard_addresses: list[str] = option(flag="--shard-address", action="append", only=ROUTER,
                                        default_factory=lambda: ["unix:///tmp/sluice-shard.sock"],
                                        help="shard gRPC address: unix:///path.sock, host:port or dns:///name:port "
                                             "(every address the name resolves to); repeat for replicas")
    shard_tls_ca: str | None = option(None, env="SHARD_TLS_CA", only=ROUTER,
                                      help="PEM CA certificate: connect to host:port shards over TLS, trusting it")
    stream_retention_s: float = option(60.0, flag="--stream-retention", env="STREAM_RETENTION", type=float,
                                       help="seconds a resumable stream outlives its client's disconnect "
                                            "(generating, then replayable) before it is cancelled and forgotten")
    stream_buffer_bytes: int = option(1 << 20, env="STREAM_BUFFER_BYTES", type=int,
                                      help="bytes of events one resumable stream keeps for replay")
    stream_buffer_total_bytes: int = option(256 << 20, env="STREAM_BUFFER_TOTAL_BYTES", type=int,
                                            help="bytes of events all resumable streams keep together")
    sse_keepalive_s: float = option(15.0, flag="--sse-keepalive", env="SSE_KEEPALIVE", type=float,
                                    help="seconds of silence after which a stream gets a `: keep-alive` "
                                         "comment; 0: never")
    max_failovers: int = option(2, env="MAX_FAILOVERS", type=int,
                                help="times one generation may move to another replica when its replica "
                                     "dies or drains mid-stream")
    shard_connect_timeout_s: float = 120.0  # how long start-up waits for every shard's Info
