"""A stand-in for the router's ShardPool that answers every request with scripted text, and the in-process
app around it (httpx over ASGI: no ports, no subprocess), for the router-tier tests of what the routes
make of a generation. Imported as `scripted_pool` (tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import asyncio
import json

import httpx

from router.app import create_app
from router.config import RouterSettings
from router.contract import FinishReason, Reply, ShardInfo, Token


class ScriptedPool:
    """The ShardPool interface the app uses; `generate` answers every request with `text`'s tokens, one per
    message, the last with `finish` (or, with `fail`, the stream breaks off after the first)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.info = ShardInfo(model_id="fake", vocab_size=len(tokenizer), eos_token_ids=[tokenizer.eos_token_id],
                              max_position_embeddings=512)
        self.replicas: list = []
        self.requests: list = []
        self.text = "Hello there, friend"
        self.finish = FinishReason.EOS
        self.fail = False
        self.release = asyncio.Event()
        self.release.set()

    async def health(self) -> list:
        return []

    async def generate(self, request):
        self.requests.append(request)
        await self.release.wait()
        ids = self.tokenizer(self.text, add_special_tokens=False).input_ids
        for i, token in enumerate(ids):
            last = i == len(ids) - 1
            yield Reply(tokens=[Token(id=token, logprob=-0.5)], prompt_tokens=len(request.input_ids),
                        finish_reason=self.finish if last else None)
            if self.fail:
                return

    def start(self, request, on_reply, on_end) -> Pushed:
        """`generate`, pushed to callbacks as ShardPool.start pushes a replica's replies."""
        return Pushed(self.generate(request), on_reply, on_end)

    def abort_all(self, reason: str) -> int:
        return 0

    async def close(self) -> None:
        pass

    def prompt(self, index: int = -1) -> str:
        return self.tokenizer.decode(list(self.requests[index].input_ids))


class Pushed:
    """Replies handed to `on_reply` as they come, then `on_end(None)` if none had a finish reason."""

    def __init__(self, replies, on_reply, on_end) -> None:
        self.task = asyncio.ensure_future(self._run(replies, on_reply, on_end))

    async def _run(self, replies, on_reply, on_end) -> None:
        last = None
        async for last in replies:
            on_reply(last)
        if last is None or last.finish_reason is None:
            on_end(None)

    def cancel(self) -> None:
        self.task.cancel()


def run_in_process(model_dir, tokenizer, check, **settings) -> None:
    """Run `await check(client, pool)` against the app over a fresh ScriptedPool."""
    async def main():
        pool = ScriptedPool(tokenizer)
        app = create_app(RouterSettings(model_id=str(model_dir), **settings), pool=pool)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
                await check(client, pool)

    asyncio.run(main())


def chunks_of(text: str) -> list[dict]:
    """An OpenAI stream's chunks: each event's data line (an `id:` line comes before it), the last `[DONE]`."""
    events = [block.split("\n")[-1].removeprefix("data: ") for block in text.strip("\n").split("\n\n")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]
