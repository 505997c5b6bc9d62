"""The Responses API's request body (`POST /v1/responses`), with OpenAI's field names.

As everywhere (schemas.py): nulls mean unset, unknown fields are named in `x-sluice-ignored-fields`, and a
known field this server cannot honour (another tool type, reasoning, images, audio, files)
is a 422 that names it, never a silent ignore.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from .schemas import NewTokens, OpenAISampling, _Body, _must_be_unset

LOGPROBS = "message.output_text.logprobs"  # the one `include` this server can honour
TEXT_PARTS = ("input_text", "output_text")
ITEM_TYPES = ("message", "function_call", "function_call_output")
ROLES = ("user", "system", "developer", "assistant")


class ContentPart(_Body):
    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, kind: str) -> str:
        if kind not in TEXT_PARTS:
            raise ValueError(f"content part type {kind!r} is not supported: only input_text and output_text")
        return kind


class InputItem(_Body):
    """A message (`type` may be left out, as the SDK's EasyInputMessage does), an earlier function call, or
    a function call's output. One flat model: each kind's required fields are checked below."""

    type: str | None = None
    id: str | None = None
    status: str | None = None
    role: str | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _complete(self) -> "InputItem":
        kind = self.type or "message"
        needs = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
                 "function_call_output": ("call_id", "output")}.get(kind)
        if needs is None:
            raise ValueError(f"input item type {kind!r} is not supported: only {', '.join(ITEM_TYPES)}")
        missing = [f for f in needs if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {kind} item needs {', '.join(missing)}")
        if kind == "message" and self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}: expected {', '.join(ROLES)}")
        return self


class FunctionTool(_Body):
    type: str
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # the arguments always follow the schema here (constrained decoding)

    @model_validator(mode="before")
    @classmethod
    def _function_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "function":
            raise ValueError(f"tool type {data.get('type')!r} is not supported: only function")
        return data


class TextFormat(_Body):
    type: str
    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None  # the output always follows the schema here


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: str | None = None

    @field_validator("verbosity")
    @classmethod
    def _medium_only(cls, verbosity: str | None) -> str | None:
        if verbosity not in (None, "medium"):
            raise ValueError(f"verbosity {verbosity!r} is not supported: only medium")
        return verbosity


class ResponsesRequest(OpenAISampling):
    model: str | None = None
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    max_output_tokens: NewTokens = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # true: several calls per answer (see constraints.structure)
    max_tool_calls: Annotated[int | None, Field(ge=1)] = None  # at most one call is made per answer anyway
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    stream: bool | None = None
    truncation: str | None = None
    background: bool | None = None
    # Known, and refused unless unset: what this server does not do.
    reasoning: Any = None
    include: list[str] | None = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    conversation: Any = None
    prompt: Any = None

    _unsupported = field_validator("conversation", "prompt")(_must_be_unset)

    @field_validator("include")
    @classmethod
    def _logprobs_only(cls, include: list[str] | None) -> list[str] | None:
        other = [i for i in include or [] if i != LOGPROBS]
        if other:
            raise ValueError(f"{', '.join(other)}: not available from this server (only {LOGPROBS})")
        return include

    @property
    def logprobs(self) -> bool:
        return LOGPROBS in (self.include or [])

    @field_validator("reasoning")
    @classmethod
    def _no_reasoning(cls, reasoning: Any) -> Any:
        if isinstance(reasoning, dict) and not any(v is not None for v in reasoning.values()):
            return reasoning
        if reasoning is not None:
            raise ValueError("the model served here does not reason: leave reasoning unset")
        return reasoning

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, truncation: str | None) -> str | None:
        if truncation not in (None, "disabled"):
            raise ValueError(f"truncation {truncation!r} is not supported: only disabled (too long is a 422)")
        return truncation

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, metadata: dict | None) -> dict | None:
        if metadata and (len(metadata) > 16 or any(len(k) > 64 for k in metadata)):
            raise ValueError("at most 16 keys of at most 64 characters")
        return metadata

    @field_validator("tool_choice")
    @classmethod
    def _choice(cls, choice: str | dict | None) -> str | dict | None:
        if isinstance(choice, str) and choice not in ("none", "auto", "required"):
            raise ValueError(f"expected none, auto, required or a function, got {choice!r}")
        if isinstance(choice, dict) and (choice.get("type") != "function" or not isinstance(choice.get("name"), str)):
            raise ValueError(f"only {{\"type\": \"function\", \"name\": ...}} is supported, got type "
                             f"{choice.get('type')!r}")
        return choice
