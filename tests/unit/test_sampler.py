"""shard/sampler.py's `choose` against the plain definition of top_k/top_p sampling: sort the whole row,
keep the top_k and renormalize, keep the smallest prefix reaching top_p, draw by inverse CDF. `choose`
avoids the sort (topk of a few candidates, or no order at all without filters); the tokens must not change
for filtered rows, and an unfiltered row must still follow the softmax."""
from __future__ import annotations

import torch

from shard.sampler import CANDIDATES, SamplingParams, choose


def by_full_sort(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    top_k = torch.tensor([p.top_k or vocab for p in params]).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(torch.arange(vocab) >= top_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = torch.tensor([p.top_p for p in params]).unsqueeze(1)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    pos = torch.searchsorted(cdf, u.unsqueeze(1) * cdf[:, -1:]).clamp(max=vocab - 1)
    return order.gather(1, pos).squeeze(1)


def test_filtered_rows_draw_what_a_full_sort_draws():
    gen = torch.Generator().manual_seed(0)
    vocab = 8 * CANDIDATES
    # Peaked rows (the nucleus within the candidates) and flat ones (top_p reaches past them: a whole sort).
    peaked = torch.randn(6, vocab, generator=gen) * 6
    flat = torch.randn(6, vocab, generator=gen) * 0.1
    logits = torch.cat([peaked, flat])
    settings = [(50, 1.0), (0, 0.9), (7, 0.5), (0, 0.99), (3000, 0.95), (1, 1.0)] * 2
    params = [SamplingParams(do_sample=True, top_k=k, top_p=p) for k, p in settings]
    for _ in range(20):
        u = torch.rand(len(params), generator=gen)
        assert choose(logits.clone(), params, u).tolist() == by_full_sort(logits, params, u).tolist()


def test_a_row_without_filters_follows_the_softmax():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5]])
    expected = torch.softmax(logits[0], dim=-1)
    gen = torch.Generator().manual_seed(1)
    draws = 20000
    counts = torch.zeros(5)
    for _ in range(draws // 500):
        u = torch.rand(500, generator=gen)
        picks = choose(logits.expand(500, -1).clone(), [SamplingParams(do_sample=True)] * 500, u)
        counts += torch.bincount(picks, minlength=5)
    assert torch.allclose(counts / draws, expected, atol=0.015), (counts / draws, expected)


def test_mixed_batch_gives_each_row_its_own_rule():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3000, generator=gen) * 4
    params = [SamplingParams(do_sample=True), SamplingParams(do_sample=True, top_k=1),
              SamplingParams(do_sample=True, top_p=0.8), SamplingParams(do_sample=True, top_k=1)]
    u = torch.rand(4, generator=gen)
    got = choose(logits.clone(), params, u)
    assert got[1] == logits[1].argmax() and got[3] == logits[3].argmax()  # top_k=1 is greedy
    assert by_full_sort(logits[2:3], params[2:3], u[2:3]).item() == got[2]
