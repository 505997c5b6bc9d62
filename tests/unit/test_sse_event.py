"""The SSE wire format of one event (router/sse.py `sse_event`): whatever a token's text holds, the event is
one `data:` line that line splitters of every kind keep whole, and its JSON decodes to the same text."""
from __future__ import annotations

import json

import pytest

from router.sse import sse_event

# Every character str.splitlines() (httpx's iter_lines) breaks at, and the ones the SSE spec breaks at.
SPLITTERS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@pytest.mark.parametrize("char", list(SPLITTERS), ids=[f"U+{ord(c):04X}" for c in SPLITTERS])
def test_a_line_break_in_a_tokens_text_stays_inside_one_data_line(char):
    payload = {"token": {"id": 1, "text": f"a{char}b"}, "generated_text": None}
    event = sse_event(payload, event_id="s.1").decode()
    lines = event.splitlines()
    assert len(lines) == 3 and lines[0] == "id: s.1" and lines[1].startswith("data: ") and lines[2] == ""
    assert event.endswith("\n\n") and event.count("\n") == 3
    assert json.loads(lines[1][len("data: "):]) == payload
