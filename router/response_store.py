"""Stored responses (`store`, `previous_response_id`, GET/DELETE /v1/responses/{id}): in memory, per owner
(API key), bounded by a count and a byte size per owner, least recently used first out.

Nothing survives a restart, and an evicted response is as gone as a deleted one: both answer 404.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .background import BackgroundRun


@dataclass
class StoredResponse:
    response: dict  # the response object, as GET returns it
    input_items: list[dict]  # this request's own input, as GET .../input_items lists it
    context: list[dict]  # the whole conversation as input items: what a follow-up continues from
    run: BackgroundRun | None = None  # a background response's task and events (background.py)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        # What it costs to keep: its JSON size (the conversation dominates; it grows along a chain), and a
        # background run's events so far.
        events = self.run.events if self.run else []
        self.size = len(json.dumps([self.response, self.input_items, self.context, events],
                                   ensure_ascii=False).encode())


class ResponseStore:
    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._owners: dict[str, OrderedDict[str, StoredResponse]] = {}
        self._bytes: dict[str, int] = {}

    def put(self, owner: str, response_id: str, record: StoredResponse) -> bool:
        """Keep it, evicting the owner's least recently used ones to make room; False when it is larger
        than the whole allowance (then it is not kept)."""
        if record.size > self.max_bytes or self.max_count < 1:
            return False
        kept = self._owners.setdefault(owner, OrderedDict())
        self.delete(owner, response_id)
        while kept and (len(kept) >= self.max_count or self._bytes[owner] + record.size > self.max_bytes):
            _, evicted = kept.popitem(last=False)
            self._bytes[owner] -= evicted.size
        kept[response_id] = record
        self._bytes[owner] = self._bytes.get(owner, 0) + record.size
        return True

    def get(self, owner: str, response_id: str) -> StoredResponse | None:
        kept = self._owners.get(owner)
        if kept is None or response_id not in kept:
            return None
        kept.move_to_end(response_id)
        return kept[response_id]

    def delete(self, owner: str, response_id: str) -> bool:
        kept = self._owners.get(owner)
        if kept is None or response_id not in kept:
            return False
        self._bytes[owner] -= kept.pop(response_id).size
        return True

    def usage(self, owner: str) -> tuple[int, int]:
        """(responses kept, bytes kept) for one owner."""
        return len(self._owners.get(owner, ())), self._bytes.get(owner, 0)
