"""The shard's settings, declared once: each field with `option(...)` is also a `sluice shard` flag (and a
`sluice serve` flag unless `only=SHARD`) and an environment variable (sluice/options.py)."""
from __future__ import annotations

from dataclasses import dataclass

from sluice.options import SHARD, option

DTYPES = ("bfloat16", "float32", "float16")


@dataclass
class ShardSettings:
    model_id: str | None = option(None, env="MODEL_ID",
                                  help="a folder (config.json + *.safetensors), a .gguf file or a Hub id; "
                                       "default: the embedded SmolLM2-135M-Instruct")
    address: str = option("unix:///tmp/sluice-shard.sock", env="SHARD_ADDRESS", only=SHARD,
                          help="where to serve gRPC: unix:///path.sock or host:port (beyond localhost needs --allow-remote)")
    dtype: str = option("bfloat16", env="DTYPE", choices=DTYPES)
    num_shard: int = option(1, env="NUM_SHARD", type=int,
                            help="tensor-parallel processes holding one copy of the model between them")
    device: str = option("auto", env="DEVICE", help="cpu, cuda or auto (cuda when there is one)")
    max_batch_total_tokens: int = option(32768, env="MAX_BATCH_TOTAL_TOKENS", type=int,
                                         help="KV cache capacity in tokens, shared by all running sequences")
    max_batch_prefill_tokens: int = option(512, env="MAX_BATCH_PREFILL_TOKENS", type=int,
                                           help="tokens computed per engine step; longer prompts are split across steps")
    max_batch_size: int = option(64, env="MAX_BATCH_SIZE", type=int, help="running sequences per step")
    num_threads: int | None = option(None, type=int, help="torch CPU threads (default: all cores)")
    compile: bool = option(False, env="COMPILE", action="store_true",
                           help="torch.compile decode steps (num-shard 1 only): ~1.6x decode tokens/s on CPU; the "
                                "shard compiles before it reports healthy (about 2 minutes on 2 cores)")
    shutdown_timeout_s: float = option(30.0, flag="--shutdown-timeout", env="SHUTDOWN_TIMEOUT", type=float,
                                       help="seconds requests in flight may take to finish after SIGTERM")
    allow_remote: bool = option(False, action="store_true", only=SHARD,
                                help="allow an --address that other hosts can reach")
    tls_cert: str | None = option(None, env="SHARD_TLS_CERT", only=SHARD, help="PEM certificate: serve gRPC over TLS")
    tls_key: str | None = option(None, env="SHARD_TLS_KEY", only=SHARD, help="PEM private key for --tls-cert")
    block_size: int = 16  # KV block size in tokens
    backend: str | None = None  # torch.distributed backend; default gloo on CPU, nccl on CUDA
