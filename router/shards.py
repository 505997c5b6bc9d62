"""gRPC client side: one channel per shard replica, least-in-flight choice, background health polling.

Each address is one data-parallel replica (a tensor-parallel group shows up as one address: its rank 0).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from sluice import shard_pb2, shard_pb2_grpc
from sluice.logs import METADATA_KEY, REQUEST_ID

log = logging.getLogger("sluice.router")

HEALTH_INTERVAL_S = 2.0
HEALTH_TIMEOUT_S = 2.0


class ShardUnavailable(RuntimeError):
    pass


class ShardError(RuntimeError):
    """A Generate call failed; `code` is the gRPC status (INVALID_ARGUMENT means the shard refused the input)."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: shard_pb2_grpc.ShardStub
    info: shard_pb2.InfoResponse | None = None
    healthy: bool = False
    in_flight: int = 0


class ShardPool:
    def __init__(self, addresses: list[str], tls_ca: str | None = None) -> None:
        if not addresses:
            raise ValueError("at least one shard address is needed")
        ca = open(tls_ca, "rb").read() if tls_ca else None
        # Channels are created here, inside the running event loop: grpc.aio binds them to it.
        self.replicas = [self._open(a, ca) for a in addresses]
        self._poller: asyncio.Task | None = None

    @staticmethod
    def _open(address: str, ca: bytes | None) -> Replica:
        # Long generations sit on one stream for minutes; keepalive notices a dead shard.
        options = [("grpc.keepalive_time_ms", 30_000), ("grpc.max_receive_message_length", 64 << 20)]
        if ca and not address.startswith("unix:"):
            channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca), options)
        else:
            channel = grpc.aio.insecure_channel(address, options=options)
        return Replica(address, channel, shard_pb2_grpc.ShardStub(channel))

    @property
    def info(self) -> shard_pb2.InfoResponse:
        return self.replicas[0].info

    async def connect(self, timeout_s: float) -> None:
        """Wait until every replica answers Info (shards take a while to load weights), then start polling."""
        deadline = time.monotonic() + timeout_s
        for replica in self.replicas:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ShardUnavailable(
                        f"shard at {replica.address} did not answer within {timeout_s:.0f} s; is it running?"
                    )
                try:
                    replica.info = await replica.stub.Info(
                        shard_pb2.InfoRequest(), timeout=min(left, 10.0), wait_for_ready=True
                    )
                    replica.healthy = True
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
            await replica.channel.close()

    async def _check(self, replica: Replica) -> shard_pb2.HealthResponse | None:
        try:
            reply = await replica.stub.Health(shard_pb2.HealthRequest(), timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            reply = None
        replica.healthy = bool(reply and reply.ok)
        return reply

    async def _poll_health(self) -> None:
        while True:
            await asyncio.gather(*(self._check(r) for r in self.replicas))
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def health(self) -> list[shard_pb2.HealthResponse | None]:
        """Ask every replica now (for /health), not the cached poll result."""
        return list(await asyncio.gather(*(self._check(r) for r in self.replicas)))

    def _pick(self) -> Replica:
        healthy = [r for r in self.replicas if r.healthy]
        # With none known healthy, still try: the poller may simply not have seen it come back yet.
        return min(healthy or self.replicas, key=lambda r: r.in_flight)

    async def generate(self, request: shard_pb2.GenerateRequest) -> AsyncIterator[shard_pb2.GenerateResponse]:
        """Stream one request's tokens. Leaving the loop early (stop sequence, disconnect) cancels the RPC,
        which frees the sequence in the engine."""
        replica = self._pick()
        replica.in_flight += 1
        call = replica.stub.Generate(request, metadata=((METADATA_KEY, REQUEST_ID.get()),))
        try:
            async for reply in call:
                yield reply
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                replica.healthy = False
            raise ShardError(f"shard {replica.address}: {exc.code().name}: {exc.details()}", exc.code()) from exc
        finally:
            replica.in_flight -= 1
            call.cancel()
