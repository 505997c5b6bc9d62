"""One request inside the engine, and the reasons a generation ends."""
from __future__ import annotations

import math
from typing import Callable

import torch

from shard.sampler import SamplingParams

# Why a sequence finished, set on its last Sampled (the servicer maps them to the proto's enum).
FINISH_LENGTH = "length"  # max_new_tokens or the context ran out
FINISH_EOS = "eos"  # an eos or stop token id, or the grammar is complete


class Sequence:
    """One request inside the engine. `on_event(kind, value)` is called from the engine thread:
    ("token", Sampled) (the last one has `finish` set) or ("error", message).

    `params` is used as given, never edited: whoever builds the Sequence (the servicer) resolves
    the request's defaults, the seed included, and can report them from its own object.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        on_event: Callable[[str, object], None],
        stop_token_ids: frozenset[int] = frozenset(),
        top_n_tokens: int = 0,
        ignore_eos: bool = False,  # the model's eos does not finish; stop_token_ids still do
        matcher=None,  # an llguidance LLMatcher that every sampled token must satisfy
        prompt_logprobs: bool = False,
        tenant: str = "",  # fair scheduling (shard/fairness.py): whose service this is
        priority: int = 0,  # lower is admitted first
        weight: float = 1.0,  # the tenant's share; its service counts 1/weight
    ) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.params = params
        self.generator = _generator(params.seed) if params.do_sample else None
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = stop_token_ids
        self.top_n_tokens = top_n_tokens
        self.ignore_eos = ignore_eos
        self.on_event = on_event
        self.matcher = matcher
        # Prompt token logprobs, filled chunk by chunk during prefill; the first token has none.
        self.prefill: list[float] | None = [math.nan] if prompt_logprobs else None
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.blocks: list[int] = []
        self.block_hashes: list[int] = []  # names of this sequence's full blocks, in order
        self.cancelled = False
        self.tenant = tenant
        self.priority = priority
        self.weight = weight if weight > 0 else 1.0
        self.arrival = 0  # set by the scheduler: order among equals
        self.prompt_charged = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    def finishes_on(self, token_id: int, model_eos: frozenset[int]) -> bool:
        """Whether sampling `token_id` ends this sequence as an eos (grammar aside): a stop token
        always does; the model's eos does unless the request set ignore_eos."""
        return token_id in self.stop_token_ids or (token_id in model_eos and not self.ignore_eos)


def _generator(seed: int | None) -> torch.Generator:
    # Engine callers without a seed (tests, benchmarks) get a random one; the servicer always sets it.
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
