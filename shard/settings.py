"""The shard's settings: one dataclass, filled by the CLI (`sluice shard`) or by tests."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ShardSettings:
    model_id: str | None = None
    address: str = "unix:///tmp/sluice-shard.sock"
    dtype: str = "bfloat16"
    max_batch_total_tokens: int = 32768
    block_size: int = 16
    max_batch_size: int = 64
    max_batch_prefill_tokens: int = 512
    num_threads: int | None = None
    num_shard: int = 1
    device: str = "auto"  # cpu, cuda, or auto (cuda when there is one)
    backend: str | None = None  # torch.distributed backend; default gloo on CPU, nccl on CUDA
    allow_remote: bool = False  # serve gRPC on an address other hosts can reach
    tls_cert: str | None = None  # PEM files: serve gRPC over TLS
    tls_key: str | None = None
    shutdown_timeout_s: float = 30.0  # on SIGTERM, how long requests in flight may take to finish
    compile: bool = False  # torch.compile decode-only steps (num_shard 1 only)
