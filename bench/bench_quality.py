"""How closely the narrow weight forms follow full width, and llama.cpp's Q8_0 its BF16, measured alike.

    python bench/bench_quality.py [--new-tokens 32] [--skip-llamacpp]

Not a speed benchmark (nothing is timed), but it loads several models: run it alone all the same.

Sluice, in-process on token ids (the engine, as `sluice shard` runs it, no compile): the reference is
float32 weights and compute (equal to transformers: tests/e2e/test_parity.py), against
  * bf16 matrices: weights in bfloat16 under float32 compute, with a float32 or a float16 KV cache
    (the CPU default: both narrow); on AVX512-BF16 CPUs packed (the rows rounded to bfloat16 too), and
    unpacked as AVX2 CPUs run them;
  * int8: `--quantize int8` under float32 compute with a float16 KV cache (the default with our kernels;
    packed on AVX512-BF16 CPUs) and under bfloat16 compute (native-bf16 CPUs without them).
Prompts are prefilled PREFILL_CHUNK tokens at a time, as a long prompt is: each chunk reads the earlier
ones' K/V back from the cache, so a narrower cache shows in both measures.
llama.cpp (`llama-server`, built and cached as bench_llamacpp.py does): Q8_0 against BF16.

Two measures, the same for both servers:
  * teacher-forced greedy agreement: the reference's greedy continuation of each prompt
    (--new-tokens), then at every position, does the other model pick the same next token from the
    same prefix? (Free-running outputs that differ once differ everywhere after.)
  * perplexity of a fixed passage (Sluice only: llama-server returns no prompt logprobs), and its
    change against the reference.
"""
from __future__ import annotations

import argparse
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_compile import greedy  # noqa: E402
from bench_llamacpp import CACHE, free_port, gguf_formats, llamacpp_cmd, llamacpp_tools, serving  # noqa: E402
from shard.engine import Engine, EngineConfig  # noqa: E402
from shard.models import cpu_kernels  # noqa: E402
from shard.models.loader import load_model  # noqa: E402
from shard.sampler import SamplingParams  # noqa: E402
from shard.sequence import Sequence  # noqa: E402
from sluice.modelfiles import load_tokenizer, resolve  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "In the morning, the old fisherman",
    "To make a cup of tea, you first",
    "The three primary colors are",
    "Photosynthesis is the process by which",
]

PASSAGE = (
    "The river rose slowly through the night, and by morning the low fields beside the village were "
    "under water. Farmers moved their animals to the hill behind the church, where the ground stayed "
    "dry, and the children watched from the bridge as branches and fence posts drifted past. By noon "
    "the rain had stopped. The mayor walked along the bank with two engineers, who measured the "
    "height of the water against the old stone marks left by earlier floods. This flood, they said, "
    "was smaller than the one fifty years ago, but the new houses near the mill had been built too "
    "close to the river. In the evening the water began to fall, leaving mud on every road, and the "
    "people of the village came out with shovels and brooms to clean the streets before the market."
)


# Room for all of a run's prefixes at once.
TOTAL_TOKENS = 8192
PREFILL_CHUNK = 16


def continue_greedy(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    return greedy(model, False, prompts, new, TOTAL_TOKENS, PREFILL_CHUNK)


def perplexity(model, ids: list[int]) -> float:
    engine = Engine(model, EngineConfig(max_batch_total_tokens=TOTAL_TOKENS, max_batch_prefill_tokens=PREFILL_CHUNK),
                    eos_token_ids=[])
    seq = Sequence("passage", ids, SamplingParams(), 1, lambda *_: None, prompt_logprobs=True)
    engine.scheduler.waiting.append(seq)
    while engine.scheduler.running or engine.scheduler.waiting:
        engine.step()
    return math.exp(-sum(seq.prefill[1:]) / (len(seq.prefill) - 1))


def agreement(reference: list[list[int]], prompts: list[list[int]], next_token) -> tuple[int, int]:
    """(agreeing positions, positions): next_token(prefixes) -> one id per prefix."""
    prefixes = [p + r[:k] for p, r in zip(prompts, reference) for k in range(len(r))]
    wanted = [r[k] for r in reference for k in range(len(r))]
    got = next_token(prefixes)
    return sum(g == w for g, w in zip(got, wanted)), len(wanted)


def sluice_rows(prompts: list[list[int]], passage: list[int], new: int) -> list[tuple[str, str, str]]:
    cpu_kernels.load()
    source = resolve(None)
    ref_model = load_model(source, torch.float32)
    reference = continue_greedy(ref_model, prompts, new)
    ref_ppl = perplexity(ref_model, passage)
    rows = [("sluice float32 (reference)", f"{len(reference) * new}/{len(reference) * new}", f"{ref_ppl:.3f}")]
    # On AVX512-BF16 CPUs load_model packs bf16 and int8 matrices under float32 compute (cpu_kernels.pack: the
    # rows rounded to bf16 too; int8 ones from 9 rows up, prompt chunks and batches).
    packed = " packed (AVX512-BF16)" if cpu_kernels.native_bf16() else ""
    forms = [(f"sluice bf16 matrices{packed}, float32 compute and KV cache", dict(dtype=torch.float32, matrices=torch.bfloat16)),
             (f"sluice bf16 matrices{packed}, float16 KV cache (the CPU default)",
              dict(dtype=torch.float32, matrices=torch.bfloat16, kv_cache=torch.float16)),
             (f"sluice --quantize int8{packed}, float32 compute, float16 KV cache",
              dict(dtype=torch.float32, quantize="int8", kv_cache=torch.float16)),
             ("sluice --quantize int8, bfloat16 compute", dict(dtype=torch.bfloat16, quantize="int8"))]
    if packed:
        forms.insert(2, ("sluice bf16 matrices unpacked, float16 KV cache (the AVX2 default)",
                         dict(dtype=torch.float32, matrices=torch.bfloat16, kv_cache=torch.float16, unpacked=True)))
    for name, kw in forms:
        with mock.patch.object(cpu_kernels, "pack", lambda w: None) if kw.pop("unpacked", False) else nullcontext():
            model = load_model(source, kw.pop("dtype"), **kw)
        agree, n = agreement(reference, prompts, lambda ps: [o[0] for o in continue_greedy(model, ps, 1)])
        ppl = perplexity(model, passage)
        rows.append((name, f"{agree}/{n} ({agree / n:.1%})", f"{ppl:.3f} ({ppl / ref_ppl - 1:+.2%})"))
        print(rows[-1], flush=True)
    return rows


def llamacpp_rows(prompts: list[list[int]], new: int) -> list[tuple[str, str, str]]:
    server, quantize = llamacpp_tools(None, None)
    ggufs = gguf_formats(resolve(None).path, quantize, ["BF16", "Q8_0"])

    def complete(url: str, ids: list[int], n: int) -> list[int]:
        body = {"prompt": ids, "n_predict": n, "temperature": 0, "return_tokens": True, "cache_prompt": False}
        return httpx.post(url + "/completion", json=body, timeout=120).json()["tokens"]

    results = {}
    for fmt in ("BF16", "Q8_0"):
        port = free_port()
        with serving(f"llama.cpp {fmt}", llamacpp_cmd(server, ggufs[fmt], port, 2048, 1), port,
                     CACHE / f"llama-server-quality-{fmt}.log") as url:
            if fmt == "BF16":
                results["reference"] = [complete(url, p, new) for p in prompts]
            else:
                agree, n = agreement(results["reference"], prompts, lambda ps: [complete(url, p, 1)[0] for p in ps])
                results["Q8_0"] = f"{agree}/{n} ({agree / n:.1%})"
    n = len(prompts) * new
    return [("llama.cpp BF16 (reference)", f"{n}/{n}", "-"), ("llama.cpp Q8_0", results["Q8_0"], "-")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--skip-llamacpp", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    tokenizer = load_tokenizer(resolve(None))
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    passage = tokenizer.encode(PASSAGE)
    rows = sluice_rows(prompts, passage, args.new_tokens)
    if not args.skip_llamacpp:
        rows += llamacpp_rows(prompts, args.new_tokens)
    print(f"\n{len(PROMPTS)} prompts x {args.new_tokens} tokens teacher-forced; passage {len(passage)} tokens")
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'model':<{width}}{'greedy agreement':>22}{'perplexity (vs reference)':>30}")
    for name, agree, ppl in rows:
        print(f"{name:<{width}}{agree:>22}{ppl:>30}")


if __name__ == "__main__":
    main()
