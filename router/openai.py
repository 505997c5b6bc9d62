"""OpenAI routes: /v1/chat/completions and /v1/completions, on one envelope and one stream skeleton.

A handler reads its body, builds its jobs (jobs.py) and a dialect object (ChatDialect, CompletionDialect)
that knows what one choice looks like whole and which chunks one generated piece becomes; `respond` runs
the jobs and wraps those choices in the shared envelope, usage and `[DONE]`. The Responses API
(responses.py) shares the rest: jobs.openai_job, the structure rules (constraints.structure) and the
tool-call reader (constraints.ToolCallReader).

Chat deltas carry `role` and `tool_calls` in every chunk (the first delta's role is "assistant", later ones
an empty string, `tool_calls` null unless a call is being written): TGI's own Python client (text-generation
0.7) requires both keys in every delta, and the openai SDK's stream helper concatenates every role it is
given, so a repeated "assistant" would come out as "assistantassistant...".
"""
from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Protocol

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import sluice

from . import constraints, schemas
from .body import parse
from .errors import ApiError
from .contract import FinishReason
from .generation import Generation, Piece, collect_all, in_app
from .jobs import Job, check_candidates, completion_prompts, openai_job
from .push import event_stream
from .state import Router, router_of


def usage(prompt_tokens: int, gens: list[Generation]) -> dict:
    # The prompt is counted once however many choices share it, as OpenAI does.
    completion = sum(len(g.tokens) for g in gens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


# The router's finish reasons in OpenAI's words ("tool_calls" instead of "stop" when the answer is one).
OPENAI_FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop"}


def openai_finish(reason: FinishReason | None, tool_calls: bool = False) -> str | None:
    if tool_calls and reason in (FinishReason.EOS, FinishReason.STOP_SEQUENCE):
        return "tool_calls"
    return OPENAI_FINISH.get(reason) if reason else None


def envelope(prefix: str, job: Job, router: Router) -> dict:
    """The fields every OpenAI answer and chunk starts with."""
    return {"id": f"{prefix}-{job.request.request_id}", "created": int(time.time()), "model": router.model_id,
            "system_fingerprint": f"sluice-{sluice.__version__}"}


class Dialect(Protocol):
    """What differs between chat and completions answers; `respond` does the rest."""

    object: str
    chunk_object: str

    def choices(self, gens: list[Generation]) -> list[dict]: ...

    def opening(self, index: int) -> list[dict]: ...

    def chunks(self, index: int, piece: Piece, gen: Generation) -> list[dict]: ...


# TGI's own Python client (text-generation 0.7, over requests or aiohttp, with their User-Agents: it sends
# none of its own) parses every `data:` line of a stream as JSON, so the `[DONE]` that OpenAI's streams end
# with makes it raise after the last chunk. Streams to those two libraries end without it; every SSE client
# also stops at the end of the body, and every SDK (openai, huggingface_hub, ...) names itself.
_NO_DONE_AGENTS = re.compile(r"^python-requests/|\baiohttp/")


def done_marker(request: Request) -> str | None:
    """What ends this request's stream after the last chunk: `[DONE]`, or nothing (see _NO_DONE_AGENTS)."""
    return None if _NO_DONE_AGENTS.search(request.headers.get("user-agent", "")) else "[DONE]"


def respond(router: Router, jobs: list[Job], dialect: Dialect, head: dict, prompt_tokens: int,
            stream: bool | None, options: schemas.StreamOptions | None, done: str | None) -> Response:
    """Run the jobs (validated already: nothing here answers 422) as one JSON body or one event stream.
    `prompt_tokens` counts every prompt once, however many choices share it."""
    if not stream:
        return in_app(partial(_answer, router, jobs, dialect, head, prompt_tokens))
    include_usage = bool(options and options.include_usage)
    return event_stream(router, jobs, ChunkPlan(jobs, dialect, head, prompt_tokens, include_usage, done), hold_back=True)


async def _answer(router: Router, jobs: list[Job], dialect: Dialect, head: dict, prompt_tokens: int) -> Response:
    gens = await collect_all(router, jobs, hold_back=True)
    return JSONResponse({**head, "object": dialect.object, "choices": dialect.choices(gens),
                         "usage": usage(prompt_tokens, gens)})


class ChunkPlan:
    """An OpenAI stream (push.StreamPlan): each choice's opening chunks, each piece's, then the usage chunk
    when asked for and `done`."""

    def __init__(self, jobs: list[Job], dialect: Dialect, head: dict, prompt_tokens: int, include_usage: bool,
                 done: str | None) -> None:
        self.head = {**head, "object": dialect.chunk_object, **({"usage": None} if include_usage else {})}
        self.gens = [Generation(prompt_tokens=len(j.request.input_ids)) for j in jobs]
        self.dialect, self.prompt_tokens, self.include_usage, self.done = dialect, prompt_tokens, include_usage, done

    def opening(self) -> list[dict | str]:
        return [{**self.head, **body} for i in range(len(self.gens)) for body in self.dialect.opening(i)]

    def piece(self, index: int, piece: Piece) -> list[dict | str]:
        return [{**self.head, **body} for body in self.dialect.chunks(index, piece, self.gens[index])]

    def closing(self) -> list[dict | str]:
        usage_chunk = [{**self.head, "choices": [], "usage": usage(self.prompt_tokens, self.gens)}]
        return (usage_chunk if self.include_usage else []) + ([self.done] if self.done else [])


# ---- chat ----


def _chat_logprobs(pieces: list[tuple[dict, list[dict] | None]]) -> dict:
    return {"content": token_logprobs(pieces)}


def token_logprobs(pieces: list[tuple[dict, list[dict] | None]]) -> list[dict]:
    """OpenAI's per-token logprob entries (chat's `logprobs.content`, the Responses API's `logprobs`)."""
    return [{**_logprob_entry(t), "top_logprobs": [_logprob_entry(x) for x in top or []]} for t, top in pieces]


def _logprob_entry(token: dict) -> dict:
    return {"token": token["text"], "logprob": token["logprob"], "bytes": list(token["text"].encode())}


def chat_structure(body: schemas.ChatCompletionRequest) -> constraints.Structure:
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice
    named = None
    if isinstance(choice, dict):
        named = choice["function"].get("name") if isinstance(choice.get("function"), dict) else None
        if not isinstance(named, str):
            raise ApiError(422, "tool_choice.function.name: required for a named function")
    fmt = body.response_format
    return constraints.structure(
        [t.function.model_dump() for t in body.tools or []], "function" if named else choice, named,
        partial(_response_format_grammar, fmt), bool(fmt and fmt.type != "text"), "response_format",
        body.parallel_tool_calls)


def _response_format_grammar(fmt: schemas.ResponseFormat | None) -> str | None:
    if fmt is None:
        return None
    return constraints.format_grammar(fmt.type, fmt.json_schema or {}, "response_format",
                                      "response_format.json_schema.schema")


class ChatDialect:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, logprobs: bool, tools: bool) -> None:
        self.logprobs = logprobs
        self.tools = tools
        self.readers: dict[int, constraints.ToolCallReader] = {}  # per choice, when streaming tool calls

    def message(self, gen: Generation) -> tuple[dict, bool]:
        """(the assistant message, whether it holds tool calls)."""
        if not self.tools:
            return {"role": "assistant", "content": gen.text}, False
        content, calls = constraints.parse_tool_calls(gen.text)
        tool_calls = [{"id": constraints.new_call_id(), "type": "function",
                       "function": {"name": name, "arguments": arguments}} for name, arguments in calls]
        return {"role": "assistant", "content": content, **({"tool_calls": tool_calls} if calls else {})}, bool(calls)

    def choices(self, gens: list[Generation]) -> list[dict]:
        choices = []
        for i, gen in enumerate(gens):
            msg, called = self.message(gen)
            logprobs = _chat_logprobs(list(zip(gen.tokens, gen.top_tokens or [None] * len(gen.tokens))))
            choices.append({"index": i, "message": msg, "logprobs": logprobs if self.logprobs else None,
                            "finish_reason": openai_finish(gen.finish_reason, called)})
        return choices

    def opening(self, index: int) -> list[dict]:
        return [self._chunk(index, {"role": "assistant", "content": ""})]

    def chunks(self, index: int, piece: Piece, gen: Generation) -> list[dict]:
        """The piece's delta, and on the last piece a chunk of its own with the finish reason and a delta
        with nothing in it, as OpenAI sends it (the SDK's stream helper closes a tool call's arguments on
        that chunk)."""
        if self.tools:
            return self._tool_chunks(index, piece, gen)
        out = [self._chunk(index, {"content": piece.text}, piece)] if piece.text else []
        if piece.finish_reason:
            # The last token's logprobs go with its text, or with the finish when it shows none.
            out.append(self._chunk(index, {}, None if piece.text else piece, openai_finish(piece.finish_reason)))
        return out

    def _tool_chunks(self, index: int, piece: Piece, gen: Generation) -> list[dict]:
        """Calls stream as they are written, each under its own `index`: a first delta with its id and name
        once the name is complete, then its arguments' text. An answer in text (`no_tool`) is only known
        whole, at the end."""
        reader = self.readers.setdefault(index, constraints.ToolCallReader())
        progress = reader.add(piece.text) + (reader.finish() if piece.finish_reason else [])
        out = []
        for k, name, arguments in progress:
            call = {"index": k, "id": constraints.new_call_id(), "type": "function",
                    "function": {"name": name, "arguments": ""}} if name is not None else \
                {"index": k, "function": {"arguments": arguments}}
            out.append(self._chunk(index, {"tool_calls": [call]}))
        if piece.finish_reason:
            if not reader.calling:
                out.append(self._chunk(index, {"content": constraints.parse_tool_calls(gen.text)[0]}))
            out.append(self._chunk(index, {}, None, openai_finish(piece.finish_reason, reader.calling)))
        return out

    def _chunk(self, index: int, delta: dict, piece: Piece | None = None, finish: str | None = None) -> dict:
        lp = _chat_logprobs([(piece.token, piece.top_tokens)]) if self.logprobs and piece and piece.token else None
        # Every delta has both keys (see the module's docstring): the role only in the opening one.
        delta = {"role": "", "tool_calls": None, **delta}
        return {"choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}


async def chat_completions(request: Request) -> Response:
    router = router_of(request)
    body = await parse(request, schemas.ChatCompletionRequest)
    shape = chat_structure(body)
    prompt = router.chat_prompt(body.messages, shape.functions or None, shape.system_prompt())
    ids = router.encode(prompt, add_special_tokens=False)  # the template already placed them
    if body.top_logprobs and not body.logprobs:
        raise ApiError(422, "top_logprobs: needs logprobs to be true")
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    job = openai_job(router, body, ids, prompt, body.max_completion_tokens or body.max_tokens, top_n, shape.grammar)
    job.tools = shape.tools
    return respond(router, job.copies(body.n or 1), ChatDialect(bool(body.logprobs), job.tools),
                   envelope("chatcmpl", job, router), len(ids), body.stream, body.stream_options, done_marker(request))


# ---- completions ----


def _completion_logprobs(tokens: list[dict], tops: list[list[dict] | None], offset: int) -> dict:
    """OpenAI's legacy shape: parallel lists, `text_offset` counting characters from the start of the
    returned text's context (the prompt's end, or its start when echoed). Each `top_logprobs` entry holds the
    token's alternatives and the token itself, as OpenAI's do (up to `logprobs` + 1 of them: `logprobs: 0`
    gives each token its own); null for a token without a logprob (an echoed prompt's first)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t["text"])
    return {"tokens": [t["text"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [None if t["logprob"] is None else
                             {**{x["text"]: x["logprob"] for x in top or []}, t["text"]: t["logprob"]}
                             for t, top in zip(tokens, tops)],
            "text_offset": offsets}


class CompletionDialect:
    """Choices of one or several prompts, prompt-major: prompt p's j-th choice has index p * n + j. A job
    (generation) i belongs to prompt i // candidates; streamed, candidates are n, so its index is i."""

    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, body: schemas.CompletionRequest, prompts: list[str], n: int, candidates: int,
                 empty_token: dict) -> None:
        self.logprobs = body.logprobs
        self.echo = bool(body.echo)
        self.echo_logprobs = bool(body.echo and body.logprobs is not None)
        self.prompts = prompts
        self.n = n
        self.candidates = candidates
        self.empty_token = empty_token  # what a final piece without a token of its own shows
        jobs = len(prompts) * candidates
        self.offsets = [len(self._prompt(i)) for i in range(jobs)]
        self.first = [True] * jobs

    def _prompt(self, job: int) -> str:
        return self.prompts[job // self.candidates]

    def _echo(self, job: int) -> str:
        return self._prompt(job) if self.echo else ""

    def choices(self, gens: list[Generation]) -> list[dict]:
        out = []
        for p in range(len(self.prompts)):
            mine = list(enumerate(gens))[p * self.candidates:(p + 1) * self.candidates]
            # best_of: keep the n likeliest candidates; usage counts every token generated.
            kept = sorted(mine, key=lambda ig: -ig[1].logprob_sum)[: self.n] if len(mine) > self.n else mine
            out += [{"index": p * self.n + j, "text": self._echo(i) + g.text, "logprobs": self._whole_logprobs(i, g),
                     "finish_reason": openai_finish(g.finish_reason)} for j, (i, g) in enumerate(kept)]
        return out

    def _whole_logprobs(self, job: int, gen: Generation) -> dict | None:
        if self.logprobs is None:
            return None
        tops = gen.top_tokens or [None] * len(gen.tokens)
        if self.echo_logprobs:  # the prompt's tokens first (without alternatives), the first without a logprob
            return _completion_logprobs(gen.prefill + gen.tokens, [None] * len(gen.prefill) + tops, 0)
        return _completion_logprobs(gen.tokens, tops, len(self._prompt(job)))

    def opening(self, index: int) -> list[dict]:
        return []

    def chunks(self, index: int, piece: Piece, gen: Generation) -> list[dict]:
        first = self.first[index]
        self.first[index] = False
        text = (self._echo(index) if first else "") + piece.text
        token = piece.token or self.empty_token
        logprobs = self._piece_logprobs(index, first, piece, token, gen)
        chunk = {"choices": [{"index": index, "text": text, "logprobs": logprobs,
                              "finish_reason": openai_finish(piece.finish_reason)}],
                 # TGI's token object too: the JS @huggingface/inference stream reads `r.token.text`.
                 "token": {**token, "text": text}}
        if piece.finish_reason:
            chunk["generated_text"] = self._echo(index) + gen.text
        return [chunk]

    def _piece_logprobs(self, index: int, first: bool, piece: Piece, token: dict, gen: Generation) -> dict | None:
        if self.logprobs is None:
            return None
        tokens, tops = [token], [piece.top_tokens]
        if first and self.echo_logprobs:
            tokens, tops = gen.prefill + tokens, [None] * len(gen.prefill) + tops
            self.offsets[index] = 0
        lp = _completion_logprobs(tokens, tops, self.offsets[index])
        self.offsets[index] += sum(len(t["text"]) for t in tokens)
        return lp


async def completions(request: Request) -> Response:
    router = router_of(request)
    body = await parse(request, schemas.CompletionRequest)
    n, best_of = body.n or 1, body.best_of or body.n or 1
    temperature = 1.0 if body.temperature is None else body.temperature
    check_candidates(n, best_of, bool(body.stream), temperature > 0, router.settings.max_best_of,
                     greedy_candidates_ok=True)
    prompts = completion_prompts(router, body.prompt, best_of)
    dialect = CompletionDialect(body, [text for _, text in prompts], n, best_of, router.textgen.token_dict(0, 0.0, ""))
    jobs = [job for ids, text in prompts for job in openai_job(
        router, body, ids, text, body.max_tokens, body.logprobs or 0, prompt_logprobs=dialect.echo_logprobs,
    ).copies(best_of)]
    return respond(router, jobs, dialect, envelope("cmpl", jobs[0], router), sum(len(ids) for ids, _ in prompts),
                   body.stream, body.stream_options, done_marker(request))
