"""Failover's one rule: what a generation cut off mid-stream is resubmitted as, on another replica.

The prompt plus the tokens already sent, with the budget that is left, so the client's stream goes on
where it was: a greedy continuation is what the uninterrupted run would have generated. A sampled one
cannot replay the first replica's random draws (each sequence has its own generator, shard/sequence.py),
so it gets a seed derived from the stream's seed and the count of tokens sent: the same failover point
continues the same way every time.
"""
from __future__ import annotations

from dataclasses import replace

from .contract import ShardRequest

_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive counts over the seed space (splitmix64's increment)


def continuation_seed(seed: int, sent: int) -> int:
    return (seed + sent * _GOLDEN) % 2**64


def continuation(request: ShardRequest, sent: list[int], seed: int | None) -> ShardRequest | None:
    """The request that generates the rest, or None when there is none to make: nothing left to
    generate, or a grammar (its matcher's state comes from the tokens it saw, not from a prompt)."""
    left = request.max_new_tokens - len(sent)
    if left <= 0 or request.grammar:
        return None
    params = request.params
    if params.do_sample and seed is not None:
        params = replace(params, seed=continuation_seed(seed, len(sent)))
    # prompt_logprobs: the prompt's logprobs were sent with the first reply already.
    return replace(request, input_ids=[*request.input_ids, *sent], max_new_tokens=left, params=params,
                   prompt_logprobs=False)
