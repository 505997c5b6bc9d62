"""gRPC client side: one channel per shard replica, least-in-flight choice, background health polling.

Each address is one data-parallel replica (a tensor-parallel group shows up as one address: its rank 0),
except `dns:///name:port`, which stands for every address the name resolves to (compose `--scale shard=N`,
a Kubernetes headless Service): re-resolved at each health poll, one replica per IP, so least-in-flight
works per request across them (grpc's own dns: resolver would balance per channel instead).
"""
from __future__ import annotations

import asyncio
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
from .shard_stream import SharedStream

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
        self._calls: set = set()  # generations in flight on the shards (shard_stream.py), for abort_all
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

    async def generate(self, request: ShardRequest) -> AsyncIterator[Reply]:
        """Stream one request's tokens (on the replica's shared Generations stream, shard_stream.py). Leaving
        the loop early (stop sequence, disconnect) cancels the generation, which frees the sequence in the
        engine. A replica that refuses with UNAVAILABLE before the first reply (draining, or gone) hands the
        request to another healthy one, if there is one. A replica that fails mid-stream (see _failed) hands
        over the rest of the generation (router/failover.py), up to max_failovers times: the replies just go
        on, as if from one replica."""
        current, tried, sent, failovers = request, set(), [], 0
        seed = request.params.seed
        while True:
            replica = self._pick(tried)
            tried.add(replica.address)
            replica.in_flight += 1
            waiting = Waiting(request.priority, request.tenant, len(current.input_ids))
            replica.waiting.append(waiting)
            call = replica.generations.start(to_wire(current), REQUEST_ID.get())
            self._calls.add(call)
            started = False
            try:
                async for reply in call:
                    if not started:
                        started = True
                        replica.waiting.remove(waiting)
                        if current is request:
                            seed = reply.seed  # the request's, or the one the shard picked (shard.proto)
                    sent += [t.id for t in reply.tokens]
                    yield reply
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    replica.healthy = False
                    if not started and any(r.healthy and r.address not in tried for r in self.replicas):
                        log.info("shard %s unavailable (%s): trying another replica", replica.address, exc.details())
                        continue
                error = ShardError(f"shard {replica.address}: {exc.code().name}: {exc.details()}", exc.code())
                if (started or current is not request) and failovers < self.max_failovers \
                        and self._abort_reason is None and await self._failed(replica, exc):
                    resumed = continuation(request, sent, seed)
                    if resumed is not None and any(r.healthy and r.address not in tried for r in self.replicas):
                        failovers += 1
                        self.on_failover()
                        log.warning("%s mid-stream, after %d tokens: the rest goes to another replica", error,
                                    len(sent))
                        current = resumed
                        continue
                raise error from exc
            except asyncio.CancelledError:
                # A generation cancelled by abort_all raises CancelledError here (as a grpc.aio call does); it is not
                # this task's cancellation.
                task = asyncio.current_task()
                if self._abort_reason is None or (task is not None and task.cancelling()):
                    raise
                raise ShardError(self._abort_reason, grpc.StatusCode.UNAVAILABLE) from None
            finally:
                self._calls.discard(call)
                replica.in_flight -= 1
                if not started:
                    replica.waiting.remove(waiting)
                call.cancel()

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
            call.cancel()
        return len(calls)
