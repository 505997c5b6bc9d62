"""A GGUF is converted once, into the cache ($SLUICE_CACHE), and later loads read the converted file: the tiny
Llama written as llama.cpp's converter writes a GGUF loads to exactly its checkpoint's weights, whether the
GGUF was just converted, its conversion comes from the cache, or the cache cannot be written."""
from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shard.models.llama import LlamaConfig
from shard.models.loader import _GGUF_NAMES, load_model
from sluice.modelfiles import ModelSource


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter's interleaving of each head's q/k rows (what the loader undoes)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    from gguf import GGUFWriter

    cfg = LlamaConfig.from_hf(json.loads((tiny_llama / "config.json").read_text()))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_bos_token_id(cfg.bos_token_id)
    (eos,) = cfg.eos_token_ids
    writer.add_eos_token_id(eos)
    short = {v: k for k, v in _GGUF_NAMES.items()}
    (weights,) = [load_file(f) for f in tiny_llama.glob("*.safetensors")]
    for name, w in weights.items():
        name = name.removeprefix("model.")
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            stem, kind = rest.rsplit(".", 1)
            if stem.endswith("q_proj"):
                w = permute_rope(w, cfg.num_heads)
            elif stem.endswith("k_proj"):
                w = permute_rope(w, cfg.num_kv_heads)
            name = f"blk.{i}.{short[stem]}.{kind}"
        else:
            name = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[name]
        writer.add_tensor(name, w.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_converted_once_then_read_from_the_cache(tiny_gguf, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SLUICE_CACHE", str(tmp_path / "cache"))
    reference = load_model(ModelSource("tiny", tiny_llama), torch.float32)
    converted = load_model(ModelSource("tiny", tiny_gguf), torch.float32)
    assert same_weights(converted, reference)
    assert converted.cfg.eos_token_ids == reference.cfg.eos_token_ids and converted.cfg.num_kv_heads == 2
    (cached,) = (tmp_path / "cache" / "models").iterdir()  # one whole file, no temporary left over
    assert cached.suffix == ".safetensors"

    # Spoil the GGUF's tensor bytes but keep its size and mtime (the cache key): a load that read the GGUF
    # again would get other weights; one from the cache gets the same.
    stat = tiny_gguf.stat()
    original = tiny_gguf.read_bytes()
    try:
        tiny_gguf.write_bytes(original[: -4096] + bytes(4096))
        os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert same_weights(load_model(ModelSource("tiny", tiny_gguf), torch.float32), reference)
    finally:
        tiny_gguf.write_bytes(original)


def test_a_cache_that_cannot_be_written_is_no_error(tiny_gguf, tiny_llama, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SLUICE_CACHE", str(blocker / "cache"))  # under a file: no folder can be made there
    reference = load_model(ModelSource("tiny", tiny_llama), torch.float32)
    assert same_weights(load_model(ModelSource("tiny", tiny_gguf), torch.float32), reference)
    assert list(tmp_path.iterdir()) == [blocker]


def test_loads_starting_together_convert_once(tiny_gguf, tiny_llama, tmp_path, monkeypatch):
    """A load that finds no converted file while another process converts waits for that one's file instead
    of converting too: here the test holds the cache folder's lock, converts, and only then lets go."""
    from shard.models import loader

    monkeypatch.setenv("SLUICE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "models"
    folder.mkdir(parents=True)
    at_the_lock, real_flock, conversions = threading.Event(), fcntl.flock, []
    monkeypatch.setattr(loader.fcntl, "flock", lambda fd, op: (at_the_lock.set(), real_flock(fd, op)))
    held = os.open(folder, os.O_RDONLY)
    real_flock(held, fcntl.LOCK_EX)
    loaded: list = []
    waiter = threading.Thread(target=lambda: loaded.append(load_model(ModelSource("tiny", tiny_gguf), torch.float32)))
    waiter.start()
    try:
        assert at_the_lock.wait(60)  # it found no file and now waits for the lock
        key = loader.cache_path("models", tiny_gguf)
        loader._convert_gguf(tiny_gguf, key.with_name(f"{key.name}.v{loader._GGUF_CACHE_VERSION}.safetensors"))
        monkeypatch.setattr(loader, "_convert_gguf", lambda *a: conversions.append(a))
    finally:
        os.close(held)  # releases the lock
        waiter.join(60)
    assert loaded and not conversions
    assert same_weights(loaded[0], load_model(ModelSource("tiny", tiny_llama), torch.float32))
