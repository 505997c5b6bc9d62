"""Reading tool calls as they are written (router/constraints.ToolCallReader), without a server: however the
text is cut into pieces, each call's name comes once, before its arguments, and its argument pieces put
together are exactly its final arguments; a call cut short is still a call; `no_tool` is text."""
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from router.constraints import ToolCallReader, parse_tool_calls

CALLS = [("get_weather", {"city": "Paris", "note": "a } and a \" inside"}),
         ("book", {"place": {"city": "Lyon", "tags": ["x", "}"]}, "nights": 2}),
         ("ping", {})]
TEXT = "\n".join(json.dumps({"name": n, "arguments": a}, separators=(",", ":")) for n, a in CALLS)


def read(text: str, cuts: list[int]) -> tuple[list[str], list[str]]:
    """(names, arguments) as the reader hands them out over `text` cut at `cuts`."""
    reader, names, arguments = ToolCallReader(), [], []
    bounds = [0, *sorted(set(cuts)), len(text)]
    progress = [p for a, b in zip(bounds, bounds[1:]) for p in reader.add(text[a:b])] + reader.finish()
    for k, name, piece in progress:
        if name is not None:
            assert k == len(names) and piece == ""
            names.append(name)
            arguments.append("")
        else:
            assert k == len(names) - 1  # the arguments of the call named last
            arguments[k] += piece
    return names, arguments


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(TEXT)), max_size=30))
def test_any_split_gives_the_calls_exactly(cuts):
    names, arguments = read(TEXT, cuts)
    assert names == [n for n, _ in CALLS]
    assert [json.loads(a) for a in arguments] == [a for _, a in CALLS]
    assert arguments == [a for _, a in parse_tool_calls(TEXT)[1]]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, len(TEXT) - 1), st.lists(st.integers(0, len(TEXT)), max_size=10))
def test_a_cut_generation_keeps_its_calls_as_far_as_they_got(end, cuts):
    text = TEXT[:end]
    names, arguments = read(text, [c for c in cuts if c <= end])
    assert list(zip(names, arguments)) == parse_tool_calls(text)[1]
    assert all(TEXT.count(a) for a in arguments)  # each as written, so far


def test_no_tool_is_text_and_a_cut_name_is_text():
    answer = '{"name":"no_tool","arguments":{"content":"Sunny."}}'
    assert read(answer, [5, 20]) == ([], []) and parse_tool_calls(answer) == ("Sunny.", [])
    assert parse_tool_calls('{"name":"get_wea') == ('{"name":"get_wea', [])
