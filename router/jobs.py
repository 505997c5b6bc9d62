"""From a parsed body to a shard request: one set of rules for both dialects (TGI and OpenAI).

Token budget, stop sequences, top-n, vocabulary range, n/best_of candidates and sampling parameters are
checked and normalized here, once; so are the tenant and priority the shard schedules by, and the deadline
check (router/deadline.py).
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace

from . import constraints, deadline, schemas, tenants
from .contract import Sampling, ShardRequest
from .errors import ApiError, listed
from .state import Router

TGI_DEFAULT_MAX_NEW_TOKENS = 100


@dataclass
class Job:
    """One validated request, ready for the shard."""

    request: ShardRequest
    stops: list[str]
    prompt_text: str
    sampled: bool
    tools: bool = False  # the output is a tool call under constraints.tools_grammar

    def copies(self, n: int) -> list["Job"]:
        """n independent requests for n choices (or best_of candidates): seeds seed, seed+1, ... when the
        request has one (so the whole answer is reproducible), else each its own random seed."""
        out = [self]
        seed = self.request.params.seed
        for i in range(1, n):
            params = replace(self.request.params, seed=None if seed is None else (seed + i) % 2**64)
            request = replace(self.request, request_id=f"{self.request.request_id}-{i}", params=params)
            out.append(Job(request, self.stops, self.prompt_text, self.sampled, self.tools))
        return out


def check_vocab(ids: Iterable[int], vocab: int, field: str) -> None:
    """Token ids a client sent (a prompt, logit_bias keys) must be in [0, vocab); the refusal names each one
    that is not."""
    bad = list(dict.fromkeys(i for i in ids if not 0 <= i < vocab))
    if bad:
        raise ApiError(422, f"{field}: token ids must be in [0, {vocab}), got {listed(bad)}")


def check_candidates(n: int, best_of: int, stream: bool, sampled: bool, max_best_of: int,
                     greedy_candidates_ok: bool = False) -> None:
    """n choices out of best_of candidates (TGI: n is always 1).

    - best_of must be at least n;
    - extra candidates (best_of > n) are at most max_best_of and cannot be streamed;
    - extra candidates need sampling (greedy ones would all be the same) -- except where the dialect
      accepted greedy candidates before (OpenAI completions: `greedy_candidates_ok`), kept as it was.
    """
    if best_of < n:
        raise ApiError(422, f"best_of ({best_of}) must be at least n ({n})")
    if best_of == n:
        return
    if best_of > max_best_of:
        raise ApiError(422, f"best_of: at most {max_best_of}, got {best_of}")
    if stream:
        raise ApiError(422, f"best_of > {n} cannot be streamed")
    if not sampled and not greedy_candidates_ok:
        raise ApiError(422, "best_of > 1 needs sampling (do_sample or a temperature/top_k/top_p): "
                            "greedy candidates would all be the same")


def sampling(sampled: bool, temperature: float | None, **params) -> Sampling:
    """The one normalization of sampling knobs: unset ones take their neutral value; the temperature
    is 1.0 unless sampling with a non-zero one."""
    neutral = {"top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "typical_p": 1.0}
    given = {k: v for k, v in params.items() if v is not None}
    return Sampling(
        do_sample=sampled, temperature=temperature if sampled and temperature else 1.0, **{**neutral, **given}
    )


def budget(router: Router, prompt_len: int, max_new_tokens: int | None, default: int | None) -> int:
    """Check the prompt against the token limits; returns max_new_tokens (the default when unset,
    None as default meaning "all the room that is left")."""
    s = router.settings
    if prompt_len == 0:
        raise ApiError(422, "the prompt is empty: send some text to continue")
    if prompt_len > s.max_input_tokens:
        raise ApiError(422, f"the prompt has {prompt_len} tokens, more than max_input_tokens ({s.max_input_tokens})")
    room = s.max_total_tokens - prompt_len
    if max_new_tokens is None:
        max_new_tokens = room if default is None else min(default, room)
    if prompt_len + max_new_tokens > s.max_total_tokens:
        raise ApiError(422, f"prompt tokens ({prompt_len}) + max new tokens ({max_new_tokens}) must be at most "
                            f"max_total_tokens ({s.max_total_tokens})")
    return max_new_tokens


def build_job(router: Router, ids: list[int], prompt_text: str, max_new_tokens: int, stops: list[str] | None,
              sampled: bool, temperature: float | None, top_n: int = 0, grammar: str = "",
              prompt_logprobs: bool = False, ignore_eos: bool = False, priority: int | None = None,
              deadline_s: float | None = None, **params) -> Job:
    stops = [s for s in stops or [] if s]
    if len(stops) > router.settings.max_stop_sequences:
        raise ApiError(422, f"stop: at most {router.settings.max_stop_sequences} stop sequences, got {len(stops)}")
    if top_n > router.settings.max_top_n_tokens:
        raise ApiError(422, f"at most {router.settings.max_top_n_tokens} top tokens per step, asked for {top_n}")
    params = sampling(sampled, temperature, **params)
    # The tokenizer's eos can be the chat turn end that the model's own eos list lacks; ignore_eos
    # ignores both (stop_token_ids would still finish the sequence, per the proto).
    eos = None if ignore_eos else router.tokenizer.eos_token_id
    tenant = tenants.current()
    request = ShardRequest(
        request_id=uuid.uuid4().hex, input_ids=ids, params=params, max_new_tokens=max_new_tokens,
        stop_token_ids=[eos] if eos is not None else [], ignore_eos=ignore_eos, top_n_tokens=top_n,
        grammar=grammar, prompt_logprobs=prompt_logprobs,
        tenant=tenant.name, priority=priority or 0, tenant_weight=tenant.weight,
    )
    deadline.check(deadline.deadline_at(deadline_s),
                   deadline.first_token_s(router.pool.replicas, request.priority, tenant.name, len(ids)))
    return Job(request, stops, prompt_text, sampled)


def tgi_job(router: Router, body: schemas.GenerateRequest) -> Job:
    p = body.parameters or schemas.Parameters()
    if not body.inputs:
        raise ApiError(422, "inputs: must not be empty")
    ids = router.encode(body.inputs)
    if p.truncate:
        ids = ids[-p.truncate :]
    max_new = budget(router, len(ids), p.max_new_tokens, TGI_DEFAULT_MAX_NEW_TOKENS)
    # TGI samples when asked to, or when any sampling knob is moved off its neutral value.
    sampled = p.temperature != 0 and bool(
        p.do_sample or p.temperature not in (None, 1.0) or p.top_k or p.top_p not in (None, 1.0)
        or p.typical_p not in (None, 1.0)
    )
    check_candidates(1, p.best_of or 1, bool(body.stream), sampled, router.settings.max_best_of)
    if body.stream and p.decoder_input_details:
        raise ApiError(422, "decoder_input_details: not available when streaming")
    grammar = constraints.tgi_grammar(p.grammar.model_dump()) if p.grammar else ""
    return build_job(router, ids, body.inputs, max_new, p.stop, sampled, p.temperature, p.top_n_tokens or 0,
                     grammar=grammar, prompt_logprobs=bool(p.decoder_input_details),
                     top_k=p.top_k, top_p=p.top_p, repetition_penalty=p.repetition_penalty, seed=p.seed,
                     frequency_penalty=p.frequency_penalty, typical_p=p.typical_p if sampled else None,
                     priority=body.priority, deadline_s=body.deadline)


def openai_job(router: Router, body: schemas.ChatCompletionRequest | schemas.CompletionRequest, ids: list[int],
               prompt_text: str, max_tokens: int | None, top_n: int, grammar: str = "",
               prompt_logprobs: bool = False) -> Job:
    max_new = budget(router, len(ids), max_tokens, None)
    temperature = 1.0 if body.temperature is None else body.temperature
    bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    check_vocab(bias, router.vocab_size(), "logit_bias")
    return build_job(router, ids, prompt_text, max_new, body.stop_list(), temperature > 0, temperature, top_n,
                     grammar=grammar, prompt_logprobs=prompt_logprobs, ignore_eos=bool(body.ignore_eos),
                     priority=body.priority, deadline_s=body.deadline,
                     logit_bias=bias or None,
                     top_k=body.top_k, top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                     seed=body.seed, frequency_penalty=body.frequency_penalty,
                     presence_penalty=body.presence_penalty)


# Generations one completions request may start (its prompts times best_of, or n): one batch's worth at
# the shards' default --max-batch-size, so one request cannot queue an unbounded number behind it.
MAX_GENERATIONS = 64


def completion_prompts(router: Router, prompt: str | list, candidates: int) -> list[tuple[list[int], str]]:
    """Each prompt of a completions request as (ids, text). `prompt` is a string, a list of token ids, or a
    list of either (several prompts, as OpenAI and vLLM take them); each gets `candidates` generations."""
    several = isinstance(prompt, list) and bool(prompt) and not all(isinstance(x, int) for x in prompt)
    prompts = prompt if several else [prompt]
    if len(prompts) * candidates > MAX_GENERATIONS:
        raise ApiError(422, f"prompt: at most {MAX_GENERATIONS} generations per request (prompts x best_of or n), "
                            f"got {len(prompts)} x {candidates}")
    out = []
    for i, one in enumerate(prompts):
        field = f"prompt.{i}" if several else "prompt"
        if isinstance(one, str):
            if not one:
                raise ApiError(422, f"{field}: must not be empty")
            out.append((router.encode(one), one))
        else:
            check_vocab(one, router.vocab_size(), field)
            out.append((list(one), router.tokenizer.decode(one)))
    return out
