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
    "To call one, answer with only a JSON object {{\"name\": <function name>, \"arguments\": <arguments object>}}.{auto}"
)
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

    @property
    def tools(self) -> bool:
        """Whether the output is a tool call under tools_grammar (to be read with parse_tool_call)."""
        return bool(self.functions)

    def system_prompt(self) -> str | None:
        return tool_system_prompt(self.functions, self.allow_text) if self.functions else None


def structure(functions: list[dict] | None, tool_choice: str | None, tool_name: str | None,
              format_grammar: Callable[[], str | None], format_given: bool, format_field: str) -> Structure:
    """The one rule set for tools and output formats, both OpenAI dialects: tools and a non-text format
    exclude each other; a tool_choice other than none/auto needs tools. `format_grammar` compiles the
    dialect's format (only called when there are no tools to call)."""
    if functions and format_given:
        raise ApiError(422, f"{format_field}: cannot be combined with tools")
    if functions:
        chosen, allow_text = chosen_tools(functions, tool_choice, tool_name)
        if chosen:
            return Structure(tools_grammar(chosen, allow_text), chosen, allow_text)
    elif tool_choice not in (None, "none", "auto"):
        raise ApiError(422, "tool_choice: needs tools")
    return Structure(format_grammar() or "")


def tools_grammar(functions: list[dict], allow_text: bool) -> str:
    def call(name: str, parameters: dict) -> dict:
        return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
                "required": ["name", "arguments"], "additionalProperties": False}

    # A function takes the arguments it declares: unless the schema says otherwise, no others.
    options = [call(f["name"], {"additionalProperties": False, **(f.get("parameters") or {"type": "object"})})
               for f in functions]
    if allow_text:
        options.append(call(NO_TOOL, {"type": "object", "properties": {"content": {"type": "string"}},
                                      "required": ["content"], "additionalProperties": False}))
    return json_schema_grammar({"anyOf": options}, "tools")


def tool_system_prompt(functions: list[dict], allow_text: bool) -> str:
    listing = "\n".join(json.dumps(f, separators=(",", ":")) for f in functions)
    return TOOL_PROMPT.format(tools=listing, auto=_AUTO_HINT if allow_text else "")


def call_text(name: str, arguments: str | dict) -> str:
    """A call as tools_grammar makes the model write it (for the history of a conversation): `arguments`
    as an object, not as the JSON string OpenAI's messages carry it in."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass  # not JSON (a client's own history): kept as the text it is
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":"))


# The head of a call under tools_grammar, up to where its arguments begin.
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallReader:
    """Reads a generation under tools_grammar as it is written: the function's name as soon as it is
    complete, then its arguments' JSON text piece by piece. The call's own closing brace (and any space
    before it) is held back, so the pieces put together are exactly the final `arguments`."""

    def __init__(self) -> None:
        self.text = ""
        self.name: str | None = None
        self._start = 0  # where the arguments begin
        self._sent = 0

    @property
    def calling(self) -> bool:
        """Whether this is a call (its name is known and is not `no_tool`)."""
        return self.name is not None and self.name != NO_TOOL

    def add(self, piece: str) -> str:
        """Append generated text; returns the argument text that is certain now (none before the name)."""
        self.text += piece
        if self.name is None:
            head = _CALL_HEAD.match(self.text)
            if head is None:
                return ""
            self.name = json.loads(head.group(1))
            self._start = self._sent = head.end()
        return self._release(len(self.text.rstrip()) - 1) if self.calling else ""

    def finish(self) -> str:
        """The rest of the arguments, the generation being over."""
        return self._release(self._start + len(self.arguments)) if self.calling else ""

    @property
    def arguments(self) -> str:
        """The arguments as written: the whole object, or as far as it got when the generation was cut."""
        try:
            _, end = json.JSONDecoder().raw_decode(self.text, self._start)
        except ValueError:
            return self.text[self._start:]
        return self.text[self._start:end]

    def _release(self, upto: int) -> str:
        out = self.text[self._sent:upto] if upto > self._sent else ""
        self._sent = max(self._sent, upto)
        return out


def parse_tool_call(text: str, call_id: str | None = None) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) from a whole generation under tools_grammar. A call cut short (length) is
    still a call, with the arguments as far as they got; a `no_tool` answer is content, and so is a
    generation cut before the function's name was complete."""
    reader = ToolCallReader()
    reader.add(text)
    if reader.calling:
        return None, [{"id": call_id or new_call_id(), "type": "function",
                       "function": {"name": reader.name, "arguments": reader.arguments}}]
    try:
        return json.loads(text)["arguments"].get("content", ""), None
    except ValueError:
        return text, None
