"""Request bodies, with TGI's and OpenAI's field names. Unknown fields are ignored and nulls mean "unset",
because clients send every field they know about (huggingface_hub sends `null` for what the user left out).

Range checks that need no tokenizer live here as field constraints; the ones that need the prompt's
length (input and total token budgets) are in app.py.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Temperature = Annotated[float | None, Field(ge=0)]
TopP = Annotated[float | None, Field(gt=0, le=1)]
TopK = Annotated[int | None, Field(ge=0, lt=2**31)]  # a uint32 on the wire: larger ones would not fit
Penalty = Annotated[float | None, Field(gt=0)]
OpenAIPenalty = Annotated[float | None, Field(ge=-2, le=2)]
NewTokens = Annotated[int | None, Field(gt=0, lt=2**32)]  # uint32 on the wire
Seed = Annotated[int | None, Field(ge=0, lt=2**64)]


class _Body(BaseModel):
    # No inf/nan floats: JSON's 1e999 parses as inf, and an infinite temperature or penalty makes NaN logits.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def _one_sequence(value: int | None, info) -> int | None:
    if value is not None and value > 1:
        raise ValueError(f"{info.field_name} > 1 is not supported: this server generates one sequence per request")
    return value


# ---- TGI ----


class Parameters(_Body):
    best_of: int | None = None
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
    typical_p: float | None = None  # accepted, not applied
    watermark: bool | None = None  # accepted, not applied
    grammar: Any = None

    _best_of = field_validator("best_of")(_one_sequence)

    @field_validator("grammar")
    @classmethod
    def _no_grammar(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("grammar-constrained generation is not supported by this server")
        return value


class GenerateRequest(_Body):
    inputs: str
    parameters: Parameters | None = None
    stream: bool | None = None


class TokenizeRequest(_Body):
    inputs: str


# ---- OpenAI ----


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ("system", "developer", "user", "assistant", "tool"):
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


class _OpenAISampling(_Body):
    model: str | None = None
    max_tokens: NewTokens = None
    temperature: Annotated[float | None, Field(ge=0, le=2)] = None
    top_p: TopP = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: Seed = None
    frequency_penalty: OpenAIPenalty = None
    presence_penalty: OpenAIPenalty = None
    n: int | None = None
    # Not OpenAI, but vLLM and TGI accept them and some clients send them.
    top_k: TopK = None
    repetition_penalty: Penalty = None

    _n = field_validator("n")(_one_sequence)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else self.stop


class ChatCompletionRequest(_OpenAISampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: NewTokens = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools):
        if tools:
            raise ValueError("tool calling is not supported by this server")
        return tools


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[int]
    logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    echo: bool | None = None
    best_of: int | None = None

    _best_of = field_validator("best_of")(_one_sequence)


def describe(error: ValidationError) -> str:
    """One readable line from pydantic's error list: `field.path: message; ...`."""
    parts = []
    for e in error.errors():
        # Union types add the tried type to the path (e.g. "str"); drop those for the user.
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and "[" in p or p in ("str", "int")))
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(dict.fromkeys(parts))
