"""The Responses API's stream: typed events in OpenAI's order, each with its `sequence_number` (the SSE
`event:` line carries the type too, see sse.EventStream's `named`).

    response.created, response.in_progress,
    per output item: response.output_item.added,
        a message: response.content_part.added, response.output_text.delta (one per piece of text),
                   response.output_text.done, response.content_part.done
        a function call: response.function_call_arguments.delta, response.function_call_arguments.done
    response.output_item.done,
    then response.completed, or response.incomplete (cut by max_output_tokens),
    or, when the generation fails mid-way, an `error` event and response.failed.

Plain text streams as it is generated, and so do function calls (each its own item, added once its name is
complete, then its arguments as they are written: constraints.ToolCallReader; an item is done when the next
one begins, the last at the end). A text answer under tools (`no_tool`) is only known once its JSON is
complete, so its item's events all come at the end.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

from . import constraints
from .generation import Generation, IncompleteGeneration
from .jobs import Job
from .pool import ShardError
from .state import Router

if TYPE_CHECKING:  # responses imports this module
    from .responses import Draft

log = logging.getLogger("sluice.router")


class Sequence:
    """Numbers the events of one stream, from 0."""

    def __init__(self) -> None:
        self.next = 0

    def event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.next, **fields}
        self.next += 1
        return event


async def stream_events(router: Router, job: Job, draft: Draft, keep: Callable[[dict], None]) -> AsyncIterator[dict]:
    seq = Sequence()
    yield seq.event("response.created", response=draft.object("in_progress", []))
    yield seq.event("response.in_progress", response=draft.object("in_progress", []))
    gen = Generation(prompt_tokens=draft.prompt_tokens)
    reader = constraints.ToolCallReader() if draft.tools else None
    pending: list[dict] = []  # logprobs of tokens whose text is not out yet (go with the next delta)
    closed = 0  # function_call items done (their done events sent) while the stream ran
    if reader is None:
        for event in _message_opening(seq, 0, draft.message("", "in_progress")):
            yield event
    try:
        async for piece in router.textgen.generate(job.request, job.stops, True, gen):
            if reader is None:
                if piece.token:
                    pending += draft.logprobs([piece.token], [piece.top_tokens])
                if piece.text:
                    yield _text_delta(seq, draft.message_id, 0, piece.text, pending)
                    pending = []
                continue
            for event in _call_progress(seq, draft, reader, piece.text, bool(piece.finish_reason)):
                if event["type"] == "response.output_item.done":
                    closed += 1
                yield event
    except (ShardError, IncompleteGeneration) as exc:
        kind = "incomplete_generation" if isinstance(exc, IncompleteGeneration) else "generation"
        log.warning("stream failed: %s", exc)
        yield seq.event("error", code=kind, message=str(exc), param=None)
        yield seq.event("response.failed", response=draft.object(
            "failed", [], gen, error={"code": "server_error", "message": str(exc)}))
        return
    output = draft.output(gen)
    for index, item in enumerate(output):
        if index < closed:
            continue  # a call done before the next one began
        if reader is not None and not reader.calling:  # a text answer under tools: known only now
            for event in _message_opening(seq, index, {**item, "status": "in_progress", "content": []}):
                yield event
            if item["content"][0]["text"]:
                yield _text_delta(seq, item["id"], index, item["content"][0]["text"], [])
        for event in _closing(seq, index, item):
            yield event
    status = draft.status(gen)
    response = draft.object(status, output, gen)
    keep(response)
    yield seq.event(f"response.{status}", response=response)


def _call_progress(seq: Sequence, draft: Draft, reader: constraints.ToolCallReader, text: str,
                   last: bool) -> Iterator[dict]:
    """Function calls as they are written: each item once its name is complete (the call before it, then
    complete, done first), then its arguments."""
    for k, name, arguments in reader.add(text) + (reader.finish() if last else []):
        if name is None:
            yield seq.event("response.function_call_arguments.delta", item_id=draft.call_item(k)[0],
                            output_index=k, delta=arguments)
            continue
        if k > 0:
            before = draft.call(k - 1, reader.calls[k - 1].name, reader.arguments(k - 1), "completed")
            for event in _closing(seq, k - 1, before):
                yield event
        yield seq.event("response.output_item.added", output_index=k, item=draft.call(k, name, "", "in_progress"))


def _text_delta(seq: Sequence, item_id: str, index: int, text: str, logprobs: list[dict]) -> dict:
    return seq.event("response.output_text.delta", item_id=item_id, output_index=index, content_index=0,
                     delta=text, logprobs=logprobs)


def _message_opening(seq: Sequence, index: int, item: dict) -> Iterator[dict]:
    yield seq.event("response.output_item.added", output_index=index, item=item)
    yield seq.event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                    part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})


def _closing(seq: Sequence, index: int, item: dict) -> Iterator[dict]:
    if item["type"] == "message":
        part = item["content"][0]
        yield seq.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                        text=part["text"], logprobs=part["logprobs"])
        yield seq.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=part)
    else:
        yield seq.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        name=item["name"], arguments=item["arguments"])
    yield seq.event("response.output_item.done", output_index=index, item=item)
