"""The shard's contract (proto/sluice/shard.proto) as the router's code sees it: plain dataclasses.

Protobuf stops at the replica pool (router/pool.py converts requests, router/shard_stream.py replies), so
jobs, generation and the handlers never touch wire types. Field names are the proto's, and so are their
meanings (zero = off; the last reply carries the last token and the finish reason).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(Enum):
    """The router's one vocabulary for why a generation ended; each dialect maps it once, at its edge
    (tgi.TGI_FINISH, openai.OPENAI_FINISH)."""

    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"  # the router's own: a stop string matched in the text


@dataclass
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    typical_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None while sampling: the shard picks one and reports it
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class ShardRequest:
    request_id: str
    input_ids: list[int]
    params: Sampling
    max_new_tokens: int
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    top_n_tokens: int = 0
    grammar: str = ""
    prompt_logprobs: bool = False
    tenant: str = ""  # fair scheduling in the shard (router/tenants.py names it)
    priority: int = 0  # lower is served first
    tenant_weight: float = 0.0  # 0 = off (1.0)


@dataclass
class TopToken:
    id: int
    logprob: float


@dataclass
class Token:
    id: int
    logprob: float
    top_tokens: list[TopToken] = field(default_factory=list)


@dataclass
class Reply:
    """One message of a generation (shard.proto's GenerateResponse). The first carries prompt_tokens, seed and prefill."""

    tokens: list[Token]
    finish_reason: FinishReason | None = None  # LENGTH or EOS, on the last message only
    prompt_tokens: int = 0
    seed: int = 0
    prefill: list[Token] = field(default_factory=list)


@dataclass
class ShardInfo:
    model_id: str = ""
    dtype: str = ""
    device: str = ""
    num_shard: int = 0
    max_position_embeddings: int = 0
    vocab_size: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    kv_cache_tokens: int = 0
    max_batch_size: int = 0
    block_size: int = 0


@dataclass
class ShardHealth:
    ok: bool
    running: int = 0
    waiting: int = 0
    free_kv_blocks: int = 0
    prefill_tokens_per_s: float = 0.0  # measured by the shard over recent steps; 0 until measured
    decode_step_s: float = 0.0
