"""Llama-family decoder (Llama, SmolLM2, Qwen2, Mistral) written for the engine.

One forward runs every scheduled token of every sequence at once: the tokens of a step are
flattened into one [T, hidden] matrix for the projections and MLPs (prefill chunks and decode
tokens alike), and only attention looks at sequences: the single-token rows (decodes) together,
through a [B, Lmax] view gathered from a paged KV cache, and each multi-token prompt chunk on its
own, against its own context only. Each tensor-parallel rank holds its slice of the heads and MLP
columns; row-parallel outputs are all-reduced (a no-op at world size 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from shard.models import cpu_kernels
from shard.models.cpu_matmul import float32_matmul
from shard.parallel import TPGroup


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        if rope and rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = None
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", cfg.get("model_type") == "qwen2"),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            bos_token_id=cfg.get("bos_token_id"),
        )


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind is not None:
        raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3 are)")
    return inv_freq.float()


@dataclass
class PromptChunk:
    """One sequence's multi-token chunk of a step: rows [start, start + length) of the step's tokens."""

    start: int
    length: int
    # [L] cache slots of the chunk's whole context (cached prefix, then the chunk itself) and the
    # [length, L] bool mask of which keys each query sees. Both None for a chunk that starts its
    # sequence: its own fresh K/V are the whole context, causal, and nothing is read back.
    context: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass
class AttentionBatch:
    """Where this step's tokens sit: built by the engine once per step, shared by every layer.
    The single-token rows come first (decodes, or a prompt's last token), then the prompt chunks."""

    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    kv_slots: torch.Tensor | None  # [B, Lmax] context slots of each single-token row (padding: 0); None: no such row
    mask: torch.Tensor | None  # [B, 1, Lmax] bool, True where that row may attend the key
    chunks: list[PromptChunk] = field(default_factory=list)

    def to(self, device: torch.device) -> "AttentionBatch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        chunks = [PromptChunk(c.start, c.length, move(c.context), move(c.mask)) for c in self.chunks]
        return AttentionBatch(move(self.slot_mapping), move(self.kv_slots), move(self.mask), chunks)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T. w in the compute dtype, in bfloat16 while x is float32 (the default on CPUs where our
    kernels run; packed for AVX512-BF16 where the CPU has it, cpu_kernels.pack), or int8 with one scale per
    output row (--quantize int8, shard/models/quantize.py)."""
    if cpu_kernels.applies(x, w):
        out = cpu_kernels.linear(x, w, scale)  # narrow weights, float32 rows, on the CPU
    elif scale is not None:
        # ATen's int8 kernel, fast with bfloat16 rows only (float32 ones took 4-15x longer, AVX2 host).
        out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), w, scale.to(torch.bfloat16)).to(x.dtype)
    elif w.dtype != x.dtype:
        out = F.linear(x, w.to(x.dtype))  # bfloat16 weights the kernels cannot take (K not a multiple of 8)
    else:
        # float32 on the CPU: MKL's fastest formulation for the step's shape (shard/models/cpu_matmul.py).
        out = float32_matmul(x, w) if x.dtype == torch.float32 and x.device.type == "cpu" else None
        if out is None:
            return F.linear(x, w, bias)
    return out if bias is None else out + bias


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Half-split rotation (the Hugging Face layout; GGUF's interleaved q/k are un-permuted at load).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.eps = cfg.rms_norm_eps
        self.head_dim = cfg.head_dim
        self.heads = cfg.num_heads // tp.size
        self.kv_heads = tp.kv_heads_per_rank(cfg.num_kv_heads)
        inter = cfg.intermediate_size // tp.size
        h, d = cfg.hidden_size, cfg.head_dim
        self.input_layernorm = nn.Parameter(torch.empty(h))
        # q, k, v fused into one matmul and gate, up into another: fewer, larger ops per step.
        self.qkv_proj = nn.Parameter(torch.empty((self.heads + 2 * self.kv_heads) * d, h))
        self.qkv_bias = nn.Parameter(torch.empty((self.heads + 2 * self.kv_heads) * d)) if cfg.attention_bias else None
        self.o_proj = nn.Parameter(torch.empty(h, self.heads * d))
        self.post_attention_layernorm = nn.Parameter(torch.empty(h))
        self.gate_up_proj = nn.Parameter(torch.empty(2 * inter, h))
        self.down_proj = nn.Parameter(torch.empty(h, inter))
        # Per-row scales of int8 projections (shard/models/quantize.py); None: not quantized.
        self.qkv_proj_scale = self.o_proj_scale = self.gate_up_proj_scale = self.down_proj_scale = None
        self.scale = d**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: AttentionBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        h = rms_norm(x, self.input_layernorm, self.eps)
        x = x + self.attention(h, cos, sin, batch, k_cache, v_cache)
        h = rms_norm(x, self.post_attention_layernorm, self.eps)
        gate, up = linear(h, self.gate_up_proj, self.gate_up_proj_scale).chunk(2, dim=-1)
        return x + self.tp.all_reduce(linear(F.silu(gate) * up, self.down_proj, self.down_proj_scale))

    def attention(self, h, cos, sin, batch: AttentionBatch, k_cache, v_cache) -> torch.Tensor:
        T, d, hq, hkv = h.shape[0], self.head_dim, self.heads, self.kv_heads
        qkv = linear(h, self.qkv_proj, self.qkv_proj_scale, self.qkv_bias)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q = apply_rope(q.view(T, hq, d), cos, sin)
        k = apply_rope(k.view(T, hkv, d), cos, sin)
        v = v.view(T, hkv, d)
        if k_cache.dtype != k.dtype:
            # A narrower cache (float16): a chunk that starts its sequence attends over its fresh K/V, so they
            # are rounded as stored, and a prefix-cache hit reads back exactly what the miss computed with
            # (else a seeded sample could differ between the two).
            k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        k_cache.index_copy_(0, batch.slot_mapping, k)
        v_cache.index_copy_(0, batch.slot_mapping, v)
        outs = []
        if batch.kv_slots is not None:
            rows = q[: batch.kv_slots.shape[0]] if batch.chunks else q  # a decode step: every row
            outs.append(decode_attention(rows, k_cache, v_cache, batch.kv_slots, batch.mask, self.scale))
        for c in batch.chunks:
            rows = slice(c.start, c.start + c.length)
            outs.append(chunk_attention(q[rows], k[rows], v[rows], k_cache, v_cache, c, self.scale))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.tp.all_reduce(linear(out, self.o_proj, self.o_proj_scale))


def gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slots] as whole rows: index_select copies each slot's row at once, where advanced
    indexing copies it element by element (1.1-1.6x faster, eager)."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def decode_attention(q, k_cache, v_cache, kv_slots, mask, scale: float) -> torch.Tensor:
    """One query per sequence ([B, hq, d]) against its context in the paged cache: the contexts
    differ in length, so they are padded to the longest and masked. Each KV head serves its g
    query heads without repeating K/V."""
    if cpu_kernels.attention_applies(q, k_cache):
        # float32 queries on the CPU: our kernel reads each context row in place (shard/models/cpu_kernels.py).
        return cpu_kernels.decode_attention(q, k_cache, v_cache, kv_slots, mask, scale)
    B, L = kv_slots.shape
    hq, d = q.shape[1:]
    hkv = k_cache.shape[1]
    qg = q.view(B, hkv, hq // hkv, d)
    if torch.compiler.is_compiling():
        # Compiled: written as reductions over the gathered rows, which inductor fuses with the
        # gather, so the context is read in place once and never copied (batched matmuls need it
        # gathered into a [B, L] copy first, in every layer): ~1.9x the compiled gather + matmuls
        # per layer at batch 16, 1.9-3.4x at batch 64 (README, Speed).
        keys, values = k_cache[kv_slots].unsqueeze(3).float(), v_cache[kv_slots].unsqueeze(3).float()  # [B, L, hkv, 1, d]
        scores = (qg.unsqueeze(1).float() * keys).sum(-1) * scale  # [B, L, hkv, g]
        probs = torch.softmax(scores.masked_fill(~mask.view(B, L, 1, 1), float("-inf")), dim=1)
        return (probs.unsqueeze(-1) * values).sum(1).to(q.dtype).reshape(B, hq * d)
    # Eager: plain batched matmuls over the gathered context (measured faster than SDPA for decode on CPU).
    keys = gather(k_cache, kv_slots).to(q.dtype).permute(0, 2, 3, 1)  # [B, hkv, d, L]
    values = gather(v_cache, kv_slots).to(q.dtype).transpose(1, 2)  # [B, hkv, L, d]
    scores = torch.matmul(qg, keys).float() * scale  # [B, hkv, g, L]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(B, hq * d)


def chunk_attention(q, k, v, k_cache, v_cache, chunk: PromptChunk, scale: float) -> torch.Tensor:
    """A prompt chunk's queries ([n, hq, d]) against its own context only: no padding to other
    sequences' lengths, and a chunk that starts its sequence reads nothing back from the cache.
    SDPA's fused (flash) kernel never materializes the [n, L] scores, which chunked prefill of a
    long prompt would otherwise build in float32 in every layer."""
    n, hq, d = q.shape
    if chunk.context is None:
        keys, values = k, v  # in the cache's dtype (see DecoderLayer.attention)
    else:
        keys, values = gather(k_cache, chunk.context), gather(v_cache, chunk.context)  # [L, hkv, d]
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
        attn_mask=chunk.mask, is_causal=chunk.context is None, scale=scale, enable_gqa=True,
    )  # [1, hq, n, d]
    return out[0].transpose(0, 1).reshape(n, hq * d)


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: TPGroup) -> None:
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.vocab_per_rank = math.ceil(cfg.vocab_size / tp.size)
        self.embed_tokens = nn.Parameter(torch.empty(self.vocab_per_rank, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(torch.empty(self.vocab_per_rank, cfg.hidden_size))
        self.embed_tokens_scale = self.lm_head_scale = None  # int8 rows' scales (quantize.py)
        # The KV cache's dtype where it is not the compute dtype: float16 under float32 compute on CPUs
        # where our attention kernel runs (shard/hardware.py choose_kv_cache). None: the compute dtype.
        self.kv_cache_dtype: torch.dtype | None = None
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations; the KV cache unless kv_cache_dtype): the norms keep it when the
        matrices are narrower (bfloat16 or int8, shard/models/quantize.py)."""
        return self.norm.dtype

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens.dim() == 4:  # a tied vocabulary packed for AVX512-BF16 (cpu_kernels.pack)
            rows = cpu_kernels.packed_rows(self.embed_tokens, ids).to(self.dtype)
        else:
            rows = F.embedding(ids, self.embed_tokens).to(self.dtype)  # narrow weights: see `linear`
        if self.embed_tokens_scale is None:
            return rows
        return rows * F.embedding(ids, self.embed_tokens_scale.unsqueeze(-1))  # int8 rows' scales, compute dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._lookup(ids)
        # Vocabulary-parallel: each rank looks up the ids it owns, zeros the rest, then all-reduce.
        local = ids - self.tp.rank * self.vocab_per_rank
        owned = (local >= 0) & (local < self.vocab_per_rank)
        out = self._lookup(local.clamp(0, self.vocab_per_rank - 1))
        return self.tp.all_reduce(out * owned.unsqueeze(-1).to(out.dtype))

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        return self.hidden_states(ids, positions, batch, kv_caches)

    def hidden_states(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """`forward` without its inference_mode decorator (the engine calls it inside inference mode):
        `embed_positions`, then every layer. The engine's steps run the same two parts, the layers
        in groups (shard/model_runner.py), so an urgent request can run between two groups."""
        x, cos, sin = self.embed_positions(ids, positions)
        return self.run_layers(x, cos, sin, batch, kv_caches, 0, len(self.layers))

    def embed_positions(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tokens' embeddings [T, hidden] and their rotary cos and sin [T, 1, head_dim]."""
        x = self.embed(ids)
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return x, emb.cos().to(x.dtype).unsqueeze(1), emb.sin().to(x.dtype).unsqueeze(1)

    def run_layers(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: AttentionBatch,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        start: int,
        end: int,
    ) -> torch.Tensor:
        """Layers [start, end) on the hidden states `x`; each writes its K/V of the step's tokens."""
        for i in range(start, end):
            x = self.layers[i](x, cos, sin, batch, *kv_caches[i])
        return x

    def decode_logits(self, ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                      kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """A step's float32 logits for every row, from the ids: the compiled step of one row
        (shard/model_runner.py) is this whole function, one graph."""
        return self.logits_of(self.hidden_states(ids, positions, batch, kv_caches))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [n, vocab] for the rows that sample (one per sequence, not per token)."""
        return self.logits_of(hidden)

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """`logits` without its inference_mode decorator (see `hidden_states`)."""
        h = rms_norm(hidden, self.norm, self.cfg.rms_norm_eps)
        if self.lm_head is None:
            local = linear(h, self.embed_tokens, self.embed_tokens_scale).float()
        else:
            local = linear(h, self.lm_head, self.lm_head_scale).float()
        return self.tp.all_gather_last(local)[:, : self.cfg.vocab_size]
