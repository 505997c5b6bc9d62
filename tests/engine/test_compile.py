"""Compiled decode steps (torch.compile; by default in the background) give the same greedy ids as eager, in float32."""
from __future__ import annotations

import threading

import pytest
import torch
from torch._dynamo.utils import counters

from shard import model_runner

from shard.engine import Engine, EngineConfig
from shard.models import cpu_kernels
from shard.models.loader import load_model
from shard.sampler import SamplingParams
from shard.sequence import Sequence
from sluice.modelfiles import ModelSource

pytestmark = pytest.mark.slow  # torch.compile takes tens of seconds: outside the fast tier

# Four sequences decode together, then three, then one; the longest crosses a 64-token context
# boundary. The two graphs compiled by warm_up (batch 1, batch >= 2) must serve all of it.
PROMPTS = [[5, 17, 300, 42, 8, 99, 1000, 7] * 7, [11, 12, 13], [400, 401, 402, 403, 404, 405], [2000, 7]]
NEW_TOKENS = [16, 10, 10, 6]


def greedy(model, compile: bool) -> list[list[int]]:
    engine = Engine(model, EngineConfig(max_batch_total_tokens=512, block_size=8, compile=compile), eos_token_ids=[])
    engine.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    outs: list[list[int]] = [[] for _ in PROMPTS]
    left = [len(PROMPTS)]

    def listener(i: int):
        def on_event(kind, value):
            assert kind == "token", value
            outs[i].append(value.token_id)
            if value.finish:
                left[0] -= 1
                engine._stop = left[0] == 0
        return on_event

    for i, ids in enumerate(PROMPTS):
        engine.submit(Sequence(str(i), ids, SamplingParams(), NEW_TOKENS[i], listener(i)))
    engine.run()  # returns when the last sequence finishes
    assert len(engine.blocks.free_blocks) == engine.blocks.num_blocks
    assert counters["stats"]["unique_graphs"] == graphs, "warm_up's graphs served every decode step, no recompile"
    return outs


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("matrices", [torch.float32, torch.bfloat16])
def test_compiled_decode_equals_eager(tiny_llama, matrices):
    """float32 weights, and bfloat16 ones under float32 compute (the AVX2 default: our kernels, opaque
    to inductor, inside the compiled graph)."""
    import torch._dynamo

    if matrices == torch.bfloat16:
        assert cpu_kernels.load()
    model = load_model(ModelSource("tiny", tiny_llama), torch.float32, matrices=matrices)
    eager = greedy(model, compile=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = greedy(model, compile=True)
    assert compiled == eager
    assert counters["stats"]["unique_graphs"] == 2
    assert [len(o) for o in eager] == NEW_TOKENS


@pytest.mark.filterwarnings("ignore")
def test_steps_of_one_row_run_their_own_models_graph_with_guards_skipped(tiny_llama):
    """A step of one row skips dynamo's guard checks (model_runner.ModelRunner._forward). Two models in
    one process compile the same code; the checks that tell their graphs apart still run, so each model's
    steps run its own graph, whichever compiled last."""
    import torch._dynamo

    first = load_model(ModelSource("tiny", tiny_llama), torch.float32)
    other = load_model(ModelSource("tiny", tiny_llama), torch.float32)
    other.norm.data.neg_()  # the logits negated: other greedy ids
    eager = [greedy(first, compile=False), greedy(other, compile=False)]
    assert eager[0] != eager[1]
    torch._dynamo.reset()
    assert greedy(first, compile=True) == eager[0]
    assert greedy(other, compile=True) == eager[1]
    assert greedy(first, compile=True) == eager[0]  # its graph no longer the newest


@pytest.mark.filterwarnings("ignore")
def test_background_compile_serves_eagerly_then_switches_with_the_same_ids(tiny_llama, monkeypatch):
    """The default: requests run while the graphs compile in a thread, with inductor's settings (its
    config is thread-local: set only in the engine's thread, the graphs compiled without freezing);
    block 0, which the warm-up writes, is never a sequence's."""
    import torch._dynamo

    model = load_model(ModelSource("tiny", tiny_llama), torch.float32)
    eager = greedy(model, compile=False)
    torch._dynamo.reset()
    monkeypatch.setattr(model_runner, "CPP_WRAPPER", False)  # g++ time; the setting still has to arrive
    config = EngineConfig(max_batch_total_tokens=512, block_size=8, compile=True, compile_in_background=True)
    engine = Engine(model, config, eos_token_ids=[])
    seen: dict[str, object] = {}
    compile_graphs = engine.runner._warm_up

    def probe(compiled):
        seen.update(thread=threading.current_thread().name, freezing=torch._inductor.config.freezing,
                    cpp_wrapper=torch._inductor.config.cpp_wrapper)
        return compile_graphs(compiled)

    monkeypatch.setattr(engine.runner, "_warm_up", probe)
    engine.warm_up()  # returns at once: the compile runs in its own thread

    def run() -> list[list[int]]:
        outs: list[list[int]] = [[] for _ in PROMPTS]
        seqs = [Sequence(str(i), ids, SamplingParams(), NEW_TOKENS[i],
                         lambda kind, v, i=i: outs[i].append(v.token_id)) for i, ids in enumerate(PROMPTS)]
        for seq in seqs:
            engine.scheduler.waiting.append(seq)
        while engine.scheduler.running or engine.scheduler.waiting:
            engine.step()
            assert all(0 not in seq.blocks for seq in seqs)
        return outs

    assert run() == eager  # eagerly, or partly compiled if the compile finished meanwhile
    engine.compile_thread.join(timeout=600)
    assert engine.runner.compiled is not None, "the compile thread finished and the runner switched"
    assert seen == {"thread": "compile", "freezing": True, "cpp_wrapper": False}
    assert run() == eager


@pytest.mark.filterwarnings("ignore")
def test_layer_groups_compile_once_and_let_a_newcomer_in_between(tiny_llama, monkeypatch):
    """One graph per layer group (here one layer each: two groups) for batches of more than one row,
    and one from the ids to the logits for batch 1, all built by warm_up; a newcomer that arrives during a compiled decode step runs its prompt between two groups,
    gets its first token first, and every greedy id stays as eager."""
    import torch._dynamo

    import shard.model_runner

    model = load_model(ModelSource("tiny", tiny_llama), torch.float32)
    eager = greedy(model, compile=False)
    newcomer_prompt = [2000, 7, 31, 800, 9]
    solo = Engine(model, EngineConfig(max_batch_total_tokens=512, block_size=8), eos_token_ids=[])
    alone: list[int] = []
    solo.scheduler.add(Sequence("B", newcomer_prompt, SamplingParams(), 6, lambda kind, v: alone.append(v.token_id)))
    while solo.scheduler.running or solo.scheduler.waiting:
        solo.step()

    monkeypatch.setattr(shard.model_runner, "LAYERS_PER_COMPILED_GROUP", 1)
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, EngineConfig(max_batch_total_tokens=512, block_size=8, compile=True), eos_token_ids=[])
    # Python's wrapper around the kernels instead of the C++ one that compile_decode turns on: the
    # groups, their graphs and the pauses between them are the same, and four C++ wrappers would add
    # ~12 s of g++ to the suite (test_compiled_decode_equals_eager compiles the C++ ones).
    monkeypatch.setattr(model_runner, "CPP_WRAPPER", False)
    engine.warm_up()
    # Batch 1 as one graph from the ids to the logits, batches of more rows as one graph per group.
    assert len(engine.runner.compiled.batched) == 2
    assert counters["stats"]["unique_graphs"] == 3
    events: list[tuple[str, int]] = []
    seqs = [Sequence(str(i), ids, SamplingParams(), NEW_TOKENS[i], lambda kind, v, i=i: events.append((str(i), v.token_id)))
            for i, ids in enumerate(PROMPTS)]
    newcomer = Sequence("B", newcomer_prompt, SamplingParams(), 6, lambda kind, v: events.append(("B", v.token_id)), tenant="B")
    for seq in seqs:
        engine.scheduler.add(seq)
    engine.step()  # the prompts
    hook = engine._between_layers

    def arrive_then_hook():
        if engine.steps == 1:  # during the first decode step, compiled
            engine.submit(newcomer)
        hook()

    engine._between_layers = arrive_then_hook
    before = len(events)
    engine.step()
    assert [name for name, _ in events[before:]] == ["B", "0", "1", "2", "3"]
    while engine.scheduler.running or engine.scheduler.waiting:
        engine.step()
    assert [[t for name, t in events if name == str(i)] for i in range(len(PROMPTS))] == eager
    assert [t for name, t in events if name == "B"] == alone
    assert counters["stats"]["unique_graphs"] == 3, "warm_up's graphs served every decode step, no recompile"


def test_compile_flag(monkeypatch):
    from sluice.cli import build_parser, main

    monkeypatch.delenv("COMPILE", raising=False)
    assert build_parser().parse_args(["shard", "--compile"]).compile
    assert build_parser().parse_args(["serve"]).compile is None  # auto: in the background on CPU
    assert build_parser().parse_args(["serve", "--no-compile"]).compile is False
    monkeypatch.setenv("COMPILE", "1")
    assert build_parser().parse_args(["serve"]).compile
    with pytest.raises(SystemExit, match="--num-shard 1 only"):
        main(["serve", "--num-shard", "2", "--port", "0"])


def test_freezing_only_where_the_matmul_libraries_take_the_weights(tiny_llama):
    """Frozen weights are packed for MKL/oneDNN; narrow ones go to our kernels, and unfrozen graphs
    come from inductor's cache on a restart."""
    import torch._inductor.config

    source = ModelSource("tiny", tiny_llama)
    for matrices, frozen in ((torch.float32, True), (torch.bfloat16, False)):
        model_runner.configure_inductor(load_model(source, torch.float32, matrices=matrices))
        assert torch._inductor.config.freezing is frozen
    model_runner.configure_inductor(load_model(source, torch.float32, quantize="int8"))
    assert torch._inductor.config.freezing is False
