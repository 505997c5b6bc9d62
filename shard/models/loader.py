"""Build the model on the meta device, then fill in this rank's slice of each weight.

Two sources: a GGUF file (dequantized with the `gguf` package) or a Hugging Face folder
(config.json + *.safetensors, read slice by slice so a rank never holds the whole tensor).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device

from shard.models.llama import LlamaConfig, LlamaModel
from shard.models.quantize import QUANTIZE, quantize_int8
from shard.parallel import TPGroup, check_divisible
from sluice.modelfiles import ModelSource

# A getter returns (part of) one named weight: get(name) -> full tensor, or None if absent.
Getter = Callable[[str], "torch.Tensor | None"]


def load_model(source: ModelSource, dtype: torch.dtype, tp: TPGroup | None = None, device: str = "cpu",
               quantize: str | None = None) -> LlamaModel:
    """`quantize`: None, or a name in shard.models.quantize.QUANTIZE."""
    tp = tp or TPGroup()
    cfg, get = _open_gguf(source.path) if source.is_gguf else _open_hf(source.path)
    check_divisible(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, tp.size)
    with init_empty_weights(include_buffers=False):
        model = LlamaModel(cfg, tp)
    for name, tensor in _rank_weights(cfg, tp, get):
        set_module_tensor_to_device(model, name, device, value=tensor, dtype=dtype)
    model.inv_freq = model.inv_freq.to(device)
    model = model.eval().requires_grad_(False)
    if quantize:
        if QUANTIZE.get(quantize) != "int8":
            raise ValueError(f"--quantize {quantize!r} is not supported: int8 (or its TGI name eetq) is")
        quantize_int8(model)
    return model


def model_config(source: ModelSource) -> LlamaConfig:
    """The architecture alone (no weights read): to check a split before starting any rank."""
    return (_open_gguf(source.path) if source.is_gguf else _open_hf(source.path))[0]


def _rank_weights(cfg: LlamaConfig, tp: TPGroup, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    d = cfg.head_dim
    heads = cfg.num_heads // tp.size
    kv0, kv1 = tp.kv_head_range(cfg.num_kv_heads)
    inter = cfg.intermediate_size // tp.size

    def rows(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return t[start:stop]

    def vocab_slice(t: torch.Tensor) -> torch.Tensor:
        per = math.ceil(cfg.vocab_size / tp.size)
        part = t[tp.rank * per : (tp.rank + 1) * per]
        if part.shape[0] < per:  # the last rank's slice is padded; padded logits are cut off
            part = torch.cat([part, part.new_zeros(per - part.shape[0], part.shape[1])])
        return part

    embed = get("embed_tokens.weight")
    yield "embed_tokens", vocab_slice(embed)
    yield "norm", get("norm.weight")
    if not cfg.tie_word_embeddings:
        head = get("lm_head.weight")
        yield "lm_head", vocab_slice(embed if head is None else head)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        q = rows(get(p + "self_attn.q_proj.weight"), tp.rank * heads * d, (tp.rank + 1) * heads * d)
        k = rows(get(p + "self_attn.k_proj.weight"), kv0 * d, kv1 * d)
        v = rows(get(p + "self_attn.v_proj.weight"), kv0 * d, kv1 * d)
        yield p + "qkv_proj", torch.cat([q, k, v])
        if cfg.attention_bias:
            bq = rows(get(p + "self_attn.q_proj.bias"), tp.rank * heads * d, (tp.rank + 1) * heads * d)
            bk = rows(get(p + "self_attn.k_proj.bias"), kv0 * d, kv1 * d)
            bv = rows(get(p + "self_attn.v_proj.bias"), kv0 * d, kv1 * d)
            yield p + "qkv_bias", torch.cat([bq, bk, bv])
        o = get(p + "self_attn.o_proj.weight")
        yield p + "o_proj", o[:, tp.rank * heads * d : (tp.rank + 1) * heads * d]
        gate = rows(get(p + "mlp.gate_proj.weight"), tp.rank * inter, (tp.rank + 1) * inter)
        up = rows(get(p + "mlp.up_proj.weight"), tp.rank * inter, (tp.rank + 1) * inter)
        yield p + "gate_up_proj", torch.cat([gate, up])
        yield p + "down_proj", get(p + "mlp.down_proj.weight")[:, tp.rank * inter : (tp.rank + 1) * inter]
        yield p + "input_layernorm", get(p + "input_layernorm.weight")
        yield p + "post_attention_layernorm", get(p + "post_attention_layernorm.weight")


def _open_hf(folder: Path) -> tuple[LlamaConfig, Getter]:
    from safetensors import safe_open

    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type", "llama") not in ("llama", "mistral", "qwen2", "smollm"):
        raise ValueError(f"model_type {raw.get('model_type')!r} is not supported (Llama family only)")
    cfg = LlamaConfig.from_hf(raw)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    where: dict[str, object] = {}
    for f in files:
        handle = safe_open(str(f), framework="pt")
        for key in handle.keys():
            where[key] = handle

    def get(name: str) -> torch.Tensor | None:
        for key in ("model." + name, name):
            if key in where:
                return where[key].get_tensor(key)
        return None

    return cfg, get


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp's converter interleaves each head's rows for its RoPE layout; undo it so the
    # half-split rotation of the Hugging Face layout applies.
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _open_gguf(path: Path) -> tuple[LlamaConfig, Getter]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    meta["eos"] = reader.fields["tokenizer.ggml.eos_token_id"].contents() if "tokenizer.ggml.eos_token_id" in reader.fields else None
    arch = meta["general.architecture"]
    if arch not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported (Llama family only)")
    heads = meta[f"{arch}.attention.head_count"]
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    hidden = meta[f"{arch}.embedding_length"]
    tensors = {t.name: t for t in reader.tensors}
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": meta[f"{arch}.rope.scaling.factor"]}
    cfg = LlamaConfig(
        vocab_size=meta.get(f"{arch}.vocab_size") or tensors["token_embd.weight"].shape[1],
        hidden_size=hidden,
        intermediate_size=meta[f"{arch}.feed_forward_length"],
        num_layers=meta[f"{arch}.block_count"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=meta.get(f"{arch}.attention.key_length", hidden // heads),
        rms_norm_eps=meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get(f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=scaling,
        max_position_embeddings=meta.get(f"{arch}.context_length", 2048),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        eos_token_ids=[] if meta["eos"] is None else [int(meta["eos"])],
        bos_token_id=reader.fields["tokenizer.ggml.bos_token_id"].contents() if "tokenizer.ggml.bos_token_id" in reader.fields else None,
    )

    def gguf_name(name: str) -> str:
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            stem, kind = rest.rsplit(".", 1)
            short = {v: k for k, v in _GGUF_NAMES.items()}[stem]
            return f"blk.{i}.{short}.{kind}"
        return {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}[name]

    def get(name: str) -> torch.Tensor | None:
        t = tensors.get(gguf_name(name))
        if t is None:
            return None
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # writable copy
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute_rope(w, heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute_rope(w, kv_heads)
        return w

    return cfg, get
