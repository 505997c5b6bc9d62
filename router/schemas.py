"""Request bodies, with TGI's and OpenAI's field names. Nulls mean "unset", because clients send every
field they know about (huggingface_hub sends `null` for what the user left out). Unknown fields are kept
aside (`ignored_fields()`), logged and named in the `x-sluice-ignored-fields` response header: OpenAI
clients send fields like `store` or `metadata` that change nothing about generation. A known field with a
value this server cannot honour is a 422 naming it, never silently dropped.

Range checks that need no tokenizer live here as field constraints; the ones that need the prompt's
length (input and total token budgets) are in app.py.
"""
from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import listed

Temperature = Annotated[float | None, Field(ge=0)]
TopP = Annotated[float | None, Field(gt=0, le=1)]
TopK = Annotated[int | None, Field(ge=0, lt=2**31)]  # a uint32 on the wire: larger ones would not fit
Penalty = Annotated[float | None, Field(gt=0)]
OpenAIPenalty = Annotated[float | None, Field(ge=-2, le=2)]
NewTokens = Annotated[int | None, Field(gt=0, lt=2**32)]  # uint32 on the wire
Seed = Annotated[int | None, Field(ge=0, lt=2**64)]


class _Body(BaseModel):
    # No inf/nan floats: JSON's 1e999 parses as inf, and an infinite temperature or penalty makes NaN logits.
    # Strict types, as the OpenAPI document states them: no "true" or 1 for a boolean, no "5" for a number
    # (an int is still a float); JSON has the types, a client that sends the wrong one gets a 422 naming it.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class _Request(_Body):
    """A top-level body: unknown fields are kept so the route can name them."""

    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class _Scheduled(_Request):
    """Top-level on every generation body, TGI's and OpenAI's (vLLM's `priority` extra)."""

    priority: Annotated[int | None, Field(ge=-(2**31), lt=2**31)] = None  # lower is served first; int32 on the wire
    deadline: Annotated[float | None, Field(gt=0)] = None  # seconds from now (router/deadline.py)


def _enum(*values: str) -> Any:
    """The values a string field takes, for the OpenAPI document; the check that names the field stays in
    its validator (or in constraints.py), so the 422 reads as before."""
    return Field(json_schema_extra={"enum": list(values)})


def _must_be_unset(value: Any, info) -> Any:
    if value not in (None, False, ""):
        raise ValueError(f"{info.field_name} is not supported by this server")
    return value


# ---- TGI ----


class Grammar(_Body):
    type: Annotated[str, _enum("json", "json_object", "json_schema", "regex")]  # checked in constraints.py
    value: Any = None


class Parameters(_Request):
    adapter_id: str | None = None
    best_of: Annotated[int | None, Field(ge=1)] = None
    decoder_input_details: bool | None = None
    details: bool | None = None
    do_sample: bool | None = None
    frequency_penalty: OpenAIPenalty = None
    max_new_tokens: NewTokens = None
    repetition_penalty: Penalty = None
    return_full_text: bool | None = None
    seed: Seed = None
    stop: list[str] | None = None
    temperature: Temperature = None
    top_k: TopK = None
    top_n_tokens: Annotated[int | None, Field(ge=0, lt=2**32)] = None
    top_p: TopP = None
    truncate: Annotated[int | None, Field(gt=0, lt=2**32)] = None
    typical_p: Annotated[float | None, Field(gt=0, le=1)] = None
    watermark: bool | None = None
    grammar: Grammar | None = None

    _unsupported = field_validator("watermark", "adapter_id")(_must_be_unset)


class GenerateRequest(_Scheduled):
    inputs: Annotated[str, Field(json_schema_extra={"minLength": 1})]  # an empty prompt: 422 in jobs.tgi_job
    parameters: Parameters | None = None
    stream: bool | None = None


class TokenizeRequest(_Request):
    inputs: str


# ---- OpenAI ----


class ContentPart(_Body):
    type: Annotated[str, _enum("text")]  # others are refused by Message._text_only
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str | dict = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


ROLES = ("system", "developer", "user", "assistant", "tool")


class Message(_Body):
    role: Annotated[str, _enum(*ROLES)]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message answers this call

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: expected system, developer, user, assistant or tool")
        return role

    @field_validator("content")
    @classmethod
    def _text_only(cls, content):
        for part in content if isinstance(content, list) else ():
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r} is not supported: only text parts are")
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool | None = None


class ResponseFormat(_Body):
    type: Annotated[str, _enum("text", "json_object", "json_schema")]  # checked in constraints.py
    json_schema: dict | None = None


class Function(_Body):
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(_Body):
    type: Annotated[str, _enum("function")]
    function: Function

    @field_validator("type")
    @classmethod
    def _function_only(cls, kind: str) -> str:
        if kind != "function":
            raise ValueError(f"tool type {kind!r} is not supported: only function")
        return kind


class NamedToolChoice(_Body):
    type: str = "function"
    function: Function | dict


class OpenAISampling(_Scheduled):
    """The sampling fields every OpenAI route takes (jobs.openai_job reads them): chat, completions, Responses."""

    temperature: Annotated[float | None, Field(ge=0, le=2)] = None
    top_p: TopP = None
    stop: str | list[str] | None = None
    seed: Seed = None
    frequency_penalty: OpenAIPenalty = None
    presence_penalty: OpenAIPenalty = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]] | None,
                          Field(json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}})] = None
    user: str | None = None  # accepted; this server keeps no per-user state
    # Not OpenAI, but vLLM and TGI accept them and some clients send them.
    top_k: TopK = None
    repetition_penalty: Penalty = None
    ignore_eos: bool | None = None  # vLLM's and llama.cpp's: generate max_tokens even past the model's eos

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias):
        bad = [key for key in bias or {} if not key.isdigit()]
        if bad:
            raise ValueError(f"keys must be token ids, got {listed([shown(k) for k in bad])}")
        return bias

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else self.stop


class _OpenAISampling(OpenAISampling):
    model: str | None = None
    max_tokens: NewTokens = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Annotated[int | None, Field(ge=1, le=16)] = None

    @model_validator(mode="after")
    def _options_need_a_stream(self):
        # As OpenAI answers it: options for a stream that is not there are a mistake, not a no-op.
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self


class ChatCompletionRequest(_OpenAISampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: NewTokens = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # true: several calls per choice (see constraints.structure)

    @field_validator("tool_choice")
    @classmethod
    def _choice(cls, choice):
        if isinstance(choice, str) and choice not in ("none", "auto", "required"):
            raise ValueError(f"expected none, auto, required or a named function, got {choice!r}")
        return choice


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # one prompt, or several (jobs.completion_prompts)
    logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    echo: bool | None = None
    best_of: Annotated[int | None, Field(ge=1)] = None
    suffix: str | None = None

    _suffix = field_validator("suffix")(_must_be_unset)


def describe(error: ValidationError) -> str:
    """One readable line from pydantic's error list: `field.path: message, got <value>; ...`, naming each
    offending value the client sent (a plain one: an object or a list is named by its field)."""
    parts = []
    for e in error.errors():
        # Union types add the tried type to the path (e.g. "str"); drop those for the user.
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and "[" in p or p in ("str", "int")))
        msg = e["msg"].removeprefix("Value error, ")
        if "got " not in msg and not isinstance(e.get("input"), (dict, list)) and e["type"] != "missing":
            msg += f", got {shown(e.get('input'))}"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(dict.fromkeys(parts))


def shown(value: Any, limit: int = 80) -> str:
    """A value as the client wrote it (JSON), cut at `limit` characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
