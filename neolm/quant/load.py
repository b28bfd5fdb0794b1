"""`neolm.load`'s way into quantization: quantized folders, and quantizing while loading."""

from __future__ import annotations

from pathlib import Path

import torch

from neolm import checkpoint
from neolm.config import Config
from neolm.errors import NeolmError
from neolm.model import GPT
from neolm.quant import io, linear


def load_model(folder: Path, raw: dict, config: Config, dtype: torch.dtype, device: torch.device,
               quantize: str | None = None, group_size: int = 64, quantize_head: bool = False) -> GPT:  # fmt: skip
    """The model of `folder`: a bitsandbytes 4-bit or neolm-quantized folder as stored, or a float one
    quantized to `quantize` ("int8" | "int4") once its weights are in place (the output head too with
    quantize_head; a tied head then gets its own quantized copy, the embedding stays as it is)."""
    quant = raw.get("quantization_config") or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == "bitsandbytes":
        if quantize is not None:
            raise NeolmError(f"{folder} is a bitsandbytes 4-bit checkpoint already; load it without quantize=")
        from neolm.quant import bnb

        return bnb.load_bnb(folder, raw, config, dtype, device)
    if method == "neolm":
        model = io.load_quantized(folder, raw, config, dtype, device)
        bits = model.quant_config["bits"]
        if quantize is not None and linear.parse_quantize(quantize) != bits:
            raise NeolmError(f"{folder} is quantized to int{bits} already; load it without quantize= "
                             "(or re-quantize its float source)")  # fmt: skip
        return model
    bits = linear.parse_quantize(quantize)
    model = checkpoint.build_model(config, checkpoint.load_state_dict(folder, config, dtype), device)
    # no other reference to the float weights: each layer's are freed as soon as it is swapped
    return linear.quantize_model(model, bits, group_size, skip=() if quantize_head else linear.DEFAULT_SKIP)


def describe(quant: dict) -> str:
    """One line for `neolm info`: how the model's weights are quantized."""
    if quant.get("quant_method") == "bitsandbytes":
        double = ", double quantization" if quant.get("bnb_4bit_use_double_quant") else ""
        return f"bitsandbytes 4-bit {quant.get('bnb_4bit_quant_type', 'fp4')}{double} (dequantized per call)"
    head = "" if quant.get("modules_not_to_convert") else ", output head included"
    if quant.get("bits") == 4:
        return f"int4, group size {quant.get('group_size')}, weights only{head}"
    return f"int8 per channel, weights only{head}"
