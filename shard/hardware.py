"""Defaults chosen per machine: the compute dtype, the dtype the weight matrices are stored in, the KV
cache's dtype, and whether decode steps are compiled.

The rule, from bench/RESULTS.md (SmolLM2-135M, 2-core AMD EPYC hosts, same load generator):
  * On a CPU where our kernels build (x86 with AVX2 + FMA + F16C and a C++ compiler,
    shard/models/cpu_kernels.py), compute in float32 with the weight matrices stored in bfloat16: half
    the bytes a decode step reads, multiplied by our kernel. On AVX512-BF16 CPUs the weights are packed
    for vdpbf16ps (the rows rounded to bfloat16, summed in float32). Compiled engine steps, Zen 5 host
    with AVX512-BF16, against bfloat16 compute through oneDNN (the default there before): batch 1 8.1
    vs 11.1 ms, 16 16.4 vs 28.0, 64 33.5 vs 71.2. AVX2 host: the 30 layers' projections 21 -> 8-10 ms
    at batch 1, 48 -> 28 ms at 16 rows against float32 weights. `--quantize int8` too: int8 weights
    through our kernel under float32 rows (Zen 5 host, batch 1: 6.5 ms vs 8.1 with ATen's int8 kernel
    under bfloat16). `--dtype float32` keeps float32 weights (exact comparison).
  * Without the kernels: bf16 matmuls are fast only where the CPU has native bf16 (AVX512-BF16 or
    AMX): there bf16 was ~2x float32 at every batch size. On an AVX2-only host, bf16 took slow paths in
    every batched step (c=16: 17.9 tok/s bf16 vs 59.6 float32), so float32 there. GPUs: bf16.
  * Under the same conditions the KV cache is float16 (as llama.cpp's default cache): half the bytes decode
    attention reads, widened to float32 by our attention kernel as it loads them. Compiled decode steps at
    batch 16, context ~200: 62.6 -> 56.6 ms. `--kv-cache-dtype float32` keeps a float32 cache.
  * torch.compile of decode steps removes the ~8-15 ms of per-step dispatch (1.6-1.8x at batch 1 on
    CPU) but takes minutes on a small CPU, so by default it runs in the background after the shard is
    already serving eagerly (model_runner.ModelRunner.warm_up). Not with tensor parallelism (the
    collectives are not traced) and not on CUDA (never measured there).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def choose_dtype(requested: str, device: str, quantize: str | None, flags: frozenset[str] | None = None,
                 kernels: bool = False) -> str:
    """The dtype to compute in: `requested` unless "auto". `kernels`: whether our CPU kernels loaded
    (shard/models/cpu_kernels.py); they take float32 rows."""
    if quantize and requested == "float16":
        raise ValueError(f"--quantize {quantize} computes in bfloat16 or float32; drop --dtype float16")
    # --quantize leaves the choice as it is: int8 weights work under either compute dtype
    # (shard/models/quantize.py), and bf16 compute is 5x slower at batch 16 on AVX2.
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bfloat16"
    if kernels:
        return "float32"
    return "bfloat16" if NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags) else "float32"


def choose_matrices(requested: str, compute: str, device: str, kernels: bool) -> str:
    """The dtype the projections and vocabulary are stored in. `kernels`: whether our narrow-weight CPU
    kernels loaded (shard/models/cpu_kernels.py)."""
    if requested == "auto" and compute == "float32" and device == "cpu" and kernels:
        return "bfloat16"
    return compute


def choose_kv_cache(requested: str, compute: str, device: str, kernels: bool) -> str:
    """The KV cache's dtype. `kernels`: whether our CPU kernels loaded (their decode attention reads float16)."""
    if requested != "auto":
        return requested
    return "float16" if compute == "float32" and device == "cpu" and kernels else compute


def choose_compile(requested: bool | None, device: str, num_shard: int) -> tuple[bool, bool]:
    """(compile, in the background). `requested`: --compile (True: before healthy), --no-compile, or unset."""
    if requested is None:
        auto = device == "cpu" and num_shard == 1
        return auto, auto
    return requested, False
