"""The router's shard pool picking replicas: a replica that refuses before the first token (gone, or
draining after SIGTERM: both are gRPC UNAVAILABLE) hands the request to another healthy one, so a
rolling restart of shard replicas loses no request. Real gRPC to an in-process shard (tests/inprocess.py)."""
from __future__ import annotations

import asyncio
from functools import partial

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


def test_a_pushed_consumer_that_fails_ends_only_its_own_generation(tiny_shard):
    """Pushed replies are handled in the call that reads the replica's one shared stream: a consumer that
    raises gets its generation ended with that error (and cancelled in the shard), and the generations
    beside it on the same stream go on to their end."""
    async def go():
        pool = ShardPool([tiny_shard.address])
        pool.replicas[0].healthy = True
        loop = asyncio.get_running_loop()
        got: dict[str, list] = {"ok": [], "bad": []}
        ends: dict[str, asyncio.Future] = {name: loop.create_future() for name in got}

        def on_reply(name: str, reply: Reply) -> None:
            if name == "bad" and got["bad"]:
                raise ValueError("the consumer's own bug")
            got[name].append(reply)
            if reply.finish_reason is not None:
                ends[name].set_result(None)

        def on_end(name: str, error: Exception | None) -> None:
            ends[name].set_result(error)

        long = ShardRequest(request_id="p", input_ids=[1, 2, 3, 4], params=Sampling(), max_new_tokens=40,
                            ignore_eos=True)
        calls = [pool.start(long, partial(on_reply, name), partial(on_end, name)) for name in got]
        try:
            outcome = {name: await asyncio.wait_for(end, 120) for name, end in ends.items()}
        finally:
            for call in calls:
                call.cancel()
            await pool.close()
        return got, outcome, pool

    got, outcome, pool = asyncio.run(go())
    assert isinstance(outcome["bad"], ValueError) and len(got["bad"]) == 1
    assert outcome["ok"] is None and sum(len(r.tokens) for r in got["ok"]) == 40
    assert got["ok"][-1].finish_reason == FinishReason.LENGTH
    assert pool.replicas[0].in_flight == 0
