"""The router's shard pool picking replicas: a replica that refuses before the first token (gone, or
draining after SIGTERM: both are gRPC UNAVAILABLE) hands the request to another healthy one, so a
rolling restart of shard replicas loses no request. Real gRPC to an in-process shard (tests/inprocess.py)."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from router.contract import FinishReason, Reply, Sampling, ShardRequest
from router.pool import ShardError, ShardPool

REQUEST = ShardRequest(request_id="pool", input_ids=[1, 2, 3, 4], params=Sampling(), max_new_tokens=3, ignore_eos=True)


async def generate(addresses: list[str]) -> tuple[list[Reply], ShardPool]:
    pool = ShardPool(addresses)
    for replica in pool.replicas:
        replica.healthy = True  # as the health poller last saw them: the gone one has not been noticed yet
    try:
        return [reply async for reply in pool.generate(REQUEST)], pool
    finally:
        await pool.close()


def test_refused_before_the_first_token_goes_to_another_replica(tiny_shard, tmp_path):
    gone = f"unix://{tmp_path}/gone.sock"  # picked first: same load, listed first
    replies, pool = asyncio.run(generate([gone, tiny_shard.address]))
    assert sum(len(r.tokens) for r in replies) == 3
    assert replies[-1].finish_reason == FinishReason.LENGTH
    assert [r.healthy for r in pool.replicas] == [False, True]
    assert [r.in_flight for r in pool.replicas] == [0, 0]


def test_with_no_other_replica_the_error_is_raised(tmp_path):
    with pytest.raises(ShardError) as err:
        asyncio.run(generate([f"unix://{tmp_path}/gone.sock"]))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
