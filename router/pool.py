"""gRPC client side: one channel per shard replica, least-in-flight choice, background health polling.

Each address is one data-parallel replica (a tensor-parallel group shows up as one address: its rank 0),
except `dns:///name:port`, which stands for every address the name resolves to (compose `--scale shard=N`,
a Kubernetes headless Service): re-resolved at each health poll, one replica per IP, so least-in-flight
works per request across them (grpc's own dns: resolver would balance per channel instead).
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields

import grpc

from sluice.logs import REQUEST_ID
from sluice.pb import shard_pb2, shard_pb2_grpc

from .contract import Reply, ShardHealth, ShardInfo, ShardRequest
from .deadline import Waiting
from .failover import continuation
from .shard_stream import SharedStream, StreamedGeneration

log = logging.getLogger("sluice.router")

HEALTH_INTERVAL_S = 2.0
HEALTH_TIMEOUT_S = 2.0


def _fields(obj) -> dict:
    # Not dataclasses.asdict: it deep-copies the prompt's ids one by one (~0.1 ms a request), for a message
    # that copies them anyway.
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def to_wire(request: ShardRequest) -> shard_pb2.GenerateRequest:
    params = _fields(request.params)
    if params["seed"] is None:  # unset, not 0: the shard picks a seed (shard.proto)
        del params["seed"]
    return shard_pb2.GenerateRequest(**{**_fields(request), "params": shard_pb2.SamplingParams(**params)})


def _info(reply: shard_pb2.InfoResponse) -> ShardInfo:
    info = ShardInfo(**{f.name: getattr(reply, f.name) for f in fields(ShardInfo)})
    info.eos_token_ids = list(info.eos_token_ids)
    return info


def _health(reply: shard_pb2.HealthResponse | None) -> ShardHealth | None:
    return None if reply is None else ShardHealth(reply.ok, reply.running, reply.waiting, reply.free_kv_blocks,
                                                  reply.prefill_tokens_per_s, reply.decode_step_s)


class ShardUnavailable(RuntimeError):
    pass


class ShardError(RuntimeError):
    """A generation failed; `code` is the gRPC status (INVALID_ARGUMENT means the shard refused the input)."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: shard_pb2_grpc.ShardStub
    info: ShardInfo | None = None
    healthy: bool = False
    in_flight: int = 0
    running: int = 0  # sequences in the shard's batch, as of the last health check
    prefill_tokens_per_s: float = 0.0  # the shard's measured rates, as of the last health check
    decode_step_s: float = 0.0
    waiting: list[Waiting] = field(default_factory=list)  # sent here, no first token yet (router/deadline.py)
    generations: SharedStream = field(init=False)  # the Generations stream its generations share

    def __post_init__(self) -> None:
        self.generations = SharedStream(self.stub)


async def resolve(address: str) -> list[str]:
    """`dns:///name:port` -> one `ipv4:IP:port` / `ipv6:[IP]:port` per record (none while the name is
    unknown); any other address is itself."""
    if not address.startswith("dns:///"):
        return [address]
    host, _, port = address[len("dns:///"):].rpartition(":")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    ips = sorted({info[4][0] for info in infos})
    return [f"ipv6:[{ip}]:{port}" if ":" in ip else f"ipv4:{ip}:{port}" for ip in ips]


class ShardPool:
    def __init__(self, addresses: list[str], tls_ca: str | None = None, max_failovers: int = 0,
                 on_failover: Callable[[], None] | None = None) -> None:
        if not addresses:
            raise ValueError("at least one shard address is needed")
        self.targets = addresses
        self.ca = open(tls_ca, "rb").read() if tls_ca else None
        # A DNS target's replicas are dialled by IP: TLS still checks the certificate against the name.
        self.tls_name = next((t[len("dns:///"):].rpartition(":")[0] for t in addresses if t.startswith("dns:///")), None)
        # Channels are created here, inside the running event loop: grpc.aio binds them to it.
        self.replicas = [self._open(a) for a in addresses if not a.startswith("dns:///")]
        self._poller: asyncio.Task | None = None
        self._info: ShardInfo | None = None
        self._retired: list[Replica] = []  # gone from DNS, closed once their last stream ends
        self._calls: set[PoolGeneration] = set()  # generations in flight on the shards, for abort_all
        self._abort_reason: str | None = None
        self.max_failovers = max_failovers
        self.on_failover = on_failover or (lambda: None)

    async def _refresh(self) -> None:
        """Follow DNS: open a replica for each new address, drop those gone (their streams run to the end)."""
        if not any(t.startswith("dns:///") for t in self.targets):
            return
        wanted = [a for t in self.targets for a in await resolve(t)]
        known = {r.address for r in self.replicas}
        self._retired += [r for r in self.replicas if r.address not in wanted]
        self.replicas = [r for r in self.replicas if r.address in wanted] + [
            self._open(a) for a in wanted if a not in known]
        for r in [r for r in self._retired if r.in_flight == 0]:
            self._retired.remove(r)
            await r.generations.close()
            await r.channel.close()

    def _open(self, address: str) -> Replica:
        # Long generations sit on one stream for minutes; keepalive notices a dead shard.
        options = [("grpc.keepalive_time_ms", 30_000), ("grpc.max_receive_message_length", 64 << 20)]
        if self.ca and not address.startswith("unix:"):
            if self.tls_name and address.startswith(("ipv4:", "ipv6:")):
                options.append(("grpc.ssl_target_name_override", self.tls_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=self.ca)
            channel = grpc.aio.secure_channel(address, credentials, options)
        else:
            channel = grpc.aio.insecure_channel(address, options=options)
        return Replica(address, channel, shard_pb2_grpc.ShardStub(channel))

    @property
    def info(self) -> ShardInfo:
        return self._info

    async def connect(self, timeout_s: float) -> None:
        """Wait until every replica answers Info (shards take a while to load weights), then start polling."""
        deadline = time.monotonic() + timeout_s
        await self._refresh()
        while not self.replicas:  # a DNS name with no records yet: the shards are still starting
            if time.monotonic() > deadline:
                raise ShardUnavailable(f"{', '.join(self.targets)} resolved to no address within {timeout_s:.0f} s")
            await asyncio.sleep(1.0)
            await self._refresh()
        for replica in self.replicas:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ShardUnavailable(
                        f"shard at {replica.address} did not answer within {timeout_s:.0f} s; is it running?"
                    )
                try:
                    replica.info = _info(await replica.stub.Info(
                        shard_pb2.InfoRequest(), timeout=min(left, 10.0), wait_for_ready=True
                    ))
                    replica.healthy = True
                    self._info = self._info or replica.info
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise ShardUnavailable(f"shard at {replica.address}: {exc.details()}") from exc
                    await asyncio.sleep(0.2)
            log.info("shard %s: %s (%s on %s)", replica.address, replica.info.model_id,
                     replica.info.dtype, replica.info.device)
        self._poller = asyncio.create_task(self._poll_health())

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()
        for replica in self.replicas:
            await replica.generations.close()
            await replica.channel.close()

    async def _check(self, replica: Replica) -> ShardHealth | None:
        try:
            reply = _health(await replica.stub.Health(shard_pb2.HealthRequest(), timeout=HEALTH_TIMEOUT_S))
        except grpc.aio.AioRpcError:
            reply = None
        if reply and reply.ok and replica.info is None:  # found by DNS after start-up
            try:
                replica.info = _info(await replica.stub.Info(shard_pb2.InfoRequest(), timeout=HEALTH_TIMEOUT_S))
            except grpc.aio.AioRpcError:
                reply = None
        replica.healthy = bool(reply and reply.ok)
        replica.running = reply.running if reply else 0
        if reply:
            replica.prefill_tokens_per_s, replica.decode_step_s = reply.prefill_tokens_per_s, reply.decode_step_s
        return reply

    async def _poll_health(self) -> None:
        while True:
            await self._refresh()
            await asyncio.gather(*(self._check(r) for r in self.replicas))
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def health(self) -> list[ShardHealth | None]:
        """Ask every replica now (for /health), not the cached poll result."""
        return list(await asyncio.gather(*(self._check(r) for r in self.replicas)))

    def _pick(self, tried: set[str] = frozenset()) -> Replica:
        if not self.replicas:
            raise ShardError("no shard replica is known (DNS returned no address)", grpc.StatusCode.UNAVAILABLE)
        healthy = [r for r in self.replicas if r.healthy and r.address not in tried]
        # With none known healthy, still try: the poller may simply not have seen it come back yet.
        return min(healthy or self.replicas, key=lambda r: r.in_flight)

    def start(self, request: ShardRequest, on_reply: Callable[[Reply], None],
              on_end: Callable[[Exception | None], None]) -> PoolGeneration:
        """One request's replies, pushed to `on_reply` as the replica's stream reads them (PoolGeneration)."""
        return PoolGeneration(self, request, on_reply, on_end)

    async def generate(self, request: ShardRequest) -> AsyncIterator[Reply]:
        """One request's replies as an async iterator (PoolGeneration's through a queue); a failure raises
        ShardError, a stream closed before the finish just ends. Leaving the loop early cancels the generation."""
        queue: asyncio.Queue = asyncio.Queue()
        generation = PoolGeneration(self, request, queue.put_nowait, lambda error: queue.put_nowait(_Ended(error)))
        try:
            while True:
                reply = await queue.get()
                if type(reply) is _Ended:
                    if reply.error is not None:
                        raise reply.error
                    return
                yield reply
                if reply.finish_reason is not None:
                    return
        finally:
            generation.cancel()

    async def _failed(self, replica: Replica, exc: grpc.aio.AioRpcError) -> bool:
        """Whether a call's error is its replica's (gone; or draining or dying: no longer ready) rather than
        the request's own, which another replica would only repeat."""
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return True
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return False
        health = await self._check(replica)
        return not (health and health.ok)

    def abort_all(self, reason: str) -> int:
        """End every generation in flight with ShardError(reason): each stream then closes with an
        error event instead of just stopping. Used when the shutdown timeout runs out. Returns how many."""
        self._abort_reason = reason
        calls = list(self._calls)
        for call in calls:
            call.abort(reason)
        return len(calls)


@dataclass
class _Ended:
    error: Exception | None


class PoolGeneration:
    """One request on the pool, pushed: `on_reply(reply)` for each Reply as its replica's stream reads it
    (no task hop a token), and, unless a reply with a finish reason came first, `on_end(error)` once: a
    ShardError, or None when the shard closed the stream before the generation finished.

    A replica that refuses with UNAVAILABLE before the first reply (draining, or gone) hands the request to
    another healthy one, if there is one. A replica that fails mid-stream (see ShardPool._failed) hands over
    the rest of the generation (router/failover.py), up to max_failovers times: the replies just go on, as if
    from one replica. cancel() (a stop sequence, a disconnect) frees the sequence in the engine; nothing is
    called after it. The callbacks run on the stream reader's task, in no request's context."""

    def __init__(self, pool: ShardPool, request: ShardRequest, on_reply: Callable[[Reply], None],
                 on_end: Callable[[Exception | None], None]) -> None:
        self.pool, self.request, self.on_reply, self.on_end = pool, request, on_reply, on_end
        self.current, self.tried, self.sent, self.failovers = request, set(), [], 0
        self.seed = request.params.seed
        self.log_id = REQUEST_ID.get()
        self.context = contextvars.copy_context()  # the request's: a failover's logs carry its id
        self.over = False  # finished, failed, aborted or cancelled
        self.replica: Replica | None = None
        self.call: StreamedGeneration | None = None  # the current attempt's, until it is released
        self.waiting: Waiting | None = None
        self.started = False  # the current attempt's first reply came
        self._recovery: asyncio.Task | None = None
        self._attempt()  # ShardError when no replica is known

    def _attempt(self) -> None:
        replica = self.pool._pick(self.tried)
        self.tried.add(replica.address)
        replica.in_flight += 1
        self.waiting = Waiting(self.request.priority, self.request.tenant, len(self.current.input_ids))
        replica.waiting.append(self.waiting)
        self.replica, self.started = replica, False
        self.call = replica.generations.start(to_wire(self.current), self.log_id, sink=self)
        self.pool._calls.add(self)

    def _release(self) -> None:
        """The current attempt is over: its replica's counts, and the shard's sequence if it still runs."""
        if self.call is None:
            return
        self.pool._calls.discard(self)
        self.replica.in_flight -= 1
        if not self.started:
            self.replica.waiting.remove(self.waiting)
        self.call.cancel()
        self.call = None

    def put_nowait(self, item: object) -> None:
        """An item of the current attempt, from its replica's stream (shard_stream.py)."""
        if self.call is None:
            return
        try:
            reply = self.call.take(item)
        except grpc.aio.AioRpcError as exc:
            replica = self.replica
            self._release()
            self._recovery = asyncio.get_running_loop().create_task(self._recover(replica, exc), context=self.context)
            return
        if reply is None:
            self._release()
            self._end(None)
            return
        if not self.started:
            self.started = True
            self.replica.waiting.remove(self.waiting)
            if self.current is self.request:
                self.seed = reply.seed  # the request's, or the one the shard picked (shard.proto)
        self.sent += [t.id for t in reply.tokens]
        if reply.finish_reason is not None:
            self.over = True
            self._release()
        try:
            self.on_reply(reply)
        except Exception as exc:  # noqa: BLE001 - a consumer's failure must not end the stream others share
            log.exception("a generation's consumer failed")
            self.cancel()
            self.on_end(exc)

    async def _recover(self, replica: Replica, exc: grpc.aio.AioRpcError) -> None:
        """After the current attempt failed: another attempt (see the class's docstring), or on_end(error)."""
        pool = self.pool
        try:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                replica.healthy = False
                if not self.started and any(r.healthy and r.address not in self.tried for r in pool.replicas):
                    log.info("shard %s unavailable (%s): trying another replica", replica.address, exc.details())
                    return self._attempt()
            error = ShardError(f"shard {replica.address}: {exc.code().name}: {exc.details()}", exc.code())
            if (self.started or self.current is not self.request) and self.failovers < pool.max_failovers \
                    and pool._abort_reason is None and await pool._failed(replica, exc):
                resumed = continuation(self.request, self.sent, self.seed)
                if resumed is not None and any(r.healthy and r.address not in self.tried for r in pool.replicas):
                    self.failovers += 1
                    pool.on_failover()
                    log.warning("%s mid-stream, after %d tokens: the rest goes to another replica", error,
                                len(self.sent))
                    self.current = resumed
                    return self._attempt()
            self._end(error)
        except ShardError as error:  # no replica left to pick
            self._end(error)

    def _end(self, error: Exception | None) -> None:
        if not self.over:
            self.over = True
            self.on_end(error)

    def cancel(self) -> None:
        """Stop it (unless it is over) and free its sequence in the engine; no callback comes after this."""
        self.over = True
        self._release()
        if self._recovery is not None and self._recovery is not asyncio.current_task():
            self._recovery.cancel()

    def abort(self, reason: str) -> None:
        """End it with ShardError(reason) (ShardPool.abort_all)."""
        if not self.over:
            self.cancel()
            self.on_end(ShardError(reason, grpc.StatusCode.UNAVAILABLE))
