"""How fast the engine works right now, measured over recent steps: what the router's deadline estimate
divides by (HealthResponse.prefill_tokens_per_s, decode_step_s)."""
from __future__ import annotations

# Weight of the newest step in the moving averages: about the last 20 steps count.
SMOOTHING = 0.05
# Steps with fewer prompt tokens than this say more about decode than about prefill speed.
MIN_PREFILL_TOKENS = 16


class StepRates:
    def __init__(self) -> None:
        self.prefill_tokens_per_s = 0.0  # 0 until a step has prefilled enough to measure
        self.decode_step_s = 0.0

    def observe(self, prefill_tokens: int, seconds: float) -> None:
        """One step that computed `prefill_tokens` prompt tokens (0: decode only) in `seconds`."""
        if seconds <= 0:
            return
        if prefill_tokens >= MIN_PREFILL_TOKENS:
            self.prefill_tokens_per_s = _ewma(self.prefill_tokens_per_s, prefill_tokens / seconds)
        elif prefill_tokens == 0:
            self.decode_step_s = _ewma(self.decode_step_s, seconds)


def _ewma(old: float, new: float) -> float:
    return new if old == 0 else old + SMOOTHING * (new - old)
