"""Paged KV blocks: which cache slots each sequence owns, and prefix reuse by block hash."""
from __future__ import annotations

import math
from collections import OrderedDict

from shard.sequence import Sequence


class BlockManager:
    """Fixed-size KV blocks with prefix reuse; a sequence's blocks need not be contiguous.

    A full block is named by a hash of every token up to its end, so two requests that share a
    prefix (a system prompt, a chat history) share its blocks instead of computing them again.
    Freed blocks keep their contents and name until they are handed out again, oldest first.
    All block arithmetic lives here: the scheduler asks in tokens.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        # Block 0 is never handed out: padded attention rows read it and the compile warm-up writes it,
        # possibly while sequences run (shard/model_runner.py). `num_blocks` counts the usable ones.
        self.num_blocks = num_blocks - 1
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))  # LRU order
        self.refs = [0] * num_blocks
        self.block_hash: dict[int, int] = {}
        self.by_hash: dict[int, int] = {}
        self.hit_tokens = 0  # prompt tokens not computed thanks to reuse (a metric)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs to hold `num_tokens` tokens in all."""
        return max(0, math.ceil(num_tokens / self.block_size) - len(seq.blocks))

    def can_allocate(self, n: int) -> bool:
        return len(self.free_blocks) >= n

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether a running sequence can hold `num_tokens` tokens in all without preempting anyone."""
        return self.can_allocate(self.needed(seq, num_tokens))

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.needed(seq, num_tokens)):
            block, _ = self.free_blocks.popitem(last=False)
            self.by_hash.pop(self.block_hash.pop(block, None), None)
            self.refs[block] = 1
            seq.blocks.append(block)

    def free(self, seq: Sequence) -> None:
        for block in seq.blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free_blocks[block] = None
        seq.blocks = []
        seq.block_hashes = []

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks already holding this sequence's leading full blocks (at least one token stays
        to compute, so the step still yields logits for it)."""
        if seq.prefill is not None and len(seq.prefill) < seq.prompt_len:
            return []  # prompt logprobs need the logits of every prompt position: compute them all
        bs, found, parent = self.block_size, [], 0
        for i in range((seq.num_tokens - 1) // bs):
            parent = hash((parent, *seq.token_ids[i * bs : (i + 1) * bs]))
            block = self.by_hash.get(parent)
            if block is None:
                break
            found.append(block)
        return found

    def tokens_in(self, blocks: list[int]) -> int:
        """Tokens held by these full blocks."""
        return len(blocks) * self.block_size

    def can_admit(self, seq: Sequence, cached: list[int], num_tokens: int) -> bool:
        """Whether a waiting sequence fits: its cached prefix blocks, plus new blocks up to
        `num_tokens` tokens in all. Cached blocks that sit in the free list (no sequence holds
        them) stop being free once it takes them, so they count against what is free."""
        idle = sum(1 for b in cached if self.refs[b] == 0)
        new = math.ceil(num_tokens / self.block_size) - len(cached)
        return self.can_allocate(new + idle)

    def admit(self, seq: Sequence, cached: list[int], num_tokens: int) -> None:
        """Give a waiting sequence its cached prefix, then new blocks up to `num_tokens` tokens."""
        self.take_prefix(seq, cached)
        self.allocate(seq, num_tokens)

    def take_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        for block in blocks:
            if self.refs[block] == 0:
                del self.free_blocks[block]
            self.refs[block] += 1
        seq.blocks = list(blocks)
        seq.block_hashes = [self.block_hash[b] for b in blocks]
        seq.num_computed = len(blocks) * self.block_size
        self.hit_tokens += seq.num_computed

    def register_full(self, seq: Sequence) -> None:
        """Name the blocks that this step filled, so later requests can reuse them."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else 0
            h = hash((parent, *seq.token_ids[i * bs : (i + 1) * bs]))
            seq.block_hashes.append(h)
            block = seq.blocks[i]
            if h not in self.by_hash and block not in self.block_hash:
                self.by_hash[h], self.block_hash[block] = block, h
