"""LoRA fine-tuning (Hu et al. 2021): the model's weights stay frozen and each chosen linear layer learns a low-rank
update, y = W x + (alpha / r) B A x, with A (r, in) and B (out, r); B starts at zero, so training starts from the
model as it is. A module swap applied after the model is built, as quantization is; the export merges the updates
into plain weights (W + (alpha / r) B A), so the result loads anywhere a checkpoint of the model does.

Targets name a block's layers: qkv (the fused attention input projection), proj (the attention output), fc and out
(the MLP's two). Trainable: the A and B of every target (a few MB) while the weights, biases, LayerNorms and
embeddings stay as they were; the optimizer keeps state for those alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from neolm.errors import NeolmError
from neolm.model import GPT
from neolm.quant.linear import QuantLinear

TARGETS = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"), "fc": ("mlp", "fc"), "out": ("mlp", "proj")}
DEFAULT_TARGETS = "qkv,proj,fc,out"


class LoRALinear(nn.Module):
    """A frozen linear layer `base` (float, or int8/int4: QLoRA) plus (alpha / r) B A, A (r, in) and B (out, r)
    trainable (in the model's float dtype)."""

    def __init__(self, base: nn.Linear | QuantLinear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.scale = r, alpha / r
        weight = base.weight  # (a quantized layer's: dequantized, once)
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # (as nn.Linear's weights, and PEFT's A)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()  # (..., r) then (..., out)
        return self.base(x) + update * self.scale


def parse_targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if not names or bad:
        raise NeolmError(f"LoRA targets must be some of {', '.join(TARGETS)} (comma-separated), got {text!r}")
    return names


def add_lora(model: GPT, r: int, alpha: float, dropout: float = 0.0, targets: str = DEFAULT_TARGETS) -> int:
    """Freeze `model` and give every block's `targets` a LoRA update of rank r; returns the trainable parameters."""
    if r < 1:
        raise NeolmError(f"the LoRA rank must be >= 1, got {r}")
    if alpha <= 0 or not 0 <= dropout < 1:
        raise NeolmError(f"LoRA alpha must be > 0 and dropout in [0, 1), got {alpha} and {dropout}")
    names = parse_targets(targets)
    model.requires_grad_(False)
    for block in model.blocks:
        for name in names:
            parent, attr = TARGETS[name]
            holder = getattr(block, parent)
            layer = getattr(holder, attr)
            if not isinstance(layer, (nn.Linear, QuantLinear)):
                raise NeolmError(f"LoRA needs linear layers; {parent}.{attr} is a {type(layer).__name__}")
            setattr(holder, attr, LoRALinear(layer, r, alpha, dropout))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict of a model with LoRA layers (keys X.base.weight, X.base.bias, X.lora_a, X.lora_b) as the plain
    model's (X.weight = base + scale B A, X.bias), e.g. from a sharded run's full state dict."""
    out = {}
    for key, value in state.items():
        if key.endswith((".lora_a", ".lora_b")):
            continue
        if ".base." in key:
            prefix, _, name = key.rpartition(".base.")
            if name == "weight":
                a, b = state[f"{prefix}.lora_a"], state[f"{prefix}.lora_b"]
                value = (value.float() + (b.float() @ a.float()) * scale).to(value.dtype)
            key = f"{prefix}.{name}"
        out[key] = value
    return out
