"""The shard's settings, declared once: each field with `option(...)` is also a `sluice shard` flag (and a
`sluice serve` flag unless `only=SHARD`) and an environment variable (sluice/options.py)."""
from __future__ import annotations

from dataclasses import dataclass

from sluice.options import SHARD, option

DTYPES = ("auto", "bfloat16", "float32", "float16")
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass
class ShardSettings:
    model_id: str | None = option(None, env="MODEL_ID",
                                  help="a folder (config.json + *.safetensors), a .gguf file or a Hub id; "
                                       "default: the embedded SmolLM2-135M-Instruct")
    address: str = option("unix:///tmp/sluice-shard.sock", env="SHARD_ADDRESS", only=SHARD,
                          help="where to serve gRPC: unix:///path.sock or host:port (beyond localhost needs --allow-remote)")
    dtype: str = option("auto", env="DTYPE", choices=DTYPES,
                        help="auto: on CPUs where our kernels build (x86 AVX2 + FMA), float32 compute with the "
                             "weight matrices stored in bfloat16 (packed for vdpbf16ps on AVX512-BF16); else "
                             "bfloat16 on GPUs and CPUs with native bf16, float32 elsewhere (shard/hardware.py); "
                             "float32: float32 weights too (exact)")
    quantize: str | None = option(None, env="QUANTIZE", choices=("int8", "eetq"),
                                  help="int8 weight-only projections and vocabulary (eetq: TGI's name for it), "
                                       "computed in the --dtype: a quarter of float32's bytes per decode step")
    kv_cache_dtype: str = option("auto", env="KV_CACHE_DTYPE", choices=KV_CACHE_DTYPES,
                                 help="auto: float16 under float32 compute where our CPU attention kernel builds "
                                      "(half the bytes decode attention reads, as llama.cpp's default cache), "
                                      "else the compute dtype (shard/hardware.py)")
    num_shard: int = option(1, env="NUM_SHARD", type=int,
                            help="tensor-parallel processes holding one copy of the model between them")
    device: str = option("auto", env="DEVICE", help="cpu, cuda or auto (cuda when there is one)")
    max_batch_total_tokens: int = option(32768, env="MAX_BATCH_TOTAL_TOKENS", type=int,
                                         help="KV cache capacity in tokens, shared by all running sequences")
    max_batch_prefill_tokens: int = option(512, env="MAX_BATCH_PREFILL_TOKENS", type=int,
                                           help="tokens computed per engine step; longer prompts are split across steps")
    max_batch_size: int = option(64, env="MAX_BATCH_SIZE", type=int, help="running sequences per step")
    num_threads: int | None = option(None, type=int,
                                     help="torch CPU threads per rank (default: OMP_NUM_THREADS, else the CPUs this "
                                          "process may use, its affinity capped by its cgroup's CPU quota, split "
                                          "among the ranks)")
    compile: bool | None = option(None, env="COMPILE", action="optional_bool",
                                  help="torch.compile decode steps (num-shard 1, CPU). Unset: compiled in the "
                                       "background while the shard already serves eagerly; --compile: before it "
                                       "reports healthy; --no-compile: eager only")
    shutdown_timeout_s: float = option(30.0, flag="--shutdown-timeout", env="SHUTDOWN_TIMEOUT", type=float,
                                       help="seconds requests in flight may take to finish after SIGTERM")
    allow_remote: bool = option(False, action="store_true", only=SHARD,
                                help="allow an --address that other hosts can reach")
    tls_cert: str | None = option(None, env="SHARD_TLS_CERT", only=SHARD, help="PEM certificate: serve gRPC over TLS")
    tls_key: str | None = option(None, env="SHARD_TLS_KEY", only=SHARD, help="PEM private key for --tls-cert")
    block_size: int = 16  # KV block size in tokens
    backend: str | None = None  # torch.distributed backend; default gloo on CPU, nccl on CUDA
