"""`--compile` (torch.compile of decode-only steps) gives the same greedy ids as eager, in float32."""
from __future__ import annotations

import pytest
from torch._dynamo.utils import counters

from shard.engine import Engine, EngineConfig
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
def test_compiled_decode_equals_eager(tiny_llama):
    import torch._dynamo

    model = load_model(ModelSource("tiny", tiny_llama), torch.float32)
    eager = greedy(model, compile=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = greedy(model, compile=True)
    assert compiled == eager
    assert counters["stats"]["unique_graphs"] == 2
    assert [len(o) for o in eager] == NEW_TOKENS


def test_compile_flag(monkeypatch):
    from sluice.cli import build_parser, main

    assert build_parser().parse_args(["shard", "--compile"]).compile
    assert not build_parser().parse_args(["serve"]).compile
    monkeypatch.setenv("COMPILE", "1")
    assert build_parser().parse_args(["serve"]).compile
    with pytest.raises(SystemExit, match="--num-shard 1 only"):
        main(["serve", "--num-shard", "2", "--port", "0"])
