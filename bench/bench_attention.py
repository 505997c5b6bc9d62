"""Where attention's time goes, in-process (no server): long-prompt prefill and decode steps by context.

    python bench/bench_attention.py [--before REV] [--reps 3] [--scenarios prefill decode mixed]

Scenarios, each timed on the model runner (or the engine, for `mixed`) of this tree and, with
--before, of the engine code at git revision REV (loaded from git into its own modules, the same
weights), alternating variant by variant so that load from elsewhere hits each alike:
  prefill  one ~1,500-token prompt, in chunks of the scheduler's default budget (512 tokens)
  decode   one decode step at batch 1/16/64, context 256 and 1,500
  mixed    four ~1,500-token prompts at once through the engine's scheduler (issue 11's long-prompt
           scenario): the time until each has its first token
For the first two it also splits one profiled run per variant into gather (the KV cache index
ops), attention (matmuls, softmax, masking, SDPA and their copies) and the rest, by top-level op.
Prints medians and ratios before/now; compare ratios only, and only within one run.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shard.block_manager import BlockManager  # noqa: E402
from shard.engine import Engine, EngineConfig  # noqa: E402
from shard.model_runner import ModelRunner  # noqa: E402
from shard.models.loader import load_model  # noqa: E402
from shard.sampler import SamplingParams  # noqa: E402
from shard.sequence import Sequence  # noqa: E402
from sluice.modelfiles import resolve  # noqa: E402

BUDGET = EngineConfig.max_batch_prefill_tokens
GATHER_OPS = {"aten::index", "aten::index_select"}
ATTENTION_OPS = {"aten::matmul", "aten::bmm", "aten::softmax", "aten::_softmax", "aten::masked_fill",
                 "aten::scaled_dot_product_attention", "aten::reshape", "aten::contiguous", "aten::clone"}


def load_before(rev: str, model):
    """The ModelRunner class of revision `rev` (its model_runner.py and models/llama.py), and a model
    of that revision's class holding the same weight tensors as `model`."""
    folder = Path(tempfile.mkdtemp(prefix="before-"))
    mods = {}
    for name, path in (("before_llama", "shard/models/llama.py"), ("before_runner", "shard/model_runner.py")):
        src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
        (folder / f"{name}.py").write_text(src.replace("shard.models.llama", "before_llama"))
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[name] = mods[name]
        spec.loader.exec_module(mods[name])
    old = mods["before_llama"].LlamaModel(model.cfg, model.tp).to(model.dtype)
    old.load_state_dict(model.state_dict(), assign=True)
    for name in ("embed_tokens_scale", "lm_head_scale"):
        setattr(old, name, getattr(model, name))
    return mods["before_runner"].ModelRunner, old.eval()


def tokens(seed: int, n: int) -> list[int]:
    return [(1000 + 37 * seed + 11 * k + (k * k) % 7) % 40000 + 100 for k in range(n)]


def new_seq(name: str, ids: list[int]) -> Sequence:
    return Sequence(name, ids, SamplingParams(), 1 << 30, lambda *_: None, ignore_eos=True)


class Variant:
    """One engine version: its runner, and a block manager to give sequences slots in its cache."""

    def __init__(self, name: str, runner_cls, model, num_blocks: int, compile: bool = False) -> None:
        self.name, self.model = name, model
        self.runner = runner_cls(model, num_blocks, 16, compile)
        t0 = time.perf_counter()
        self.runner.warm_up()
        if compile:
            print(f"{name}: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
        self.blocks = BlockManager(num_blocks, 16)

    def prefill(self, seed: int, n: int, chunk: int = BUDGET) -> None:
        seq = new_seq("p", tokens(seed, n))
        self.blocks.allocate(seq, n)
        for s in range(0, n, chunk):
            seq.num_computed = s
            self.runner.step([(seq, min(chunk, n - s))])
        self.blocks.free(seq)

    def decode_batch(self, batch: int, ctx: int) -> list[tuple[Sequence, int]]:
        """`batch` sequences whose next step is a decode at context `ctx` (their cache holds garbage:
        timing does not depend on it)."""
        out = []
        for i in range(batch):
            seq = new_seq(str(i), tokens(i, ctx))
            self.blocks.allocate(seq, ctx)
            seq.num_computed = ctx - 1
            out.append((seq, 1))
        return out

    def mixed(self, seed: int, prompts: int, n: int) -> list[float]:
        """Seconds until each of `prompts` concurrent n-token prompts has its first token."""
        # The engine's own cache is left small and unused: the step runs on this variant's runner.
        engine = Engine(self.model, EngineConfig(max_batch_total_tokens=prompts * (n + 32)), eos_token_ids=[])
        engine.runner = self.runner
        firsts: list[float] = []
        t0 = time.perf_counter()
        for i in range(prompts):
            seq = Sequence(str(i), tokens(seed * 100 + i, n), SamplingParams(), 1 << 30,
                           lambda kind, v: firsts.append(time.perf_counter() - t0), ignore_eos=True)
            engine.scheduler.add(seq)
        while len(firsts) < prompts:
            engine.step()
        return firsts[:prompts]


def split(fn) -> tuple[float, float, float]:
    """(gather, attention, rest) seconds of one profiled call of fn, by top-level op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    gather = attention = 0.0
    for evt in prof.events():
        if evt.cpu_parent is not None:
            continue
        if evt.name in GATHER_OPS:
            gather += evt.cpu_time_total / 1e6
        elif evt.name in ATTENTION_OPS:
            attention += evt.cpu_time_total / 1e6
    return gather, attention, total - gather - attention


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(label: str, fns: dict, reps: int, profile_split: bool) -> None:
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    # The minimum too: on a busy machine it is the run least disturbed by others.
    med = {name: statistics.median(t) for name, t in times.items()}
    low = {name: min(t) for name, t in times.items()}
    line = f"{label:28s}" + "".join(f"  {name} {1000 * m:8.1f} ms (min {1000 * low[name]:.1f})" for name, m in med.items())
    if len(med) == 2:
        (first, second), (first_low, second_low) = med.values(), low.values()
        line += f"   {second / first:5.2f}x the time of {next(iter(med))} (min: {second_low / first_low:5.2f}x)"
    print(line, flush=True)
    if profile_split:
        for name, fn in fns.items():
            g, a, r = split(fn)
            tot = g + a + r
            print(f"{'':28s}  {name}: gather {100 * g / tot:4.1f}%  attention {100 * a / tot:4.1f}%  rest {100 * r / tot:4.1f}%"
                  f"  (profiled {1000 * tot:.0f} ms)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", help="git revision whose engine to compare against (same weights, same run)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scenarios", nargs="+", default=["prefill", "decode", "mixed"])
    ap.add_argument("--prompt-len", type=int, default=1500)
    ap.add_argument("--chunks", type=int, nargs="*", default=[], help="prefill chunk sizes to compare with the default")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--ctx", type=int, nargs="+", default=[256, 1500])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="decode steps through the compiled graphs, as the shard runs them once warm")
    ap.add_argument("--no-split", action="store_true", help="skip the profiled gather/attention/rest split")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = load_model(resolve(None), getattr(torch, args.dtype))
    num_blocks = max(max(args.batch) * (max(args.ctx) + 16), 4 * (args.prompt_len + 16)) // 16 + 2
    variants = []
    if args.before:
        runner_cls, old = load_before(args.before, model)
        variants.append(Variant("before", runner_cls, old, num_blocks, args.compile))
    variants.append(Variant("now", ModelRunner, model, num_blocks, args.compile))
    print(f"SmolLM2-135M {args.dtype}, {args.threads} threads, torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}; medians of {args.reps}", flush=True)
    with torch.inference_mode():
        if "prefill" in args.scenarios:
            seed = iter(range(10**6))
            fns = {v.name: (lambda v=v: v.prefill(next(seed), args.prompt_len)) for v in variants}
            compare(f"prefill {args.prompt_len} (chunks {BUDGET})", fns, args.reps, not args.no_split)
            for chunk in args.chunks:  # other chunk sizes, on this tree's engine, against the default
                now = variants[-1]
                fns = {f"c{BUDGET}": lambda: now.prefill(next(seed), args.prompt_len),
                       f"c{chunk}": lambda c=chunk: now.prefill(next(seed), args.prompt_len, c)}
                compare(f"prefill {args.prompt_len} chunk size", fns, args.reps, False)
        if "decode" in args.scenarios:
            for ctx in args.ctx:
                for b in args.batch:
                    fns = {}
                    for v in variants:
                        scheduled = v.decode_batch(b, ctx)
                        fns[v.name] = lambda v=v, s=scheduled: v.runner.step(s)
                    compare(f"decode B={b} ctx={ctx}", fns, max(args.reps, 5), not args.no_split)
                    for v in variants:
                        v.blocks = BlockManager(num_blocks, 16)
        if "mixed" in args.scenarios:
            times = {v.name: [] for v in variants}
            for rep in range(args.reps):
                for v in variants:
                    times[v.name].append(v.mixed(rep, 4, args.prompt_len))
                    v.blocks = BlockManager(num_blocks, 16)
            for v in variants:
                firsts = sorted(t for run in times[v.name] for t in run)
                print(f"{'mixed 4 x ' + str(args.prompt_len):28s}  {v.name}: first token p50 {statistics.median(firsts):6.2f} s, "
                      f"last {max(firsts):6.2f} s", flush=True)
            if len(variants) == 2:
                b, n = (statistics.median(sorted(t for run in times[v.name] for t in run)) for v in variants)
                print(f"{'':28s}  TTFT p50 now/before {n / b:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
