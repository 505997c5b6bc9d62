"""What each engine lever is worth on this CPU: one process, decode steps interleaved lever by lever.

    python bench/bench_levers.py [--batch 1 16 64] [--steps 20] [--levers eager eager-aten compiled ...]

For each batch size, that many ~200-token sequences are prefilled, then decode steps rotate through
the levers (so load from elsewhere hits each alike). Levers:
  eager          the model as `sluice serve` runs it without --compile
  eager-aten     eager with oneDNN off for the step (ATen's own bf16 GEMV/GEMM)
  compiled       torch.compile with inductor freezing and its C++ wrapper (what the shard compiles)
  compiled-py    the same with inductor's Python wrapper (the shard before the C++ one)
  int8           weight-only int8 (--quantize), eager
  int8-compiled  weight-only int8, compiled
  bf16w          matrices stored in bfloat16 under float32 compute (the AVX2 default), eager
  bf16w-compiled the same, compiled
  default        bf16w with a float16 KV cache (the AVX2 default since session 23), eager
  default-compiled the same, compiled
  default-avx2[-compiled]  default with the weights left unpacked (AVX512-BF16 hosts: our AVX2 kernel
                 instead of the packed vdpbf16ps one, cpu_kernels.pack)
A lever may end in ":bfloat16" or ":float32" to run in that dtype instead of --dtype, so two dtypes
share one run (`--levers default-compiled compiled:bfloat16`).
Prints ms/step and tok/s per lever, and the one-off compile times.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shard import model_runner  # noqa: E402
from shard.engine import Engine, EngineConfig  # noqa: E402
from shard.models import cpu_kernels  # noqa: E402
from shard.models.loader import load_model  # noqa: E402
from shard.sampler import SamplingParams  # noqa: E402
from shard.sequence import Sequence  # noqa: E402
from sluice.modelfiles import resolve  # noqa: E402


def prompt(i: int, n: int) -> list[int]:
    return [(1000 + 37 * i + 11 * k) % 40000 + 100 for k in range(n)]


def build(source, dtype, lever: str) -> tuple[Engine, float]:
    cpu_kernels.load()
    lever, _, own_dtype = lever.partition(":")
    dtype = getattr(torch, own_dtype) if own_dtype else dtype
    matrices = torch.bfloat16 if lever.startswith(("bf16w", "default")) else None
    kv_cache = torch.float16 if lever.startswith("default") else None
    with mock.patch.object(cpu_kernels, "pack", lambda w: None) if "avx2" in lever else nullcontext():
        model = load_model(source, dtype, quantize="int8" if lever.startswith("int8") else None, matrices=matrices,
                           kv_cache=kv_cache)
    compiled = "compiled" in lever
    engine = Engine(model, EngineConfig(max_batch_total_tokens=16384, compile=compiled), eos_token_ids=[])
    model_runner.CPP_WRAPPER = lever != "compiled-py"
    t0 = time.perf_counter()
    engine.warm_up()
    return engine, time.perf_counter() - t0


def fill(engine: Engine, batch: int, prompt_len: int, steps: int) -> None:
    for i in range(batch):
        engine.scheduler.waiting.append(Sequence(str(i), prompt(i, prompt_len), SamplingParams(), steps + 8,
                                                 lambda *_: None, ignore_eos=True))
    while any(s.num_computed < s.prompt_len for s in (*engine.scheduler.running, *engine.scheduler.waiting)):
        engine.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--levers", nargs="+", default=["eager", "eager-aten", "compiled", "compiled-py", "int8", "int8-compiled"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=200)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    # Each compiled lever is a new model for the same code: without room, the third one ran eagerly.
    torch._dynamo.config.recompile_limit = 64
    source = resolve(None)
    dtype = getattr(torch, args.dtype)
    engines, compile_s = {}, {}
    for lever in args.levers:
        engines[lever], compile_s[lever] = build(source, dtype, lever)
        print(f"{lever}: ready, warm-up {compile_s[lever]:.1f} s", flush=True)
    print(f"\nSmolLM2-135M {args.dtype}, decode steps (whole engine step: forward, logits, sampling), "
          f"context ~{args.prompt_len}, {os.cpu_count()} cores, torch {torch.__version__}; medians of {args.steps}")
    print(f"{'batch':>5s}" + "".join(f"{lever:>16s}" for lever in args.levers))
    for b in args.batch:
        for e in engines.values():
            fill(e, b, args.prompt_len, args.steps + 1)
        times: dict[str, list[float]] = {lever: [] for lever in args.levers}
        for k in range(args.steps + 1):
            for lever, e in engines.items():
                ctx = torch.backends.mkldnn.flags(enabled=False) if lever == "eager-aten" else nullcontext()
                t0 = time.perf_counter()
                with ctx:
                    e.step()
                if k:
                    times[lever].append(time.perf_counter() - t0)
        for e in engines.values():
            for seq in list(e.scheduler.running):
                e.scheduler.remove(seq)
        med = {lever: statistics.median(t) for lever, t in times.items()}
        base = med[args.levers[0]]
        print(f"{b:5d}" + "".join(f"{1000 * m:8.1f}ms {base / m:4.2f}x" for m in med.values()), flush=True)
    print("warm-up s: " + ", ".join(f"{lever} {s:.0f}" for lever, s in compile_s.items()))


if __name__ == "__main__":
    main()
