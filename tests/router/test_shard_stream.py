"""The Generations stream (shard.proto, router/shard_stream.py) against a real shard over real gRPC: many
generations share one stream and one message per engine step (plain tokens packed), each fails or is
cancelled alone, and a generation on it streams what a Generate call streams."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from sluice.pb import shard_pb2 as pb
from sluice.pb import shard_pb2_grpc as pb_grpc
from router.contract import FinishReason
from router.shard_stream import SharedStream


def request(n: int, prompt: list[int] | None = None, top_n: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id="t", input_ids=prompt or [5, 6, 7, 8], max_new_tokens=n, ignore_eos=True,
                              params=pb.SamplingParams(), top_n_tokens=top_n)


def tokens(messages) -> list[int]:
    """The token ids of a generation's messages (Generate's GenerateResponse, or the Replies of a shared stream)."""
    return [t.id for m in messages for t in m.tokens]


async def collect(call) -> list:
    return [m async for m in call]


def run(router_loop, make):
    """`make(stub)`'s coroutine on the router loop, over a channel of its own."""
    async def go(address: str):
        async with grpc.aio.insecure_channel(address) as channel:
            return await make(pb_grpc.ShardStub(channel))
    return lambda address: router_loop.run(go(address))


def wait_until_idle(engine, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s  # a hang detector, not a timing assertion
    while engine.stats()[:2] != (0, 0):
        assert time.monotonic() < end, f"sequences left in the engine: {engine.stats()}"
        time.sleep(0.05)


def test_generations_share_a_stream_and_its_messages(router_loop, tiny_shard):
    async def go(stub):
        stream = SharedStream(stub)
        calls = [stream.start(request(n), "log-id") for n in (6, 9, 12)]
        got = await asyncio.gather(*(collect(c) for c in calls))
        single = await collect(stub.Generate(request(9)))
        await stream.close()
        return got, single

    got, single = run(router_loop, go)(tiny_shard.address)
    assert [len(tokens(m)) for m in got] == [6, 9, 12]
    assert all(m[-1].finish_reason == FinishReason.LENGTH for m in got)
    assert sum(1 for m in got for x in m if x.finish_reason) == 3  # only the last message of each has one
    assert all(m[0].prompt_tokens == 4 for m in got)
    # What Generate streams for the same request: the same greedy tokens.
    assert tokens(got[1]) == tokens(single)
    wait_until_idle(tiny_shard.engine)


def test_one_message_carries_every_generation_of_a_step(router_loop, tiny_shard):
    n = 32

    async def go(stub):
        outgoing: asyncio.Queue = asyncio.Queue()

        async def requests():
            for gid in (1, 2, 3):
                yield pb.GenerationsRequest(id=gid, start=request(n), log_id=f"g{gid}")
            yield pb.GenerationsRequest(id=4, start=request(n, top_n=2), log_id="g4")
            await outgoing.get()  # keep our side open until every generation finished

        seen, forms, done, per_message = {}, {}, set(), []
        call = stub.Generations(requests())
        async for response in call:
            assert not {u.id for u in response.updates} & set(response.tokens_of)  # never both in one message
            per_message.append(len(response.updates) + len(set(response.tokens_of)))
            for u in response.updates:
                seen.setdefault(u.id, []).extend(t.id for t in u.response.tokens)
                forms.setdefault(u.id, []).append("update")
                if u.response.finish_reason:
                    done.add(u.id)
            for gid, token in zip(response.tokens_of, response.token_ids):
                seen.setdefault(gid, []).append(token)
                forms.setdefault(gid, []).append("packed")
            if done == {1, 2, 3, 4}:
                break
        call.cancel()
        return seen, forms, per_message

    seen, forms, per_message = run(router_loop, go)(tiny_shard.address)
    assert {gid: len(ids) for gid, ids in seen.items()} == {1: n, 2: n, 3: n, 4: n}
    assert seen[1] == seen[2] == seen[3] == seen[4]  # one prompt, greedy: packing loses or reorders nothing
    assert max(per_message) == 4  # the decode steps of the four: one message each, not four
    # A generation's first message (the prompt's size) and its last (the finish reason) are updates; plain
    # tokens between them are packed; one that asked for alternatives is never packed. (How many steps one
    # message holds depends on how fast this loop reads: the counts are not asserted.)
    assert all(forms[gid][0] == forms[gid][-1] == "update" for gid in forms)
    assert any("packed" in forms[gid] for gid in (1, 2, 3)) and "packed" not in forms[4]
    wait_until_idle(tiny_shard.engine)


def test_a_refused_generation_fails_alone(router_loop, tiny_shard):
    vocab = tiny_shard.engine.model.cfg.vocab_size

    async def go(stub):
        stream = SharedStream(stub)
        bad = stream.start(request(4, [vocab + 5]), "bad")
        good = stream.start(request(7), "good")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(bad)
        ok = await collect(good)
        await stream.close()
        return refused.value, ok

    refused, ok = run(router_loop, go)(tiny_shard.address)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in refused.details()
    assert len(tokens(ok)) == 7


def test_cancel_frees_the_sequence_and_wakes_the_reader(router_loop, tiny_shard):
    async def go(stub):
        stream = SharedStream(stub)
        long = stream.start(request(100_000 // 100), "long")
        first = await long.__anext__()
        reader = asyncio.ensure_future(long.__anext__())
        await asyncio.sleep(0)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        after = await collect(stream.start(request(3), "after"))  # the stream goes on
        await stream.close()
        return first, after

    first, after = run(router_loop, go)(tiny_shard.address)
    assert first.prompt_tokens == 4
    assert len(tokens(after)) == 3
    wait_until_idle(tiny_shard.engine)


def test_closing_the_stream_cancels_its_generations(router_loop, tiny_shard):
    async def go(stub):
        stream = SharedStream(stub)
        calls = [stream.start(request(1000), str(i)) for i in range(2)]
        for call in calls:
            await call.__anext__()
        await stream.close()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await collect(calls[0])
        return ended.value

    ended = run(router_loop, go)(tiny_shard.address)
    assert ended.code() == grpc.StatusCode.CANCELLED
    wait_until_idle(tiny_shard.engine)
