"""Which sequences run in the next step, and how many of their tokens: continuous batching under a
token budget, a batch size and the free KV blocks, with preemption when the blocks run out.

Order is fair (shard/fairness.py): running sequences get their tokens, and waiting ones are admitted,
by (priority, the tenant's weighted service so far, arrival); a preempted sequence is the one last in
that order, so the tenant with the most service gives way first.

A light tenant (`_newcomers`) whose request arrives during a step need not wait for that step to end:
`interject` admits it for a prompt step of its own that the engine runs between two of the step's
layers (shard/engine.py), when that needs only free blocks.
"""
from __future__ import annotations

import itertools

from shard.block_manager import BlockManager
from shard.fairness import Fairness
from shard.sequence import Sequence


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_batch_prefill_tokens: int) -> None:
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.fair = Fairness()
        self._arrivals = itertools.count()
        # Whom the last step admitted, if it was a prompt-only step taken while others decode (see
        # schedule): "newcomers", "others", or None (it was not such a step).
        self._prompt_step_last: str | None = None

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(self._arrivals)
        self.fair.joined(seq)
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            return
        self.fair.left(seq)

    def _preempt(self, seq: Sequence) -> None:
        # Out of KV blocks: drop the sequence's cache and recompute it later (its tokens so far are
        # kept, so the client sees no difference but a pause).
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        self.preemptions += 1
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of tokens to compute this step).

        While sequences are decoding, new prompts are admitted in a step of their own, then the decodes
        run in the next step without admissions (the two alternate while prompts keep arriving). A new
        request's first token then waits for one short prefill step instead of a decode step of the
        whole batch with its prompt mixed in, and the decode steps stay decode-only, the shape the
        compiled graph runs (a mixed step runs eagerly). That prompt step goes first to newcomers (see
        `_newcomers`), and a newcomer that arrives during a prompt step of streaming tenants gets one
        more right after it instead of waiting a whole decode step too: at most two prompt steps run
        between decode steps. Without running decodes, prompts fill the budget as they come: the
        prompts already admitted (chunked) first, then new ones."""
        self.running.sort(key=self.fair.order)
        budget = self.max_batch_prefill_tokens
        decoding = any(s.num_tokens - s.num_computed == 1 for s in self.running)
        if decoding and self.waiting and self._prompt_step_last != "newcomers":
            newcomers = self._newcomers()
            if newcomers or self._prompt_step_last is None:
                whom = "newcomers" if newcomers else "others"
                out = self._admit(budget, newcomers or list(self.waiting))
                if out:
                    self._prompt_step_last = whom
                    return out
        self._prompt_step_last = None
        out = self._continue_running(budget)
        if not decoding:
            out += self._admit(budget - sum(n for _, n in out))
        return out

    def interject(self) -> list[tuple[Sequence, int]]:
        """The newcomers' prompts (`_newcomers`: light tenants, none more urgent
        waiting) admitted for a prompt step of their own that runs inside the step in progress, between
        two of its layers; [] if there are none or none fits. Their first token then waits for part of
        that step instead of all of it.

        Only free blocks: `_admit` never preempts, and a preemption now would take blocks the step in
        progress is writing. The newcomers' cached prefixes are safe to read: a block is named for
        reuse only after the step that filled it (`advance`), and loses its name when it is handed out
        again (BlockManager.allocate), so no named block is being written by the step in progress."""
        newcomers = self._newcomers()
        out = self._admit(self.max_batch_prefill_tokens, newcomers) if newcomers else []
        if out and self._prompt_step_last is not None:
            # It interrupts a prompt step: the two make the most prompt steps between decode steps.
            self._prompt_step_last = "newcomers"
        return out

    def _continue_running(self, budget: int) -> list[tuple[Sequence, int]]:
        """The running sequences' next tokens in fair order, preempting the last in that order when
        the KV blocks run out."""
        out: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below for an earlier sequence
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n <= 0:
                continue
            total = seq.num_computed + n
            while not self.blocks.can_grow(seq, total):
                # The victim is last in fair order among those not scheduled yet (this one included).
                victim = max((s for s in self.running if s not in {o for o, _ in out}), key=self.fair.order)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.blocks.allocate(seq, total)
            out.append((seq, n))
            budget -= n
        return out

    def _newcomers(self) -> list[Sequence]:
        """The waiting sequences of light tenants, which a prompt step taken while others decode admits
        alone (a first token is what such a tenant waits for, and a flooding tenant's next prompt in the
        same step would make it wait longer); none when another tenant's sequence is more urgent. A
        light tenant has nothing running yet, or has been served less (`Fairness.less_served`) than
        every other tenant with sequences running: a person asking a question every few seconds beside
        a flood, whose previous answer is still streaming. A tenant alone, or the most served, gets its
        prompt in the next prompt step. The same rule picks whom `interject` lets in during a step."""
        busy = {s.tenant for s in self.running}

        def light(tenant: str) -> bool:
            others = busy - {tenant}
            return tenant not in busy or bool(others) and self.fair.less_served(tenant, others)

        new = [s for s in self.waiting if light(s.tenant)]
        if new and min(s.priority for s in new) <= min(s.priority for s in self.waiting):
            return new
        return []

    def _admit(self, budget: int, candidates: list[Sequence] | None = None) -> list[tuple[Sequence, int]]:
        """Waiting sequences (or those of `candidates`) admitted in fair order, while the budget, the
        batch and the blocks allow."""
        out: list[tuple[Sequence, int]] = []
        candidates = list(self.waiting) if candidates is None else candidates
        while candidates and budget > 0 and len(self.running) < self.max_batch_size:
            # One at a time: admitting charges the tenant's prompt, which may change who is next.
            seq = min(candidates, key=self.fair.order)
            cached = self.blocks.cached_prefix(seq)
            start = self.blocks.tokens_in(cached)
            n = min(seq.num_tokens - start, budget)
            if not self.blocks.can_admit(seq, cached, start + n):
                break
            self.waiting.remove(seq)
            candidates.remove(seq)
            self.blocks.admit(seq, cached, start + n)
            self.fair.admitted(seq)
            self.running.append(seq)
            out.append((seq, n))
            budget -= n
        return out

    def advance(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """After the step's forward: its tokens are in the cache, and the blocks they filled are named.
        A sequence whose tokens are all computed samples one now, and its tenant is charged for it."""
        for seq, n in scheduled:
            seq.num_computed += n
            self.blocks.register_full(seq)
            if seq.num_computed == seq.num_tokens:
                self.fair.generated(seq)
