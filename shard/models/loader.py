"""Build the model on the meta device, then fill in this rank's slice of each weight.

Two sources: a GGUF file (dequantized with the `gguf` package, once: the result is cached) or a Hugging Face folder
(config.json + *.safetensors, read slice by slice so a rank never holds the whole tensor).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device

from shard.models.llama import LlamaConfig, LlamaModel
from shard.models.quantize import QUANTIZE, pack_matrices, quantize_int8
from shard.parallel import TPGroup, check_divisible
from sluice.modelfiles import ModelSource, cache_path

log = logging.getLogger("sluice.shard")

# A getter returns (part of) one named weight: get(name) -> full tensor, or None if absent.
Getter = Callable[[str], "torch.Tensor | None"]


def load_model(source: ModelSource, dtype: torch.dtype, tp: TPGroup | None = None, device: str = "cpu",
               quantize: str | None = None, matrices: torch.dtype | None = None,
               kv_cache: torch.dtype | None = None) -> LlamaModel:
    """`dtype`: the compute dtype. `quantize`: None, or a name in shard.models.quantize.QUANTIZE.
    `matrices`: the dtype the projections and vocabulary are stored in, if not `dtype` (the norms keep
    `dtype`): bfloat16 under float32 compute is the default on CPUs where our kernels run (packed for
    AVX512-BF16 where the CPU has it, quantize.pack_matrices; int8 ones too). `kv_cache`:
    the KV cache's dtype, if not `dtype` (float16 under float32 compute where our CPU attention runs)."""
    tp = tp or TPGroup()
    cfg, get = _open_gguf(source.path) if source.is_gguf else _open_hf(source.path)
    check_divisible(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, tp.size)
    with init_empty_weights(include_buffers=False):
        model = LlamaModel(cfg, tp)
    for name, tensor in _rank_weights(cfg, tp, get):
        narrow = matrices is not None and tensor.dim() == 2 and not quantize
        set_module_tensor_to_device(model, name, device, value=tensor, dtype=matrices if narrow else dtype)
    model.inv_freq = model.inv_freq.to(device)
    model = model.eval().requires_grad_(False)
    model.kv_cache_dtype = kv_cache if kv_cache != dtype else None
    if quantize:
        if QUANTIZE.get(quantize) != "int8":
            raise ValueError(f"--quantize {quantize!r} is not supported: int8 (or its TGI name eetq) is")
        quantize_int8(model)
    if dtype == torch.float32 and (quantize or matrices == torch.bfloat16):
        pack_matrices(model)  # AVX512-BF16 CPUs only; narrow matrices under float32 compute: our kernel's
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


# Bump when what _convert_gguf writes changes (config fields, names, layouts): older cached files go unused.
_GGUF_CACHE_VERSION = 1


def _open_gguf(path: Path) -> tuple[LlamaConfig, Getter]:
    """A GGUF's config and float32 weights. Parsing its metadata and dequantizing every tensor take ~13 s
    on 2 cores, at every start of every rank; so they are converted once into a safetensors file in the
    cache (sluice.modelfiles.cache_path), which later starts read in about a second."""
    key = cache_path("models", path)
    cached = key.with_name(f"{key.name}.v{_GGUF_CACHE_VERSION}.safetensors")
    if cached.is_file():
        return _open_converted(cached)
    # Written under a name of our own, then renamed: a reader sees the whole file or none. Not the pid
    # alone: replicas in containers sharing the cache on a volume (deploy/Dockerfile sets SLUICE_CACHE)
    # have the same pids.
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # One converts, the others wait for its file: ranks, servers or replicas starting at once on
        # one cache would each spend the conversion's CPU, side by side on the same cores. The lock is
        # the cache folder's (no lock file left behind); the kernel releases it if its holder dies.
        folder = os.open(cached.parent, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            if not cached.is_file():
                _convert_gguf(path, tmp)
                os.replace(tmp, cached)
        finally:
            os.close(folder)
        return _open_converted(cached)
    except OSError as exc:  # a read-only or full cache: serve anyway, from a file dropped once open
        log.warning("could not cache the converted GGUF at %s (%s): converting it again next start", cached, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
    with tempfile.TemporaryDirectory() as folder:
        _convert_gguf(path, Path(folder) / "model.safetensors")
        return _open_converted(Path(folder) / "model.safetensors")  # mapped in memory: deleting it is fine


def _open_converted(file: Path) -> tuple[LlamaConfig, Getter]:
    from safetensors import safe_open

    handle = safe_open(str(file), framework="pt")
    names = set(handle.keys())
    cfg = LlamaConfig(**json.loads(handle.metadata()["config"]))
    return cfg, lambda name: handle.get_tensor(name) if name in names else None


def _convert_gguf(path: Path, out: Path) -> None:
    """Every weight of the GGUF, dequantized to float32 and named as in Hugging Face checkpoints, written
    as a safetensors file (an 8-byte header length, a JSON header, the tensors' bytes) one tensor at a
    time, so that converting a large model never holds more than one of its tensors in memory."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    cfg, arch = _gguf_config(reader)
    weights = [(_hf_name(t.name), t) for t in reader.tensors]
    weights = [(name, t) for name, t in weights if name]  # not rope_freqs and the like
    header, offset = {"__metadata__": {"config": json.dumps(dataclasses.asdict(cfg))}}, 0
    for name, t in weights:
        shape = [int(n) for n in reversed(t.shape)]  # GGUF lists dims innermost first
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * math.prod(shape)]}
        offset += 4 * math.prod(shape)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header with spaces to align the tensors
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, t in weights:
            w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # writable copy
            w = w.reshape(header[name]["shape"])
            if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
                w = _unpermute_rope(w, cfg.num_heads)
            elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
                w = _unpermute_rope(w, cfg.num_kv_heads)
            f.write(w.contiguous().numpy().tobytes())


def _gguf_config(reader) -> tuple[LlamaConfig, str]:
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
        vocab_size=int(meta.get(f"{arch}.vocab_size") or tensors["token_embd.weight"].shape[1]),
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
    return cfg, arch


def _hf_name(gguf_name: str) -> str | None:
    """blk.3.attn_q.weight -> layers.3.self_attn.q_proj.weight; None for a tensor our model does not have."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_NAMES:
        return f"layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
            "output.weight": "lm_head.weight"}.get(gguf_name)
