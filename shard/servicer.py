"""The shard's gRPC service: token ids in, a stream of sampled tokens out.

The engine runs in its own thread and calls each sequence's `on_event` from there; a Mailbox carries
those events to this server's loop, one wake-up for all the tokens of a step. Generations (the router's
RPC) sends each wake-up's tokens of every generation on the stream as one message; Generate (one request
per call) feeds its own queue. When a generation is cancelled (Generations' cancel, a Generate call
cancelled, a stream closed), its sequence is marked cancelled and the engine frees it before its next step.
Protobuf types stop here: the engine below sees Sequences and SamplingParams only.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import os
from collections.abc import Callable

import grpc
import torch

from shard.engine import Draining, Engine
from shard.grammar import GrammarCompiler
from shard.sampler import Sampled, SamplingParams
from shard.sequence import FINISH_EOS, Sequence
from shard.settings import ShardSettings
from sluice.logs import METADATA_KEY, REQUEST_ID
from sluice.modelfiles import ModelSource
from sluice.pb import shard_pb2 as pb
from sluice.pb import shard_pb2_grpc as pb_grpc

log = logging.getLogger("sluice.shard")


def sampling_params(p: pb.SamplingParams) -> SamplingParams:
    """The request's sampling, as the engine applies it: the proto's zero = off (temperature, top_p,
    repetition_penalty, typical_p 0 -> 1.0), a seed picked here when sampling without one (reported
    in the first message), and a non-positive temperature sampling greedily (as the engine always did)."""
    temperature = p.temperature or 1.0
    do_sample = p.do_sample and temperature > 0
    seed = p.seed if p.HasField("seed") else None
    if do_sample and seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return SamplingParams(
        do_sample=do_sample,
        temperature=temperature,
        top_k=p.top_k,
        top_p=p.top_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        seed=seed,
        typical_p=p.typical_p or 1.0,
        logit_bias=(torch.tensor(list(p.logit_bias.keys())), torch.tensor(list(p.logit_bias.values())))
        if p.logit_bias else None,
    )


class Mailbox:
    """Items from the engine thread to their sinks (an asyncio queue's put_nowait, ...) on one loop. A step's
    tokens for every sequence are posted within microseconds: the first one wakes the loop (a self-pipe
    write and a GIL hand-over), the rest ride along, where a `call_soon_threadsafe` each would wake it once
    per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[Callable[[object], None], object]] = []

    def post(self, sink: Callable[[object], None], item: object) -> None:
        """`sink(item)` on the loop; from any thread."""
        with self._lock:
            self._items.append((sink, item))
            first = len(self._items) == 1
        if first:
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for sink, item in items:
            sink(item)


class ShardService(pb_grpc.ShardServicer):
    def __init__(self, engine: Engine, source: ModelSource, settings: ShardSettings) -> None:
        self.engine = engine
        self.source = source
        self.settings = settings
        self.grammars = GrammarCompiler(source, engine.model.cfg.vocab_size)
        self._mail: Mailbox | None = None

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        cfg = self.engine.model.cfg
        return pb.InfoResponse(
            model_id=self.source.model_id,
            dtype=str(self.engine.model.dtype).removeprefix("torch."),
            device=str(self.engine.device),
            num_shard=self.engine.model.tp.size,
            max_position_embeddings=self.engine.max_seq_len,
            vocab_size=cfg.vocab_size,
            eos_token_ids=sorted(self.engine.eos),
            kv_cache_tokens=self.engine.blocks.num_blocks * self.engine.blocks.block_size,
            max_batch_size=self.engine.config.max_batch_size,
            block_size=self.engine.blocks.block_size,
        )

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        running, waiting, free = self.engine.stats()
        rates = self.engine.rates
        return pb.HealthResponse(ok=self.engine.alive(), running=running, waiting=waiting, free_kv_blocks=free,
                                 prefill_tokens_per_s=rates.prefill_tokens_per_s, decode_step_s=rates.decode_step_s)

    def _mailbox(self) -> Mailbox:
        if self._mail is None:  # the server's loop: made lazily, inside it
            self._mail = Mailbox(asyncio.get_running_loop())
        return self._mail

    async def _start(self, request: pb.GenerateRequest, on_event: Callable[[str, object], None]) -> _Replies:
        """Check the request, build its sequence and submit it; _Refused says why not."""
        p = request.params
        params = sampling_params(p)
        vocab = self.engine.model.cfg.vocab_size
        if any(t >= vocab for t in (*request.input_ids, *p.logit_bias)):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"token ids must be below the vocabulary size {vocab}")
        matcher = None
        if request.grammar:
            try:  # compiling takes milliseconds to a second: never on the engine thread
                matcher = await asyncio.to_thread(self.grammars.matcher, request.grammar)
            except ValueError as exc:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        seq = Sequence(
            request.request_id,
            list(request.input_ids),
            params,
            request.max_new_tokens or 1,
            on_event,
            stop_token_ids=frozenset(request.stop_token_ids),
            top_n_tokens=request.top_n_tokens,
            ignore_eos=request.ignore_eos,
            matcher=matcher,
            prompt_logprobs=request.prompt_logprobs,
            tenant=request.tenant,
            priority=request.priority,
            weight=request.tenant_weight or 1.0,
        )
        try:
            self.engine.submit(seq)
        except ValueError as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except Draining as exc:  # UNAVAILABLE: the router may send it to another replica
            raise _Refused(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        return _Replies(seq, params)

    def _end(self, replies: _Replies) -> None:
        seq = replies.seq
        self.engine.cancel(seq)  # no-op when finished; frees the sequence when the call was cancelled
        # One line per request, with its id and sizes only: prompt text never reaches the shard.
        with _logging_as(replies.log_id):
            log.info("generate %s: %d prompt tokens, %d generated", "finished" if replies.done else "ended early",
                     seq.prompt_len, len(seq.token_ids) - seq.prompt_len)

    async def Generate(self, request: pb.GenerateRequest, context):
        REQUEST_ID.set(dict(context.invocation_metadata()).get(METADATA_KEY, "-"))
        events: asyncio.Queue = asyncio.Queue()
        post = self._mailbox().post
        try:
            replies = await self._start(request, lambda kind, value: post(events.put_nowait, (kind, value)))
        except _Refused as exc:
            await context.abort(exc.code, exc.message)
        try:
            while True:
                batch = [await events.get()]
                while not events.empty():  # the router fell behind: send what is ready at once
                    batch.append(events.get_nowait())
                try:
                    msg = replies.message(batch)
                except _Failed as exc:
                    log.warning("generation failed: %s", exc)
                    await context.abort(grpc.StatusCode.INTERNAL, str(exc))
                yield msg
                if replies.done:
                    return
        finally:
            self._end(replies)

    async def Generations(self, request_iterator, context):
        """See shard.proto. The engine thread posts (id, kind, value) through the Mailbox; each wake-up of
        this loop sends everything posted since as one message (_response)."""
        post = self._mailbox().post
        posted: list[tuple[int, str, object]] = []
        wake = asyncio.Event()
        live: dict[int, _Replies] = {}
        starting: dict[int, asyncio.Task] = {}
        closed = False

        def deliver(item: tuple[int, str, object]) -> None:
            posted.append(item)
            wake.set()

        async def start(req: pb.GenerationsRequest) -> None:
            REQUEST_ID.set(req.log_id or "-")
            try:
                replies = await self._start(req.start, lambda kind, value: post(deliver, (req.id, kind, value)))
            except _Refused as exc:
                deliver((req.id, "refused", exc))
            except Exception as exc:  # noqa: BLE001 - the caller waits on this id: it must hear of it
                log.exception("starting a generation failed")
                deliver((req.id, "refused", _Refused(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")))
            else:
                live[req.id] = replies
            finally:
                starting.pop(req.id, None)

        async def read() -> None:
            nonlocal closed
            try:
                async for req in request_iterator:
                    if req.cancel:
                        task = starting.pop(req.id, None)
                        if task is not None:
                            task.cancel()  # not submitted yet (a grammar compiling): nothing to free
                        elif req.id in live:
                            self._end(live.pop(req.id))
                    elif req.HasField("start"):
                        starting[req.id] = asyncio.create_task(start(req))
            finally:
                closed = True
                wake.set()

        reader = asyncio.create_task(read())
        try:
            while not closed:
                await wake.wait()
                wake.clear()
                batch, posted[:] = list(posted), []
                response = self._response(batch, live)
                if response is not None:
                    yield response
        finally:
            reader.cancel()
            for task in list(starting.values()):
                task.cancel()
            for replies in live.values():
                self._end(replies)

    def _response(self, batch: list[tuple[int, str, object]],
                  live: dict[int, _Replies]) -> pb.GenerationsResponse | None:
        """One message for what was posted: each generation's plain tokens packed, the rest one update per
        generation, in the order their first news came (shard.proto). None when nothing is to be sent."""
        events: dict[int, list[tuple[str, object]]] = {}
        for gid, kind, value in batch:
            events.setdefault(gid, []).append((kind, value))
        updates, tokens_of, token_ids, token_logprobs = [], [], [], []
        for gid, news in events.items():
            if news[0][0] == "refused":
                exc = news[0][1]
                updates.append(pb.GenerationUpdate(id=gid, error_code=exc.code.value[0], error=exc.message))
                continue
            if gid not in live:
                continue  # cancelled: whatever the engine sent before it saw that is not wanted
            replies = live[gid]
            if replies.plain(news):
                for _, sampled in news:
                    tokens_of.append(gid)
                    token_ids.append(sampled.token_id)
                    token_logprobs.append(sampled.logprob)
                continue
            try:
                updates.append(pb.GenerationUpdate(id=gid, response=replies.message(news)))
            except _Failed as exc:
                with _logging_as(replies.log_id):
                    log.warning("generation failed: %s", exc)
                updates.append(pb.GenerationUpdate(id=gid, error_code=grpc.StatusCode.INTERNAL.value[0], error=str(exc)))
                self._end(live.pop(gid))
                continue
            if replies.done:
                self._end(live.pop(gid))
        if not updates and not tokens_of:
            return None
        return pb.GenerationsResponse(updates=updates, tokens_of=tokens_of, token_ids=token_ids,
                                      token_logprobs=token_logprobs)


class _Refused(Exception):
    """A request the shard will not run: the gRPC status and why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _Failed(Exception):
    """The engine failed the sequence (an error event)."""


class _Replies:
    """One generation's engine events as the GenerateResponse messages of its stream (shard.proto): the
    first carries prompt_tokens, seed and prefill; the last, its finish reason."""

    def __init__(self, seq: Sequence, params: SamplingParams) -> None:
        self.seq, self.params = seq, params
        self.first, self.done = True, False
        # Started inside its request's context (Generate's metadata, Generations' log_id); its last log
        # lines are written from the stream's loop, which has none.
        self.log_id = REQUEST_ID.get()

    def plain(self, batch: list[tuple[str, object]]) -> bool:
        """Whether `batch` is what Generations packs (shard.proto): tokens only, none with alternatives or a
        finish reason, and not the first message."""
        return not self.first and all(kind == "token" and not value.top and not value.finish for kind, value in batch)

    def message(self, batch: list[tuple[str, object]]) -> pb.GenerateResponse:
        seq, msg = self.seq, pb.GenerateResponse()
        if self.first:
            msg.prompt_tokens = seq.prompt_len
            msg.seed = self.params.seed or 0
            if seq.prefill is not None:
                msg.prefill.extend(pb.Token(id=i, logprob=lp) for i, lp in zip(seq.token_ids, seq.prefill))
            self.first = False
        for kind, value in batch:
            if kind == "error":
                raise _Failed(str(value))
            msg.tokens.append(_token(value))
            if value.finish:  # the last message: nothing is ever sent after it
                msg.finish_reason = pb.FINISH_REASON_EOS if value.finish == FINISH_EOS else pb.FINISH_REASON_LENGTH
                self.done = True
                break
        return msg


@contextlib.contextmanager
def _logging_as(request_id: str):
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


def _token(s: Sampled) -> pb.Token:
    return pb.Token(id=s.token_id, logprob=s.logprob, top_tokens=[pb.TopToken(id=i, logprob=lp) for i, lp in s.top])


class GrpcServer:
    """The shard's gRPC server in a thread of its own (its own event loop): the engine loop keeps the
    main thread (see Engine.start for why). `start()` returns once the server listens, or with the reason
    it can't; `stop()` may be called from any thread. Tests use it to run a real shard in-process."""

    def __init__(self, engine: Engine, source: ModelSource, settings: ShardSettings) -> None:
        self.engine, self.source, self.settings = engine, source, settings
        self._ready = threading.Event()
        self._error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="grpc", daemon=True)

    def start(self) -> str | None:
        """Listen on settings.address; None when serving, else why not."""
        self._thread.start()
        self._ready.wait()
        return self._error

    def _run(self) -> None:
        # uvloop where installed (as uvicorn picks it for the router): this loop wakes for every token it sends.
        try:
            from uvloop import run
        except ImportError:
            run = asyncio.run
        run(self._serve())

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=5)

    async def _serve(self) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ShardServicer_to_server(ShardService(self.engine, self.source, self.settings), server)
        address = self.settings.address
        try:
            port = server.add_secure_port(address, self._credentials()) if self.settings.tls_cert \
                else server.add_insecure_port(address)
        except (RuntimeError, OSError) as exc:
            self._error = f"shard: cannot listen on {address}: {exc}"
            port = 0
        if port == 0:
            self._error = self._error or f"shard: cannot listen on {address} (in use?)"
            self._ready.set()
            return
        await server.start()
        self._loop, self._stopped = asyncio.get_running_loop(), asyncio.Event()
        log.info("shard ready on %s", address)
        self._ready.set()
        await self._stopped.wait()
        await server.stop(grace=2)

    def _credentials(self) -> grpc.ServerCredentials:
        with open(self.settings.tls_key, "rb") as key, open(self.settings.tls_cert, "rb") as cert:
            return grpc.ssl_server_credentials([(key.read(), cert.read())])
