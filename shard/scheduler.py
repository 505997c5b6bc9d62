"""Which sequences run in the next step, and how many of their tokens: continuous batching under a
token budget, a batch size and the free KV blocks, with preemption when the blocks run out."""
from __future__ import annotations

from collections import deque

from shard.block_manager import BlockManager
from shard.sequence import Sequence


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_batch_prefill_tokens: int) -> None:
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def remove(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        # Out of KV blocks: drop the newest sequence's cache and recompute it later (its tokens
        # so far are kept, so the client sees no difference but a pause).
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of tokens to compute this step), running sequences first."""
        budget = self.max_batch_prefill_tokens
        out: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below for an earlier sequence
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n <= 0:
                continue
            total = seq.num_computed + n
            while not self.blocks.can_grow(seq, total) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
            if not self.blocks.can_grow(seq, total):
                self._preempt(seq)
                continue
            self.blocks.allocate(seq, total)
            out.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            cached = self.blocks.cached_prefix(seq)
            start = self.blocks.tokens_in(cached)
            n = min(seq.num_tokens - start, budget)
            if not self.blocks.can_admit(seq, cached, start + n):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, cached, start + n)
            self.running.append(seq)
            out.append((seq, n))
            budget -= n
        return out

    def advance(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """After the step's forward: its tokens are in the cache, and the blocks they filled are named."""
        for seq, n in scheduled:
            seq.num_computed += n
            self.blocks.register_full(seq)
