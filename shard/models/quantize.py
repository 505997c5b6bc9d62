"""Weight-only int8 (`--quantize int8`, TGI's `eetq` name accepted): every projection and the
vocabulary matrix become int8 with one float scale per output row, symmetric (absmax / 127).

A decode step reads every weight once per step, so at small batches its time is the bytes read: int8
halves them against bf16 and quarters them against float32. Activations, norms and the KV cache stay in
the compute dtype (float32 on CPUs without native bf16, shard/hardware.py); the matmul is ATen's
`_weight_int8pack_mm` (dequantizes inside the kernel), fed bfloat16 rows. Per-row scales are what that
kernel takes.
"""
from __future__ import annotations

import torch
from torch import nn

from shard.models.llama import LlamaModel

# TGI's --quantize names that mean "int8 weights, compute in the model's dtype" here.
QUANTIZE = {"int8": "int8", "eetq": "int8"}

_LAYER_WEIGHTS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights, bfloat16 scales): w ≈ q * scale[:, None]. The scales are in the kernel's
    activation dtype: ATen's int8 kernel is fast with bfloat16 activations only (float32 ones took
    4-15x longer, AVX2 host), so a float32 model hands it bfloat16 rows (llama.linear)."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(torch.bfloat16)


def _swap(module: nn.Module, name: str) -> None:
    q, scale = quantize_rows(getattr(module, name))
    setattr(module, name, nn.Parameter(q, requires_grad=False))
    setattr(module, name + "_scale", nn.Parameter(scale, requires_grad=False))


def quantize_int8(model: LlamaModel) -> LlamaModel:
    """In place; returns the model."""
    if model.dtype == torch.float16:
        raise ValueError("--quantize int8 computes in bfloat16 or float32, not float16")
    for layer in model.layers:
        for name in _LAYER_WEIGHTS:
            _swap(layer, name)
    _swap(model, "embed_tokens")
    if model.lm_head is not None:
        _swap(model, "lm_head")
    return model
