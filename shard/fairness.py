"""Fair shares between tenants: the virtual token counter (Sheng et al., "Fairness in Serving Large
Language Models", OSDI 2024).

Each tenant has a counter of the weighted service it received: prompt tokens when its sequence is first
admitted, generated tokens as they are sampled, each divided by the tenant's weight. The scheduler
serves the waiting sequence whose tenant has the least, and preempts from the tenant with the most.
A tenant that becomes active (its first sequence in the engine) is lifted to the least counter among
the active tenants, so time spent idle is not banked as credit it could later spend starving others.
"""
from __future__ import annotations

from collections import Counter

from shard.sequence import Sequence

# Cost of a token, as the paper's default: a generated token costs twice a prompt token (a decode step
# is memory-bound and serial; prompt tokens are computed many at once).
PROMPT_TOKEN_COST = 1.0
GENERATED_TOKEN_COST = 2.0
# Counters of tenants with nothing in the engine are forgotten beyond this many (tenant names can come
# from a header); a forgotten tenant comes back at the least active counter, as any returning one does.
MAX_IDLE_TENANTS = 4096


class Fairness:
    def __init__(self) -> None:
        self.counters: dict[str, float] = {}
        self.active: Counter[str] = Counter()  # sequences in the engine, per tenant

    def joined(self, seq: Sequence) -> None:
        """A sequence entered the engine (before it waits)."""
        tenant = seq.tenant
        if not self.active[tenant]:
            busy = [self.counters.get(t, 0.0) for t, n in self.active.items() if n]
            # With nobody active, level with the most served: all start even when work resumes.
            floor = min(busy) if busy else max(self.counters.values(), default=0.0)
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        self.active[tenant] += 1

    def left(self, seq: Sequence) -> None:
        """A sequence finished or was cancelled."""
        self.active[seq.tenant] -= 1
        if self.active[seq.tenant] <= 0:
            del self.active[seq.tenant]
            if len(self.counters) > len(self.active) + MAX_IDLE_TENANTS:
                self.counters = {t: c for t, c in self.counters.items() if t in self.active}

    def admitted(self, seq: Sequence) -> None:
        """Charge the prompt, once: a sequence recomputed after preemption is not charged again."""
        if not seq.prompt_charged:
            seq.prompt_charged = True
            self._charge(seq, seq.prompt_len * PROMPT_TOKEN_COST)

    def generated(self, seq: Sequence) -> None:
        self._charge(seq, GENERATED_TOKEN_COST)

    def _charge(self, seq: Sequence, cost: float) -> None:
        self.counters[seq.tenant] = self.counters.get(seq.tenant, 0.0) + cost / seq.weight

    def less_served(self, tenant: str, others: set[str]) -> bool:
        """Whether `tenant`'s weighted service so far is below each of `others`'."""
        mine = self.counters.get(tenant, 0.0)
        return all(mine < self.counters.get(other, 0.0) for other in others)

    def order(self, seq: Sequence) -> tuple[int, float, int]:
        """Sort key: served first is smallest (priority, tenant's counter, arrival)."""
        return seq.priority, self.counters.get(seq.tenant, 0.0), seq.arrival
