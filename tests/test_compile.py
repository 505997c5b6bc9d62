"""`--compile` (torch.compile of decode-only steps) gives the same greedy ids as eager, in float32."""
from __future__ import annotations

import pytest
import torch

from shard.engine import Engine, EngineConfig, Sequence, decode_bucket
from shard.models.loader import load_model
from shard.sampler import SamplingParams
from sluice.modelfiles import ModelSource

# Three sequences decode together (one padded bucket of 4, so one compiled graph keeps the test
# short); the longest crosses a 64-token context boundary, which must not recompile.
PROMPTS = [[5, 17, 300, 42, 8, 99, 1000, 7] * 7, [11, 12, 13], [400, 401, 402, 403, 404, 405]]
NEW_TOKENS = 16


def greedy(model, compile: bool) -> tuple[list[list[int]], Engine]:
    engine = Engine(model, EngineConfig(kv_cache_tokens=512, block_size=8, compile=compile), eos_token_ids=[])
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
        engine.submit(Sequence(str(i), ids, SamplingParams(), NEW_TOKENS, listener(i)))
    engine.run()  # returns when the last sequence finishes
    assert len(engine.blocks.free_blocks) == engine.blocks.num_blocks
    return outs, engine


@pytest.mark.filterwarnings("ignore")
def test_compiled_decode_equals_eager(tiny_llama):
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = load_model(ModelSource("tiny", tiny_llama), torch.float32)
    eager, _ = greedy(model, compile=False)
    torch._dynamo.reset()
    counters.clear()
    compiled, engine = greedy(model, compile=True)
    assert compiled == eager
    assert counters["stats"]["unique_graphs"] == 1, "decode steps ran compiled, one graph for every context length"
    assert all(len(o) == NEW_TOKENS for o in eager)
    assert decode_bucket(3) == 4 and decode_bucket(1) == 1 and decode_bucket(64) == 64
    # Padding rows wrote only to the scratch slot past the last block.
    assert engine.scratch_slot == engine.blocks.num_blocks * engine.blocks.block_size
    assert engine.kv_caches[0][0].shape[0] == engine.scratch_slot + 1
