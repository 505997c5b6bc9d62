"""Next-token choice for every sampling row of a step, vectorized across the batch.

Randomness is per sequence (one torch.Generator each, seeded from the request), so a seeded
request gives the same tokens whatever else shares its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    typical_p: float = 1.0
    # OpenAI logit_bias as (token ids, values) tensors, built once per request; None = no bias.
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Sampled:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    finish: str | None = None  # set by the engine when this token ends the sequence


def apply_penalties(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams) -> None:
    """In place, on one row: logit bias, CTRL repetition penalty, then OpenAI frequency/presence penalties."""
    if p.logit_bias is not None:
        logits.index_add_(0, *p.logit_bias)
    if p.repetition_penalty != 1.0:
        seen = history.unique()
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.frequency_penalty or p.presence_penalty:
        counts = torch.bincount(history, minlength=logits.shape[0])[: logits.shape[0]].float()
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[torch.Tensor],
    top_n: list[int],
) -> list[Sampled]:
    """logits: float32 [n, vocab], one row per sequence that samples this step."""
    for i, p in enumerate(params):
        if p.logit_bias is not None or p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            apply_penalties(logits[i], histories[i], p)
    temps = torch.tensor([p.temperature if p.do_sample else 1.0 for p in params]).unsqueeze(1)
    scaled = logits / temps
    logprobs = torch.log_softmax(scaled, dim=-1)
    chosen = scaled.argmax(dim=-1)

    rows = [i for i, p in enumerate(params) if p.do_sample]
    if rows:
        sub = scaled[rows]
        for j, i in enumerate(rows):
            if params[i].typical_p < 1.0:
                typical_filter(sub[j], params[i].typical_p)
        sorted_logits, order = sub.sort(dim=-1, descending=True)
        ranks = torch.arange(sub.shape[1])
        top_k = torch.tensor([params[i].top_k or sub.shape[1] for i in rows]).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        top_p = torch.tensor([params[i].top_p for i in rows]).unsqueeze(1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
        cdf = probs.cumsum(-1)
        # One uniform draw per row from that sequence's own generator, then inverse-CDF sampling.
        u = torch.tensor([[torch.rand(1, generator=generators[i]).item()] for i in rows])
        pos = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=sub.shape[1] - 1)
        chosen[rows] = order.gather(1, pos).squeeze(1)

    out = []
    for i in range(len(params)):
        tok = int(chosen[i])
        top: list[tuple[int, float]] = []
        if top_n[i]:
            vals, ids = logprobs[i].topk(top_n[i])
            top = list(zip(ids.tolist(), vals.tolist()))
        out.append(Sampled(tok, float(logprobs[i, tok]), top))
    return out


def typical_filter(row: torch.Tensor, mass: float) -> None:
    """In place: keep the tokens whose surprise is closest to the entropy, up to `mass` of probability
    (Meister et al., "Locally typical sampling"; what TGI's and transformers' typical_p do)."""
    logp = torch.log_softmax(row, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).nansum()
    order = (-logp - entropy).abs().argsort()
    keep = int((p[order].cumsum(-1) < mass).sum()) + 1
    row[order[keep:]] = float("-inf")
