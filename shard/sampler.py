"""Next-token choice for every sampling row of a step, vectorized across the batch.

Randomness is per sequence (one torch.Generator each, seeded from the request), so a seeded
request gives the same tokens whatever else shares its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shard.models import cpu_kernels


# Tokens by probability that a top_p filter looks at before it sorts a whole row (see choose).
CANDIDATES = 1024


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

    @property
    def uses_history(self) -> bool:
        """Whether sampling looks at the tokens so far (the penalties): only then is their tensor built."""
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)


@dataclass
class Sampled:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    finish: str | None = None  # set by the engine when this token ends the sequence


def apply_penalties(logits: torch.Tensor, history: torch.Tensor | None, p: SamplingParams) -> None:
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
    histories: list[torch.Tensor | None],
    top_n: list[int],
) -> list[Sampled]:
    """logits: float32 [n, vocab], one row per sequence that samples this step. histories: each row's
    tokens so far, where its params' `uses_history` (else None)."""
    for i, p in enumerate(params):
        if p.logit_bias is not None or p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            apply_penalties(logits[i], histories[i], p)
    temps = [p.temperature if p.do_sample else 1.0 for p in params]
    # A vocabulary-sized pass per row: skipped when no row has a temperature (greedy steps).
    scaled = logits if all(t == 1.0 for t in temps) else logits / torch.tensor(temps).unsqueeze(1)
    # The chosen token's logprob is its logit minus the row's logsumexp: the whole log_softmax only
    # for rows that return top tokens (it writes a vocabulary-sized row each).
    stats = cpu_kernels.argmax_logsumexp(scaled)  # one pass over each row on CPUs with our kernels
    chosen, lse = stats if stats is not None else (scaled.argmax(dim=-1), torch.logsumexp(scaled, dim=-1))

    rows = [i for i, p in enumerate(params) if p.do_sample]
    if rows:
        # One uniform draw per row from that sequence's own generator, then inverse-CDF sampling.
        u = torch.tensor([torch.rand(1, generator=generators[i]).item() for i in rows])
        sub = scaled[rows]
        for j, i in enumerate(rows):
            if params[i].typical_p < 1.0:
                typical_filter(sub[j], params[i].typical_p)
        chosen[rows] = choose(sub, [params[i] for i in rows], u)

    out = []
    for i in range(len(params)):
        tok = int(chosen[i])
        top: list[tuple[int, float]] = []
        if top_n[i]:
            vals, ids = (scaled[i] - lse[i]).topk(top_n[i])
            top = list(zip(ids.tolist(), vals.tolist()))
        out.append(Sampled(tok, float(scaled[i, tok] - lse[i]), top))
    return out


def choose(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of one token per row of temperature-scaled `logits` [n, vocab], with each
    row's top_k (renormalized) then top_p filter, given its uniform draw u [n].

    A row without top_k or top_p samples over the vocabulary in its own order: no sort. A filtered row
    needs its tokens by probability, but only as far as the filters reach: the top CANDIDATES (or its
    top_k) by `topk`, and a whole sort only for a row whose top_p mass lies beyond them. A full sort of
    the 49k-token SmolLM2 vocabulary took 320 ms at batch 48 on a 2-core CPU, longer than the step's
    forward; topk(1024) takes 21 ms."""
    vocab = logits.shape[1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    out = torch.empty(len(params), dtype=torch.long)
    plain = (top_k == vocab) & (top_p >= 1.0)
    if plain.any():
        probs = torch.softmax(logits[plain], dim=-1)
        cdf = probs.cumsum(-1)
        out[plain] = torch.searchsorted(cdf, u[plain].unsqueeze(1) * cdf[:, -1:]).clamp(max=vocab - 1).squeeze(1)
    filtered = (~plain).nonzero().squeeze(1)
    if len(filtered):
        asked = top_k[filtered][top_k[filtered] < vocab]
        k = min(vocab, max(int(asked.max()) if len(asked) else 0, CANDIDATES))
        vals, order = logits[filtered].topk(k, dim=-1)
        row_k, row_p = top_k[filtered].unsqueeze(1), top_p[filtered].unsqueeze(1)
        # top_k renormalizes within its k tokens; without it, the probabilities are the whole vocabulary's
        # (a softmax over the whole row, for those rows only).
        probs = torch.softmax(vals.masked_fill(torch.arange(k) >= row_k, float("-inf")), dim=-1)
        no_k = (row_k == vocab).squeeze(1)
        if no_k.any():
            probs[no_k] = torch.softmax(logits[filtered[no_k]], dim=-1).gather(1, order[no_k])
        short = no_k & (probs.sum(-1) < row_p.squeeze(1))  # top_p reaches past the k
        if short.any():
            probs, order = F.pad(probs, (0, vocab - k)), F.pad(order, (0, vocab - k))  # zeros: never drawn
            vals_s, order_s = logits[filtered[short]].sort(dim=-1, descending=True)
            probs[short], order[short] = torch.softmax(vals_s, dim=-1), order_s
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= row_p, 0.0)
        cdf = probs.cumsum(-1)
        pos = torch.searchsorted(cdf, u[filtered].unsqueeze(1) * cdf[:, -1:]).clamp(max=cdf.shape[1] - 1)
        out[filtered] = order.gather(1, pos).squeeze(1)
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
