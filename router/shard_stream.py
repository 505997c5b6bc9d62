"""One replica's Generations stream (shard.proto), shared by every generation the router sends there.

The shard sends an engine step's tokens for all of them in one message, where a Generate call per request
cost one gRPC message per token on each side (~45 us of CPU each; at c=16, a large share of what the router
and the shard spent per token). Here each update, and each packed plain token, goes to its generation's
queue. To ShardPool a generation looks like the Generate call it replaces, its messages already in the
contract's types: an async iterator of Reply that raises grpc.aio.AioRpcError (its own error, or the
stream's when the stream fails) and ends after the reply with the finish reason, and cancel(), which makes
a pending read raise CancelledError as grpc.aio does. Or, pushed: `start(..., sink=)` hands each item to
the sink's put_nowait as the stream reads it (no task hop a token), and the sink reads it with `take`.

A stream that fails ends every generation on it with its error; the next generation opens a new one.
"""
from __future__ import annotations

import asyncio
import itertools

import grpc

from sluice.pb import shard_pb2, shard_pb2_grpc

from .contract import FinishReason, Reply, Token, TopToken

_FINISH = {shard_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH, shard_pb2.FINISH_REASON_EOS: FinishReason.EOS}
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_ENDED = object()  # the stream closed without an error: a generation still on it never finished
_CANCELLED = object()


class _Stream:
    """One open Generations call: what is sent on it, and the queues of the generations it carries."""

    def __init__(self, stub: shard_pb2_grpc.ShardStub) -> None:
        self.outgoing: asyncio.Queue = asyncio.Queue()
        self.queues: dict[int, asyncio.Queue] = {}
        self.open = True
        self.call = stub.Generations(self._requests())
        self.reader = asyncio.create_task(self._read())

    async def _requests(self):
        while True:
            yield await self.outgoing.get()

    async def _read(self) -> None:
        end: object = _ENDED
        try:
            async for response in self.call:
                for update in response.updates:
                    queue = self.queues.get(update.id)
                    if queue is not None:
                        queue.put_nowait(update)
                self._deliver_packed(response)
        except grpc.aio.AioRpcError as exc:
            end = exc
        except asyncio.CancelledError:
            end = grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, details="the router closed the shard stream")
            raise
        finally:
            self.open = False
            for queue in self.queues.values():
                queue.put_nowait(end)
            self.queues.clear()

    def _deliver_packed(self, response: shard_pb2.GenerationsResponse) -> None:
        """The packed plain tokens, one Reply per generation as an update would be (its tokens are consecutive:
        shard.proto). Each Reply is handed over whole: a pushed sink reads it at once."""
        reply, last, queue = None, None, None
        for gid, token_id, logprob in zip(response.tokens_of, response.token_ids, response.token_logprobs):
            if gid != last:  # the generation's first token here: its Reply, unless nobody reads it any more
                if reply is not None:
                    queue.put_nowait(reply)
                last, queue = gid, self.queues.get(gid)
                reply = None if queue is None else Reply([])
            if reply is not None:
                reply.tokens.append(Token(token_id, logprob))
        if reply is not None:
            queue.put_nowait(reply)


class SharedStream:
    """The replica's current stream, opened on first use and again after one fails."""

    def __init__(self, stub: shard_pb2_grpc.ShardStub) -> None:
        self._stub = stub
        self._stream: _Stream | None = None
        self._ids = itertools.count(1)

    def start(self, request: shard_pb2.GenerateRequest, log_id: str, sink=None) -> StreamedGeneration:
        """A new generation, read by iterating it, or, with `sink` (anything with put_nowait), pushed into the
        sink as the stream reads each item, which the sink turns into a Reply with the generation's `take`."""
        if self._stream is None or not self._stream.open:
            self._stream = _Stream(self._stub)
        stream, gid = self._stream, next(self._ids)
        queue = asyncio.Queue() if sink is None else sink
        stream.queues[gid] = queue
        stream.outgoing.put_nowait(shard_pb2.GenerationsRequest(id=gid, start=request, log_id=log_id))
        return StreamedGeneration(stream, gid, queue, pushed=sink is not None)

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.call.cancel()
            self._stream.reader.cancel()
            await asyncio.gather(self._stream.reader, return_exceptions=True)


class StreamedGeneration:
    """One generation on a shared stream, read like a Generate call."""

    def __init__(self, stream: _Stream, gid: int, queue, pushed: bool = False) -> None:
        self._stream, self._id, self._queue, self._pushed = stream, gid, queue, pushed
        self._over = False  # finished, failed or cancelled: nothing more comes

    def __aiter__(self) -> StreamedGeneration:
        return self

    async def __anext__(self) -> Reply:
        if self._over:
            raise StopAsyncIteration
        reply = self.take(await self._queue.get())
        if reply is None:
            raise StopAsyncIteration
        return reply

    def take(self, item) -> Reply | None:
        """What one item of this generation's queue means: its next Reply; None when the stream closed before
        the generation finished; grpc.aio.AioRpcError when it failed; CancelledError once it was cancelled."""
        if type(item) is Reply:  # a packed plain token: the common case
            return item
        if item is _CANCELLED:
            raise asyncio.CancelledError
        if item is _ENDED or isinstance(item, grpc.aio.AioRpcError):
            self._over = True
            if item is _ENDED:
                return None
            raise item
        if item.error_code:
            self._done()
            raise grpc.aio.AioRpcError(_CODES.get(item.error_code, grpc.StatusCode.UNKNOWN), details=item.error)
        if item.response.finish_reason:
            self._done()
        return from_wire(item.response)

    def _done(self) -> None:
        self._over = True
        self._stream.queues.pop(self._id, None)

    def cancel(self) -> None:
        """Stop the generation in the shard (unless it is over) and wake a pending read with CancelledError."""
        if self._over:
            return
        self._done()
        if self._stream.open:
            self._stream.outgoing.put_nowait(shard_pb2.GenerationsRequest(id=self._id, cancel=True))
        if not self._pushed:  # a pushed sink cancelled it itself: it expects nothing more
            self._queue.put_nowait(_CANCELLED)


def _token(t: shard_pb2.Token) -> Token:
    return Token(t.id, t.logprob, [TopToken(x.id, x.logprob) for x in t.top_tokens])


def from_wire(reply: shard_pb2.GenerateResponse) -> Reply:
    return Reply([_token(t) for t in reply.tokens], _FINISH.get(reply.finish_reason), reply.prompt_tokens,
                 reply.seed, [_token(t) for t in reply.prefill])
