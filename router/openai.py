"""OpenAI routes: /v1/chat/completions and /v1/completions."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import sluice

from . import constraints, schemas
from .body import parse
from .errors import ApiError
from .contract import FinishReason
from .generation import Generation, Piece, collect_all, guarded, in_app, interleave
from .jobs import check_candidates, completion_prompt, openai_job
from .sse import EventStream
from .state import router_of


def _usage(prompt_tokens: int, gens: list[Generation]) -> dict:
    # The prompt is counted once however many choices share it, as OpenAI does.
    completion = sum(len(g.tokens) for g in gens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


# The router's finish reasons in OpenAI's words ("tool_calls" instead of "stop" when the answer is one).
OPENAI_FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop"}


def _openai_finish(reason: FinishReason | None, tool_calls: bool = False) -> str | None:
    if tool_calls and reason in (FinishReason.EOS, FinishReason.STOP_SEQUENCE):
        return "tool_calls"
    return OPENAI_FINISH.get(reason) if reason else None


def _chat_logprobs(pieces: list[tuple[dict, list[dict] | None]]) -> dict:
    def entry(token: dict) -> dict:
        return {"token": token["text"], "logprob": token["logprob"], "bytes": list(token["text"].encode())}

    return {"content": [{**entry(t), "top_logprobs": [entry(x) for x in top or []]} for t, top in pieces]}


def _chat_grammar(body: schemas.ChatCompletionRequest) -> tuple[str, list[dict], bool]:
    """(grammar, the functions offered, whether the answer is a tool call under constraints.tools_grammar)."""
    if body.tools and body.response_format and body.response_format.type != "text":
        raise ApiError(422, "response_format: cannot be combined with tools")
    if body.tools:
        choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice
        functions, allow_text = constraints.chosen_tools([t.model_dump() for t in body.tools], choice)
        if functions:
            return constraints.tools_grammar(functions, allow_text), functions, allow_text
    elif body.tool_choice not in (None, "none", "auto"):
        raise ApiError(422, "tool_choice: needs tools")
    if body.response_format:
        return constraints.response_format_grammar(body.response_format.model_dump()) or "", [], False
    return "", [], False


async def chat_completions(request: Request) -> Response:
    router = router_of(request)
    body = await parse(request, schemas.ChatCompletionRequest)
    grammar, functions, allow_text = _chat_grammar(body)
    tool_system = constraints.tool_system_prompt(functions, allow_text) if functions else None
    prompt = router.chat_prompt(body.messages, functions or None, tool_system)
    ids = router.encode(prompt, add_special_tokens=False)  # the template already placed them
    if body.top_logprobs and not body.logprobs:
        raise ApiError(422, "top_logprobs: needs logprobs to be true")
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    job = openai_job(router, body, ids, prompt, body.max_completion_tokens or body.max_tokens, top_n, grammar)
    job.tools = bool(functions)
    jobs = job.copies(body.n or 1)
    base = {"id": f"chatcmpl-{job.request.request_id}", "created": int(time.time()), "model": router.model_id,
            "system_fingerprint": f"sluice-{sluice.__version__}"}

    def message(gen: Generation) -> tuple[dict, bool]:
        if not job.tools:
            return {"role": "assistant", "content": gen.text}, False
        content, calls = constraints.parse_tool_call(gen.text)
        return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}, bool(calls)

    if not body.stream:
        async def compute() -> Response:
            gens = await collect_all(router, jobs, hold_back=True)
            choices = []
            for i, gen in enumerate(gens):
                msg, called = message(gen)
                logprobs = _chat_logprobs(list(zip(gen.tokens, gen.top_tokens or [None] * len(gen.tokens))))
                choices.append({"index": i, "message": msg, "logprobs": logprobs if body.logprobs else None,
                                "finish_reason": _openai_finish(gen.finish_reason, called)})
            return JSONResponse({**base, "object": "chat.completion", "choices": choices,
                                 "usage": _usage(len(ids), gens)})

        return in_app(compute)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk = {**base, "object": "chat.completion.chunk"}
    if include_usage:
        chunk["usage"] = None

    def choice(index: int, delta: dict, piece: Piece | None = None, finish: str | None = None) -> dict:
        lp = _chat_logprobs([(piece.token, piece.top_tokens)]) if body.logprobs and piece and piece.token else None
        return {**chunk, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

    async def events() -> AsyncIterator[dict | str]:
        gens = [Generation(prompt_tokens=len(ids)) for _ in jobs]
        for i in range(len(jobs)):
            yield choice(i, {"role": "assistant", "content": ""})
        streams = [router.textgen.generate(j.request, j.stops, True, g) for j, g in zip(jobs, gens)]
        async for i, piece in interleave(streams):
            if job.tools:
                # A tool call is only known once its JSON is complete: it goes out whole, in one delta
                # (OpenAI's format; clients accumulate deltas, so one is as good as many).
                if piece.finish_reason:
                    msg, called = message(gens[i])
                    delta = {"tool_calls": [{"index": 0, **c} for c in msg["tool_calls"]]} if called else \
                        {"content": msg["content"]}
                    yield choice(i, delta, None, _openai_finish(piece.finish_reason, called))
            elif piece.finish_reason:
                yield choice(i, {"content": piece.text} if piece.text else {}, piece, _openai_finish(piece.finish_reason))
            elif piece.text:
                yield choice(i, {"content": piece.text}, piece)
        if include_usage:
            yield {**chunk, "choices": [], "usage": _usage(len(ids), gens)}
        yield "[DONE]"

    return EventStream(guarded(events(), done="[DONE]"))


def _completion_logprobs(tokens: list[dict], tops: list[list[dict]] | None, offset: int) -> dict:
    """OpenAI's legacy shape: parallel lists, `text_offset` counting characters from the start of the
    returned text's context (the prompt's end, or its start when echoed)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t["text"])
    return {"tokens": [t["text"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{x["text"]: x["logprob"] for x in top} if top is not None else None for top in tops]
            if tops else None,
            "text_offset": offsets}


async def completions(request: Request) -> Response:
    router = router_of(request)
    body = await parse(request, schemas.CompletionRequest)
    ids, prompt = completion_prompt(router, body.prompt)
    n, best_of = body.n or 1, body.best_of or body.n or 1
    temperature = 1.0 if body.temperature is None else body.temperature
    check_candidates(n, best_of, bool(body.stream), temperature > 0, router.settings.max_best_of,
                     greedy_candidates_ok=True)
    if body.echo and body.logprobs:
        raise ApiError(422, "logprobs: with echo only 0 is supported (prompt tokens come without alternatives)")
    echo_logprobs = bool(body.echo and body.logprobs is not None)
    job = openai_job(router, body, ids, prompt, body.max_tokens, body.logprobs or 0, prompt_logprobs=echo_logprobs)
    jobs = job.copies(best_of)
    echo = prompt if body.echo else ""
    base = {"id": f"cmpl-{job.request.request_id}", "created": int(time.time()), "model": router.model_id,
            "system_fingerprint": f"sluice-{sluice.__version__}"}

    def logprobs(gen: Generation) -> dict | None:
        if body.logprobs is None:
            return None
        if echo_logprobs:  # the prompt's tokens first, the first of them without a logprob
            return _completion_logprobs(gen.prefill + gen.tokens, None, 0)
        return _completion_logprobs(gen.tokens, gen.top_tokens, len(prompt))

    if not body.stream:
        async def compute() -> Response:
            gens = await collect_all(router, jobs, hold_back=True)
            # best_of: keep the n likeliest candidates; usage counts every token generated.
            kept = sorted(gens, key=lambda g: -g.logprob_sum)[:n] if best_of > n else gens
            choices = [{"index": i, "text": echo + g.text,
                        "logprobs": logprobs(g),
                        "finish_reason": _openai_finish(g.finish_reason)} for i, g in enumerate(kept)]
            return JSONResponse({**base, "object": "text_completion", "choices": choices,
                                 "usage": _usage(len(ids), gens)})

        return in_app(compute)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[dict | str]:
        gens = [Generation(prompt_tokens=len(ids)) for _ in jobs]
        offsets = [len(prompt)] * len(jobs)
        first = [True] * len(jobs)
        streams = [router.textgen.generate(j.request, j.stops, True, g) for j, g in zip(jobs, gens)]
        async for i, piece in interleave(streams):
            text = (echo if first[i] else "") + piece.text
            token = piece.token or router.textgen.token_dict(0, 0.0, "")
            lp = None
            if body.logprobs is not None:
                tokens = [token]
                if first[i] and echo_logprobs:
                    tokens = gens[i].prefill + tokens
                    offsets[i] = 0
                lp = _completion_logprobs(tokens, [piece.top_tokens] if piece.top_tokens else None, offsets[i])
                offsets[i] += sum(len(t["text"]) for t in tokens)
            first[i] = False
            chunk = {**base, "object": "text_completion",
                     "choices": [{"index": i, "text": text, "logprobs": lp,
                                  "finish_reason": _openai_finish(piece.finish_reason)}],
                     # TGI's token object too: the JS @huggingface/inference stream reads `r.token.text`.
                     "token": {**token, "text": text}}
            if piece.finish_reason:
                chunk["generated_text"] = echo + gens[i].text
            if include_usage:
                chunk["usage"] = None
            yield chunk
        if include_usage:
            yield {**base, "object": "text_completion", "choices": [], "usage": _usage(len(ids), gens)}
        yield "[DONE]"

    return EventStream(guarded(events(), done="[DONE]"))
