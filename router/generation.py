"""From token ids to text: incremental detokenization, stop sequences, and the per-request token loop.

Routes format what `generate()` yields; everything about turning ids into safe text pieces lives here,
and so do the helpers that run jobs for a handler (collect, collect_all, interleave, guarded, in_app).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import grpc

from . import deadline, tenants
from .contract import FinishReason, ShardRequest, Token
from .errors import ApiError
from .metrics import Metrics
from .pool import ShardError, ShardPool
from .sse import Deferred, StreamCut

if TYPE_CHECKING:  # state and jobs import this module
    from .jobs import Job
    from .state import Router

log = logging.getLogger("sluice.router")

# Decoding starts from a few prompt tokens so the first generated word keeps its leading space
# (SentencePiece drops it when a "▁word" piece is decoded alone).
PROMPT_CONTEXT_TOKENS = 5


def fast_decode(tokenizer) -> Callable[[list[int]], str]:
    """ids -> text without special tokens. The Rust tokenizer's own decode where transformers' would only
    forward to it (a third of the time: two decodes per streamed token); transformers' where it does more."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return partial(backend.decode, skip_special_tokens=True)
    return partial(tokenizer.decode, skip_special_tokens=True)


class IncrementalDecoder:
    """Text for each new token, never half a character.

    Keeps two offsets into the id list: text before `read` was already emitted, `prefix` is where the
    decode window starts. A new piece is the difference between decoding the window with and without
    the new ids; while that ends in U+FFFD the token is only part of a multi-byte character, so the
    text waits for the next token.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self._decode = fast_decode(tokenizer)
        self.ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back, broken or not: the generation is over."""
        return self._advance(final=True) if self.read < len(self.ids) else ""

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        if final:
            self.read = len(self.ids)
        return ""


class StopMatcher:
    """Finds stop sequences in the generated text.

    With `hold_back` (OpenAI routes) the stop string is never emitted: text that could still grow into
    a stop sequence waits, and the match and everything after it is cut. Without it (TGI routes) text
    is released as it comes and the match stays in the text, as TGI does.
    """

    def __init__(self, stops: list[str], hold_back: bool) -> None:
        self.stops = [s for s in stops if s]
        self.hold_back = hold_back and bool(self.stops)
        self.text = ""
        self.released = 0
        self._longest = max((len(s) for s in self.stops), default=0)

    def add(self, piece: str) -> tuple[str, bool]:
        """Append a piece; returns (text to emit now, whether a stop sequence matched)."""
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits and self.hold_back:
            self.text = self.text[: min(hits)]
            return self._release(len(self.text)), True
        if not self.hold_back:
            return self._release(len(self.text)), bool(hits)
        return self._release(len(self.text) - self._partial_stop_len()), False

    def finish(self) -> str:
        return self._release(len(self.text))

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that is the start of some stop sequence."""
        for n in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        out, self.released = self.text[self.released : upto], upto
        return out


@dataclass
class Piece:
    """One generated token as a route sees it. `text` is what may be shown now (it can be empty while
    a character or a possible stop sequence is incomplete); `token` is None only for a final piece
    that carries no token of its own."""

    token: dict | None
    text: str
    finish_reason: FinishReason | None = None  # on the last piece only
    top_tokens: list[dict] | None = None


@dataclass
class Generation:
    """What a finished (or running) request accumulated, for non-streamed bodies and usage counts."""

    prompt_tokens: int
    seed: int | None = None
    text: str = ""
    tokens: list[dict] = field(default_factory=list)
    top_tokens: list[list[dict]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prefill: list[dict] = field(default_factory=list)  # prompt tokens with logprobs, when asked for

    @property
    def logprob_sum(self) -> float:
        return sum(t["logprob"] for t in self.tokens)


class TextGenerator:
    def __init__(self, tokenizer, pool: ShardPool, metrics: Metrics) -> None:
        self.tokenizer = tokenizer
        self.pool = pool
        self.metrics = metrics
        self.special_ids = set(tokenizer.all_special_ids)

    def token_dict(self, token_id: int, logprob: float, text: str) -> dict:
        return {"id": token_id, "text": text, "logprob": logprob, "special": token_id in self.special_ids}

    def _top_tokens(self, token: Token) -> list[dict]:
        return [
            self.token_dict(t.id, t.logprob, self.tokenizer.decode([t.id], skip_special_tokens=False))
            for t in token.top_tokens
        ]

    async def generate(
        self, request: ShardRequest, stops: list[str], hold_back: bool, gen: Generation
    ) -> AsyncIterator[Piece]:
        """Yield one Piece per generated token; the last one has `finish_reason`. Fills `gen` as it goes.
        Returning early (a stop sequence, or the consumer going away) cancels the shard call."""
        decoder = IncrementalDecoder(self.tokenizer, list(request.input_ids))
        matcher = StopMatcher(stops, hold_back)
        m = self.metrics
        start = last = time.perf_counter()
        m.queue.inc()
        waiting = first = True
        replies = self.pool.generate(request)
        at = deadline.AT.get()  # the request's deadline: the shard call is cancelled when it passes
        if at is not None:
            replies = deadline.until(at, replies)
        try:
            async for reply in replies:
                now = time.perf_counter()
                if first:  # prompt length and the seed actually used come with the first message
                    gen.prompt_tokens = reply.prompt_tokens or gen.prompt_tokens
                    gen.seed = reply.seed  # the request's seed, or the one the shard picked (proto)
                    gen.prefill = [self.token_dict(t.id, None if math.isnan(t.logprob) else t.logprob,
                                                   self.tokenizer.decode([t.id], skip_special_tokens=False))
                                   for t in reply.prefill]
                    first = False
                    tenants.charge(gen.prompt_tokens, "prompt")
                if reply.tokens:
                    tenants.charge(len(reply.tokens), "generated")
                    if waiting:
                        m.queue.dec()
                        waiting = False
                        m.ttft.observe(now - start)
                    else:
                        for _ in reply.tokens:
                            m.itl.observe((now - last) / len(reply.tokens))
                    last = now
                # The shard's last message carries the last token and the finish reason (shard.proto).
                finish = reply.finish_reason
                for i, token in enumerate(reply.tokens):
                    text, stopped = matcher.add(decoder.add(token.id))
                    reason = FinishReason.STOP_SEQUENCE if stopped else \
                        (finish if i == len(reply.tokens) - 1 else None)
                    is_last = reason is not None
                    if is_last and not stopped:
                        text += matcher.add(decoder.flush())[0] + matcher.finish()
                    piece = Piece(self.token_dict(token.id, token.logprob, text), text, reason)
                    if request.top_n_tokens:
                        piece.top_tokens = self._top_tokens(token)
                        gen.top_tokens.append(piece.top_tokens)
                    gen.tokens.append(piece.token)
                    gen.text += text
                    if is_last:
                        gen.finish_reason = reason
                    yield piece
                    if is_last:
                        return
                if finish is not None:  # a last message without tokens
                    text = matcher.add(decoder.flush())[0] + matcher.finish()
                    gen.text += text
                    gen.finish_reason = finish
                    yield Piece(None, text, finish)
                    return
            # The stream ended without a finish reason: the shard went away mid-request.
            raise IncompleteGeneration("the shard closed the stream before the generation finished")
        except deadline.DeadlinePassed as exc:
            raise IncompleteGeneration(str(exc)) from exc
        finally:
            if waiting:
                m.queue.dec()
            m.generated_tokens.observe(len(gen.tokens))
            m.input_length.observe(gen.prompt_tokens or len(request.input_ids))


class IncompleteGeneration(RuntimeError):
    pass


# ---- running jobs for the handlers ----


async def collect(router: Router, job: Job, hold_back: bool) -> Generation:
    """Run a whole generation for a non-streamed answer."""
    gen = Generation(prompt_tokens=len(job.request.input_ids))
    try:
        async for _ in router.textgen.generate(job.request, job.stops, hold_back, gen):
            pass
    except ShardError as exc:
        if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
            raise ApiError(422, str(exc)) from exc
        log.warning("generation failed: %s", exc)
        raise ApiError(500, str(exc), "generation") from exc
    except IncompleteGeneration as exc:
        log.warning("generation failed: %s", exc)
        raise ApiError(500, str(exc), "incomplete_generation") from exc
    return gen


async def guarded(events: AsyncIterator[dict | str], done: str | None = None) -> AsyncIterator[dict | str]:
    """Turn a failure mid-stream into a final error event: the status line (200) is long gone."""
    try:
        async for event in events:
            yield event
    except (ShardError, IncompleteGeneration, StreamCut) as exc:
        kind = "incomplete_generation" if isinstance(exc, IncompleteGeneration) else "generation"
        log.warning("stream failed: %s", exc)
        yield {"error": str(exc), "error_type": kind}
        if done:
            yield done
    except Exception as exc:
        log.exception("stream failed")
        yield {"error": f"internal error: {exc}", "error_type": "generation"}
        if done:
            yield done
    finally:
        await events.aclose()


def in_app(compute) -> Deferred:
    """A non-streamed answer computed inside the response (cancelled if the client leaves); an ApiError it
    raises reaches the app's handler (app.on_api_error), which answers in the route's dialect."""
    return Deferred(compute)


async def collect_all(router: Router, jobs: list[Job], hold_back: bool) -> list[Generation]:
    """Several generations at once (n choices, best_of candidates): they share the shard's batch."""
    return list(await asyncio.gather(*(collect(router, job, hold_back) for job in jobs)))


async def interleave(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """(index, piece) from several generations as each arrives; leaving early cancels them all."""
    if len(streams) == 1:  # the common case, without a task and a queue hop per token
        try:
            async for piece in streams[0]:
                yield 0, piece
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[Piece]) -> None:
        try:
            async for piece in stream:
                queue.put_nowait((i, piece))
            queue.put_nowait((i, done))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
