"""Constrained decoding, router side: JSON schemas, regexes and tool lists become llguidance grammars
(checked here, so a bad one is a 422 before any work), which the shard applies as logit masks.

Tool calling is a JSON grammar over the offered functions: the model writes
`{"name": ..., "arguments": {...}}`, which the routes turn into OpenAI `tool_calls`. With
`tool_choice: "auto"` one more choice, `{"name": "no_tool", "arguments": {"content": "..."}}`, lets
the model answer in plain text (TGI's approach). Templates that know no tools (SmolLM2's) get the
functions and that output format in a system message (TOOL_PROMPT).
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from llguidance import LLMatcher

from .errors import ApiError

NO_TOOL = "no_tool"
# Compact JSON: a small model wanders in flexible whitespace, and every space costs a step.
_JSON_OPTIONS = {"whitespace_flexible": False}

TOOL_PROMPT = (
    "You can call these functions:\n{tools}\n"
    "To call one, answer with only a JSON object {{\"name\": <function name>, \"arguments\": <arguments object>}}."
    "{parallel}{auto}"
)
_PARALLEL_HINT = " To call several, write one such object per line."
_AUTO_HINT = f" To answer without a call, use the name \"{NO_TOOL}\" with arguments {{\"content\": <your answer>}}."


def _checked(grammar: str, field: str) -> str:
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise ApiError(422, f"{field}: {error}")
    return grammar


def json_schema_grammar(schema: dict | str, field: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ApiError(422, f"{field}: the schema is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise ApiError(422, f"{field}: a JSON schema must be an object")
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except ValueError as exc:
        raise ApiError(422, f"{field}: {exc}") from exc
    return _checked(grammar, field)


def regex_grammar(regex: str, field: str) -> str:
    return _checked(LLMatcher.grammar_from_regex(regex), field)


def tgi_grammar(grammar: dict) -> str:
    """TGI's `{"type": "json" | "json_schema" | "regex", "value": ...}`."""
    kind, value = grammar.get("type"), grammar.get("value")
    if kind in ("json", "json_object", "json_schema"):
        return json_schema_grammar(value if value is not None else {"type": "object"}, "parameters.grammar.value")
    if kind == "regex":
        if not isinstance(value, str):
            raise ApiError(422, "parameters.grammar.value: a regex must be a string")
        return regex_grammar(value, "parameters.grammar.value")
    raise ApiError(422, f"parameters.grammar.type: expected json or regex, got {kind!r}")


def format_grammar(kind: str | None, spec: dict, field: str, schema_field: str) -> str | None:
    """An output format: `text` (no grammar), `json_object`, or `json_schema` with `spec["schema"]`. Chat's
    `response_format` and the Responses API's `text.format` both come here, each naming its own fields."""
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}, field)
    if kind == "json_schema":
        if "schema" not in spec:
            raise ApiError(422, f"{schema_field}: required for type json_schema")
        return json_schema_grammar(spec["schema"], schema_field)
    raise ApiError(422, f"{field}.type: expected text, json_object or json_schema, got {kind!r}")


def chosen_tools(functions: list[dict], tool_choice: str | None, name: str | None = None) -> tuple[list[dict], bool]:
    """(the functions the model may call, whether it may also answer without a call). `tool_choice` is
    none, auto (None too), required, or a named function (`name`). No functions: no grammar."""
    if tool_choice in (None, "auto"):
        return functions, True
    if tool_choice == "none":
        return [], True
    if tool_choice == "required":
        return functions, False
    named = [f for f in functions if f["name"] == name]
    if not named:
        raise ApiError(422, f"tool_choice: no tool named {name!r} in tools")
    return named, False


@dataclass
class Structure:
    """What constrains one OpenAI answer (chat or Responses): a grammar, and the functions it may call."""

    grammar: str = ""
    functions: list[dict] = field(default_factory=list)
    allow_text: bool = True  # with functions: the model may answer in text (`no_tool`)
    parallel: bool = False  # with functions: the model may write several calls, one per line

    @property
    def tools(self) -> bool:
        """Whether the output is tool calls under tools_grammar (to be read with parse_tool_calls)."""
        return bool(self.functions)

    def system_prompt(self) -> str | None:
        return tool_system_prompt(self.functions, self.allow_text, self.parallel) if self.functions else None


def structure(functions: list[dict] | None, tool_choice: str | None, tool_name: str | None,
              format_grammar: Callable[[], str | None], format_given: bool, format_field: str,
              parallel_tool_calls: bool | None = None) -> Structure:
    """The one rule set for tools and output formats, both OpenAI dialects: tools and a non-text format
    exclude each other; a tool_choice other than none/auto needs tools; one answer holds several calls only
    with `parallel_tool_calls: true`, not at OpenAI's default (true when unset). That field is a permission,
    so one call is within it, and a small model given the choice repeats its call until max_tokens
    (SmolLM2-135M: the same get_weather call over and over); llama.cpp's server makes the same choice.
    `format_grammar` compiles the dialect's format (only called when there are no tools to call)."""
    parallel = parallel_tool_calls is True
    if functions and format_given:
        raise ApiError(422, f"{format_field}: cannot be combined with tools")
    if functions:
        chosen, allow_text = chosen_tools(functions, tool_choice, tool_name)
        if chosen:
            return Structure(tools_grammar(chosen, allow_text, parallel), chosen, allow_text, parallel)
    elif tool_choice not in (None, "none", "auto"):
        raise ApiError(422, "tool_choice: needs tools")
    return Structure(format_grammar() or "")


def _call_schema(name: str, parameters: dict | None) -> dict:
    """One call as the model writes it, `{"name": ..., "arguments": {...}}`, as a schema of its own. The
    parameters' `$defs` (`definitions` in older drafts) move to its root, where their `#/$defs/...`
    references resolve (pydantic writes every nested model that way). A function takes the arguments it
    declares: unless its schema says otherwise, no others."""
    arguments = {"additionalProperties": False, **(parameters or {"type": "object"})}
    defs = {key: arguments.pop(key) for key in ("$defs", "definitions") if key in arguments}
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False, **defs}


_NO_TOOL_CALL = _call_schema(NO_TOOL, {"type": "object", "properties": {"content": {"type": "string"}},
                                       "required": ["content"]})


def tools_grammar(functions: list[dict], allow_text: bool, parallel: bool = False) -> str:
    """A Lark grammar (llguidance's) over the calls: one call, or with `parallel` several, one per line;
    with `allow_text`, a `no_tool` answer instead (alone: it is the whole answer). Each function's call is a
    JSON schema of its own, so that each keeps its own `$defs`."""
    rules = []
    for i, f in enumerate(functions):
        schema = _call_schema(f["name"], f.get("parameters"))
        json_schema_grammar(schema, "tools")  # alone first: a bad schema's 422 says only what is wrong with it
        rules.append(f"call_{i}: %json {json.dumps({**schema, 'x-guidance': _JSON_OPTIONS})}")
    rules.append("call: " + " | ".join(f"call_{i}" for i in range(len(functions))))
    rules.append('calls: call ("\\n" call)*' if parallel else "calls: call")
    if allow_text:
        rules.append(f"no_tool: %json {json.dumps({**_NO_TOOL_CALL, 'x-guidance': _JSON_OPTIONS})}")
    return _checked("\n".join(["start: calls | no_tool" if allow_text else "start: calls", *rules]), "tools")


def tool_system_prompt(functions: list[dict], allow_text: bool, parallel: bool = False) -> str:
    listing = "\n".join(json.dumps(f, separators=(",", ":")) for f in functions)
    return TOOL_PROMPT.format(tools=listing, parallel=_PARALLEL_HINT if parallel else "",
                              auto=_AUTO_HINT if allow_text else "")


def call_text(name: str, arguments: str | dict) -> str:
    """A call as tools_grammar makes the model write it (for the history of a conversation): `arguments`
    as an object, not as the JSON string OpenAI's messages carry it in. Several calls go one per line."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass  # not JSON (a client's own history): kept as the text it is
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":"))


# The head of a call under tools_grammar, up to where its arguments begin (group 1: its opening brace,
# group 2: its name). Calls after the first come after a line break.
_CALL_HEAD = re.compile(r'\s*(\{)\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _json_end(text: str, at: int) -> int | None:
    """Where the JSON value that starts at `at` ends, or None while it is incomplete."""
    try:
        return json.JSONDecoder().raw_decode(text, at)[1]
    except ValueError:
        return None


@dataclass
class _Call:
    name: str
    head: int  # where its object begins
    start: int  # where its arguments begin
    sent: int  # how far its arguments were handed out
    done: bool = False  # its object is complete


class ToolCallReader:
    """Reads a generation under tools_grammar as it is written: each call's name as soon as it is complete,
    then its arguments' JSON text piece by piece. The call's own closing brace (and any space before it) is
    held back until the call is complete, so each call's pieces put together are exactly its final
    `arguments`. A `no_tool` answer is text, read whole at the end (parse_tool_calls)."""

    def __init__(self) -> None:
        self.text = ""
        self.calls: list[_Call] = []
        self.text_answer = False  # the answer is `no_tool`
        self._next = 0  # where the next call's head is looked for

    @property
    def calling(self) -> bool:
        """Whether the answer is calls (a first name is known and is not `no_tool`)."""
        return bool(self.calls)

    def add(self, piece: str) -> list[tuple[int, str | None, str]]:
        """Append generated text; returns what is certain now, in order: `(call index, name, "")` when a
        call's name is complete, `(call index, None, argument text)` as its arguments are written."""
        self.text += piece
        out: list[tuple[int, str | None, str]] = []
        while not self.text_answer:
            call = self.calls[-1] if self.calls and not self.calls[-1].done else None
            if call is None:
                head = _CALL_HEAD.match(self.text, self._next)
                if head is None:
                    break
                name = json.loads(head.group(2))
                if name == NO_TOOL and not self.calls:
                    self.text_answer = True
                    break
                call = _Call(name, head.start(1), head.end(), head.end())
                self.calls.append(call)
                out.append((len(self.calls) - 1, name, ""))
            # A call is complete only once its closing brace is written, which is in this piece.
            end = _json_end(self.text, call.head) if "}" in piece else None
            if end is None:
                self._emit(out, self._release(call, len(self.text.rstrip()) - 1))
                break
            self._emit(out, self._release(call, call.start + len(self.arguments(len(self.calls) - 1))))
            call.done, self._next = True, end
        return out

    def finish(self) -> list[tuple[int, str | None, str]]:
        """The rest of a call cut short, the generation being over."""
        out: list[tuple[int, str | None, str]] = []
        if self.calls and not self.calls[-1].done:
            call = self.calls[-1]
            self._emit(out, self._release(call, call.start + len(self.arguments(len(self.calls) - 1))))
        return out

    def arguments(self, index: int) -> str:
        """A call's arguments as written: the whole object, or as far as it got when the generation was cut."""
        call = self.calls[index]
        end = _json_end(self.text, call.start)
        return self.text[call.start:end] if end is not None else self.text[call.start:]

    def _emit(self, out: list, released: str) -> None:
        if released:
            out.append((len(self.calls) - 1, None, released))

    def _release(self, call: _Call, upto: int) -> str:
        out = self.text[call.sent:upto] if upto > call.sent else ""
        call.sent = max(call.sent, upto)
        return out


def parse_tool_calls(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, [(name, arguments), ...]) from a whole generation under tools_grammar. A call cut short
    (length) is still a call, with the arguments as far as they got; a `no_tool` answer is content, and so
    is a generation cut before the first function's name was complete."""
    reader = ToolCallReader()
    reader.add(text)
    if reader.calling:
        return None, [(c.name, reader.arguments(i)) for i, c in enumerate(reader.calls)]
    try:
        return json.loads(text)["arguments"].get("content", ""), []
    except ValueError:
        return text, []
