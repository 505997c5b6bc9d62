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
from tokenizers.decoders import DecodeStream

from . import deadline, tenants
from .contract import FinishReason, Reply, ShardRequest, Token
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


def _rust_backend(tokenizer):
    """The Rust tokenizer behind a transformers one, where transformers' decode would only forward to it
    (it does more where it cleans up spaces); None otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if getattr(tokenizer, "clean_up_tokenization_spaces", False) else backend


def fast_decode(tokenizer) -> Callable[[list[int]], str]:
    """ids -> text without special tokens: the Rust tokenizer's own decode where it gives what
    transformers' would (a third of the time), transformers' where it does more."""
    backend = _rust_backend(tokenizer)
    if backend is not None:
        return partial(backend.decode, skip_special_tokens=True)
    return partial(tokenizer.decode, skip_special_tokens=True)


def incremental_decoder(tokenizer, prompt_ids: list[int]) -> StreamDecoder | IncrementalDecoder:
    """The decoder of one generation's text: tokenizers' own streaming decoder where the Rust tokenizer
    decodes as transformers would (one call a token: 0.5 us against 1.5 for two decodes in a hot loop, and
    every microsecond of the router's counts at 16 streams on 2 cores), else the same rule in Python."""
    backend = _rust_backend(tokenizer)
    if backend is not None:
        return StreamDecoder(backend, prompt_ids)
    return IncrementalDecoder(tokenizer, prompt_ids)


class StreamDecoder:
    """Text for each new token, never half a character: tokenizers.decoders.DecodeStream, which keeps the
    same two offsets as IncrementalDecoder (in Rust), started from the prompt's last few tokens."""

    def __init__(self, backend, prompt_ids: list[int]) -> None:
        self._backend = backend
        self._stream = DecodeStream(ids=list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]), skip_special_tokens=True)
        self._held: list[int] = []  # tokens since the last text: part of a character, or special

    def add(self, token_id: int) -> str:
        text = self._stream.step(self._backend, token_id)
        if text is None:
            self._held.append(token_id)
            return ""
        if self._held:
            self._held = []
        return text

    def flush(self) -> str:
        """Whatever is still held back, broken or not: the generation is over."""
        held, self._held = self._held, []
        return self._backend.decode(held, skip_special_tokens=True) if held else ""


class IncrementalDecoder:
    """Text for each new token, never half a character, for tokenizers that only transformers decodes right.

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
        if not self.stops:  # nothing to find or hold: the text goes as it comes
            return piece, False
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

    def top_tokens(self, token: Token) -> list[dict]:
        return [
            self.token_dict(t.id, t.logprob, self.tokenizer.decode([t.id], skip_special_tokens=False))
            for t in token.top_tokens
        ]

    async def generate(
        self, request: ShardRequest, stops: list[str], hold_back: bool, gen: Generation
    ) -> AsyncIterator[Piece]:
        """Yield one Piece per generated token; the last one has `finish_reason`. Fills `gen` as it goes.
        Returning early (a stop sequence, or the consumer going away) cancels the shard call."""
        pieces = PieceMaker(self, request, stops, hold_back, gen)
        replies = self.pool.generate(request)
        at = deadline.AT.get()  # the request's deadline: the shard call is cancelled when it passes
        if at is not None:
            replies = deadline.until(at, replies)
        try:
            async for reply in replies:
                for piece in pieces.add(reply):
                    yield piece
                if pieces.finished:
                    return
            raise IncompleteGeneration(SHARD_WENT_AWAY)
        except deadline.DeadlinePassed as exc:
            raise IncompleteGeneration(str(exc)) from exc
        finally:
            pieces.close()
            await replies.aclose()


SHARD_WENT_AWAY = "the shard closed the stream before the generation finished"


# Generated tokens are counted to the tenant this many at a time (and the rest when the request ends): its
# tokens_per_minute window counts by the second, and a count a token cost ~1.5 us of the router's CPU.
CHARGE_EVERY = 16


class PieceMaker:
    """The shard's replies for one request, made into Pieces (decoded text, stop sequences, the last piece's
    finish reason), counted in the metrics and the tenant's usage, and kept in its Generation. Plain calls:
    the async token loop (TextGenerator.generate) and the pushed streams (push.py) both go through here."""

    def __init__(self, textgen: TextGenerator, request: ShardRequest, stops: list[str], hold_back: bool,
                 gen: Generation) -> None:
        self.textgen, self.request, self.gen = textgen, request, gen
        self.decoder = incremental_decoder(textgen.tokenizer, list(request.input_ids))
        self.matcher = StopMatcher(stops, hold_back)
        self.usage = tenants.CURRENT.get()  # captured: pushed replies come in no request's context
        self.metrics = textgen.metrics
        self.metrics.queue.inc()
        self.start = self.last = time.perf_counter()
        self.waiting = self.first = True
        self.finished = False  # the last piece was made
        self.closed = False
        self.uncharged = 0  # generated tokens not yet counted to the tenant

    def _charge(self, tokens: int, kind: str) -> None:
        if self.usage is not None and tokens:
            self.usage.served(tokens, kind)

    def add(self, reply: Reply) -> list[Piece]:
        """The pieces one reply makes; after the one with a finish reason (a stop sequence can come before
        the shard's), `finished` is set and nothing more is made."""
        if self.finished:
            return []
        textgen, gen, m = self.textgen, self.gen, self.metrics
        now = time.perf_counter()
        if self.first:  # prompt length and the seed actually used come with the first message
            gen.prompt_tokens = reply.prompt_tokens or gen.prompt_tokens
            gen.seed = reply.seed  # the request's seed, or the one the shard picked (proto)
            gen.prefill = [textgen.token_dict(t.id, None if math.isnan(t.logprob) else t.logprob,
                                              textgen.tokenizer.decode([t.id], skip_special_tokens=False))
                           for t in reply.prefill]
            self.first = False
            self._charge(gen.prompt_tokens, "prompt")
        if reply.tokens:
            self.uncharged += len(reply.tokens)
            if self.uncharged >= CHARGE_EVERY:
                self._charge(self.uncharged, "generated")
                self.uncharged = 0
            if self.waiting:
                m.queue.dec()
                self.waiting = False
                m.ttft.observe(now - self.start)
            else:
                for _ in reply.tokens:
                    m.itl.observe((now - self.last) / len(reply.tokens))
            self.last = now
        # The shard's last message carries the last token and the finish reason (shard.proto).
        finish = reply.finish_reason
        out = []
        decoder, matcher = self.decoder, self.matcher
        for i, token in enumerate(reply.tokens):
            text, stopped = matcher.add(decoder.add(token.id))
            reason = FinishReason.STOP_SEQUENCE if stopped else (finish if i == len(reply.tokens) - 1 else None)
            if reason is not None and not stopped:
                text += matcher.add(decoder.flush())[0] + matcher.finish()
            piece = Piece(textgen.token_dict(token.id, token.logprob, text), text, reason)
            if self.request.top_n_tokens:
                piece.top_tokens = textgen.top_tokens(token)
                gen.top_tokens.append(piece.top_tokens)
            gen.tokens.append(piece.token)
            gen.text += text
            out.append(piece)
            if reason is not None:
                gen.finish_reason = reason
                self.finished = True
                return out
        if finish is not None:  # a last message without tokens
            text = matcher.add(decoder.flush())[0] + matcher.finish()
            gen.text += text
            gen.finish_reason = finish
            self.finished = True
            out.append(Piece(None, text, finish))
        return out

    def close(self) -> None:
        """The request is over, however it ended: its last metrics."""
        if self.closed:
            return
        self.closed = True
        self._charge(self.uncharged, "generated")
        m = self.metrics
        if self.waiting:
            m.queue.dec()
        m.generated_tokens.observe(len(self.gen.tokens))
        m.input_length.observe(self.gen.prompt_tokens or len(self.request.input_ids))


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


def error_events(exc: Exception, done: str | None = None) -> list[dict | str]:
    """What ends a stream that failed after it began (the status line, 200, is long gone): an error event
    in TGI's shape, which every client here understands, and `done` where the dialect ends with one."""
    if isinstance(exc, (ShardError, IncompleteGeneration, StreamCut)):
        kind = "incomplete_generation" if isinstance(exc, IncompleteGeneration) else "generation"
        log.warning("stream failed: %s", exc)
        event = {"error": str(exc), "error_type": kind}
    else:
        log.error("stream failed", exc_info=exc)
        event = {"error": f"internal error: {exc}", "error_type": "generation"}
    return [event, done] if done else [event]


async def guarded(events: AsyncIterator[dict | str], done: str | None = None) -> AsyncIterator[dict | str]:
    """Turn a failure mid-stream into its final events (error_events)."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # noqa: BLE001 - every failure becomes the stream's last event
        for event in error_events(exc, done):
            yield event
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
