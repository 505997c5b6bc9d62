"""The router's app state: settings, metrics, tokenizer, pool; what every handler reads."""
from __future__ import annotations

import asyncio
import logging

from starlette.requests import Request

from sluice import modelfiles

from . import constraints, schemas
from .config import RouterSettings
from .errors import ApiError
from .metrics import Metrics
from .pool import ShardPool
from .generation import TextGenerator

log = logging.getLogger("sluice.router")


class Router:
    """What every handler needs; built in the app's lifespan."""

    def __init__(self, settings: RouterSettings, metrics: Metrics, pool: ShardPool | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.source = modelfiles.resolve(settings.model_id)
        self.tokenizer = None
        self.pool: ShardPool | None = pool
        # A pool handed in (tests: an in-process shard or a fake) is the caller's to connect and close.
        self.owns_pool = pool is None
        self.textgen: TextGenerator | None = None

    async def start(self) -> None:
        # Converting the GGUF tokenizer takes seconds: do it while the shards load their weights.
        tokenizer_task = asyncio.create_task(asyncio.to_thread(modelfiles.load_tokenizer, self.source))
        if self.owns_pool:
            self.pool = ShardPool(self.settings.shard_addresses, self.settings.shard_tls_ca,
                                  self.settings.max_failovers, self.metrics.failovers.inc)
            try:
                await self.pool.connect(self.settings.shard_connect_timeout_s)
            except BaseException:
                tokenizer_task.cancel()
                await self.pool.close()
                raise
        self.tokenizer = await tokenizer_task
        self.textgen = TextGenerator(self.tokenizer, self.pool, self.metrics)
        s, info = self.settings, self.pool.info
        if info.max_position_embeddings and s.max_total_tokens > info.max_position_embeddings:
            log.warning("max_total_tokens %d is beyond the model's context; using %d",
                        s.max_total_tokens, info.max_position_embeddings)
            s.max_total_tokens = info.max_position_embeddings
        s.max_input_tokens = min(s.max_input_tokens, s.max_total_tokens - 1)

    @property
    def model_id(self) -> str:
        return self.pool.info.model_id or self.source.model_id

    # ---- from a request body to a shard request ----

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def chat_prompt(self, messages: list[schemas.Message], tools: list[dict] | None = None,
                    tool_system: str | None = None) -> str:
        """The tokenizer's own template; "developer" is OpenAI's newer name for "system". Tools go to a
        template that knows them; otherwise `tool_system` (the functions and the call format) is put
        in front of the first system message, or as one."""
        plain = []
        for m in messages:
            content = m.text()
            if m.tool_calls and not content:  # earlier calls, each written as the model was told to write one
                content = "\n".join(constraints.call_text(c.function.name, c.function.arguments) for c in m.tool_calls)
            plain.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        template = self.tokenizer.chat_template or ""
        extra = {}
        if tools and "tools" in template:
            extra["tools"] = tools
        elif tool_system:
            if plain[0]["role"] == "system":
                plain[0] = {"role": "system", "content": tool_system + "\n\n" + plain[0]["content"]}
            else:
                plain.insert(0, {"role": "system", "content": tool_system})
        try:
            return self.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False, **extra)
        except Exception as exc:  # the template's own raise_exception(), e.g. roles out of order
            raise ApiError(422, f"messages: the chat template rejected them: {exc}") from exc

    def vocab_size(self) -> int:
        return self.pool.info.vocab_size or len(self.tokenizer)


def router_of(request: Request) -> Router:
    return request.app.state.router
