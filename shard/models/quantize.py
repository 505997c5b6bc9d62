"""Weights stored narrower than the compute dtype.

A decode step reads every weight once per step, so at small batches its time is the bytes read.
Two narrow forms, both for the matrices only (projections and vocabulary); norms, biases, activations
and the KV cache stay in the compute dtype:
  * bfloat16 under float32 compute: the default on CPUs where our kernels run (shard/hardware.py), half
    float32's bytes, multiplied by our kernel (shard/models/cpu_kernels.py).
    Where the CPU has AVX512-BF16 they are packed for its vdpbf16ps instruction (`pack_matrices`).
  * int8 (`--quantize int8`, TGI's `eetq` name accepted): one scale per output row, symmetric
    (absmax / 127), a quarter of float32's bytes. Float32 rows go through our kernel, bfloat16 ones
    (and CPUs without it) through ATen's `_weight_int8pack_mm`. Where the CPU has AVX512-BF16 they are
    packed as bfloat16 ones are (`pack_matrices`): the kernel widens them to bfloat16 (exactly) a strip at a time and
    multiplies them with vdpbf16ps.
"""
from __future__ import annotations

import torch
from torch import nn

from shard.models import cpu_kernels
from shard.models.llama import LlamaModel

# TGI's --quantize names that mean "int8 weights, compute in the model's dtype" here.
QUANTIZE = {"int8": "int8", "eetq": "int8"}

_LAYER_WEIGHTS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights, float32 scales): w ≈ q * scale[:, None]."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _matrices(model: LlamaModel) -> list[tuple[nn.Module, str]]:
    owners = [(layer, name) for layer in model.layers for name in _LAYER_WEIGHTS]
    owners.append((model, "embed_tokens"))
    if model.lm_head is not None:
        owners.append((model, "lm_head"))
    return owners


def quantize_int8(model: LlamaModel) -> LlamaModel:
    """In place; returns the model. The scales are kept in the compute dtype."""
    if model.dtype == torch.float16:
        raise ValueError("--quantize int8 computes in bfloat16 or float32, not float16")
    for module, name in _matrices(model):
        q, scale = quantize_rows(getattr(module, name))
        setattr(module, name, nn.Parameter(q, requires_grad=False))
        setattr(module, name + "_scale", nn.Parameter(scale.to(model.dtype), requires_grad=False))
    return model


def pack_matrices(model: LlamaModel) -> LlamaModel:
    """In place: the bfloat16 or int8 matrices our CPU kernel multiplies, packed for AVX512-BF16 where the
    CPU has it (cpu_kernels.pack; a tied vocabulary is looked up in its packed form). Elsewhere a no-op."""
    for module, name in _matrices(model):
        if name == "embed_tokens" and model.lm_head is not None:
            continue  # looked up only, never multiplied
        packed = cpu_kernels.pack(getattr(module, name))
        if packed is not None:
            setattr(module, name, nn.Parameter(packed, requires_grad=False))
    return model
