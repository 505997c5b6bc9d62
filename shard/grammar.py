"""Constrained decoding with llguidance: one matcher per constrained sequence, its allowed-token mask
applied to that sequence's logits row before sampling, and each sampled token fed back to it.

The router turns JSON schemas, regexes and tool lists into llguidance grammars; the shard only needs
the tokenizer's vocabulary (token bytes) for the matcher, never text.
"""
from __future__ import annotations

import threading

import llguidance
import torch

from shard.models import cpu_kernels
from sluice.modelfiles import ModelSource, load_tokenizer


class GrammarCompiler:
    """Builds matchers for one model. The vocabulary is loaded on the first constrained request (a GGUF
    tokenizer takes seconds to convert), off the engine thread."""

    def __init__(self, source: ModelSource, vocab_size: int) -> None:
        self.source = source
        self.vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                # Imported on the first constrained request, off the engine thread, not at every shard's
                # start: llguidance.hf imports transformers, and llguidance.torch torch.compiles a kernel
                # at import (one we do not use), which loads dynamo and inductor: ~3 s together.
                import llguidance.hf
                import llguidance.torch  # noqa: F401  (mask_logits's, imported here off the engine thread)

                self._tokenizer = llguidance.hf.from_tokenizer(load_tokenizer(self.source), n_vocab=self.vocab_size)
            return self._tokenizer

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """Raises ValueError when the grammar does not compile."""
        matcher = llguidance.LLMatcher(self.tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"grammar: {matcher.get_error()}")
        return matcher


_BITS = torch.arange(32, dtype=torch.int32)


def mask_logits(logits: torch.Tensor, matchers: list[llguidance.LLMatcher]) -> None:
    """In place: -inf for every token each row's matcher forbids. logits: [len(matchers), vocab]."""
    import llguidance.torch  # already imported by GrammarCompiler.tokenizer (see there)

    vocab = logits.shape[1]
    bitmask = torch.full(((len(matchers)), (vocab + 31) // 32), -1, dtype=torch.int32)
    for i, m in enumerate(matchers):
        llguidance.torch.fill_next_token_bitmask(m, bitmask, i)
    if cpu_kernels.mask_logits(logits, bitmask):  # 16 rows, 49k vocabulary: ~0.05 ms against 0.6-2 ms below
        return
    allowed = ((bitmask.unsqueeze(-1) >> _BITS) & 1).view(len(matchers), -1)[:, :vocab]
    logits.masked_fill_(allowed == 0, float("-inf"))
