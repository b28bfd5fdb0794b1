"""`neolm.load`'s way into quantization: quantized folders, and quantizing while loading."""

from __future__ import annotations

from pathlib import Path

import torch

from neolm import checkpoint
from neolm.config import Config
from neolm.errors import NeolmError
from neolm.memory import release_freed
from neolm.model import GPT
from neolm.quant import io, linear


def load_model(folder: Path, raw: dict, config: Config, dtype: torch.dtype, device: torch.device,
               quantize: str | None = None, group_size: int = 64, quantize_head: bool = False,
               native: bool = True, activations: bool = False, adjust=None) -> GPT:  # fmt: skip
    """The model of `folder`: a bitsandbytes 4-bit or neolm-quantized folder as stored, or a float one
    quantized to `quantize` ("int8" | "int4") as its weights are read (the output head too with
    quantize_head; a tied head then gets its own quantized copy, the embedding stays as it is). native:
    whether neolm's native kernels may take the quantized layers; activations: they will quantize their inputs too
    (io.prepare packs their codes for that); adjust: checkpoint.load_state_dict's, for a float folder (a LoRA
    adapter is merged before the weights are quantized)."""
    quant = raw.get("quantization_config") or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method in ("bitsandbytes", "neolm") and adjust is not None:
        raise NeolmError(f"{folder} is quantized already: an adapter merges into float weights (load its float source)")
    if method == "bitsandbytes":
        if quantize is not None:
            raise NeolmError(f"{folder} is a bitsandbytes 4-bit checkpoint already; load it without quantize=")
        from neolm.quant import bnb

        return bnb.load_bnb(folder, raw, config, dtype, device)
    if method == "neolm":
        model = io.load_quantized(folder, raw, config, dtype, device, native, activations)
        bits = model.quant_config["bits"]
        if quantize is not None and linear.parse_quantize(quantize) != bits:
            raise NeolmError(f"{folder} is quantized to int{bits} already; load it without quantize= "
                             "(or re-quantize its float source)")  # fmt: skip
        return model
    return _quantizing_load(folder, config, dtype, device, linear.parse_quantize(quantize), group_size,
                            skip=() if quantize_head else linear.DEFAULT_SKIP, native=native, activations=activations,
                            adjust=adjust)  # fmt: skip


def _quantizing_load(folder: Path, config: Config, dtype: torch.dtype, device, bits: int, group_size: int, skip,
                     native: bool = True, activations: bool = False, adjust=None) -> GPT:  # fmt: skip
    """A float checkpoint quantized layer by layer as its weights are read: each float matrix lives only until
    its codes are made, so the peak memory is about the quantized model's, not the float one's. The same
    layers as `linear.quantize_model` on the loaded float model."""
    with torch.device("meta"):
        model = GPT(config)
    names = set(linear.checked_targets(model, bits, group_size, skip))
    tied_head = config.tie_embeddings and "lm_head" in names  # quantized from the embedding, which stays float

    def quantized(layer: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {f"{layer}.{key}": t for key, t in linear.quantized_weight(w, bits, group_size).items()}
        release_freed()
        return out

    def finish(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        layer, _, kind = name.rpartition(".")
        if kind == "weight" and layer in names:
            return quantized(layer, tensor)
        if tied_head and name == "wte.weight":
            return {name: tensor} | quantized("lm_head", tensor)
        return {name: tensor}

    state = checkpoint.load_state_dict(folder, config, dtype, finish, adjust=adjust)
    linear.swap_empty(model, bits, group_size, skip, dtype, native)
    model.load_state_dict(state, strict=False, assign=True)
    del state  # the layers' `prepare` replaces the codes by kernel copies: let the originals go one by one
    if config.tie_embeddings and not tied_head:
        model.lm_head.weight = model.wte.weight
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    io.prepare(model, lambda _: release_freed(), activations)
    model.quant_config = linear.quant_config(bits, group_size, skip, model)
    return model


def describe(quant: dict) -> str:
    """One line for `neolm info`: how the model's weights are quantized."""
    if quant.get("quant_method") == "bitsandbytes":
        double = ", double quantization" if quant.get("bnb_4bit_use_double_quant") else ""
        return f"bitsandbytes 4-bit {quant.get('bnb_4bit_quant_type', 'fp4')}{double} (dequantized per call)"
    head = "" if quant.get("modules_not_to_convert") else ", output head included"
    if quant.get("bits") == 4:
        return f"int4, group size {quant.get('group_size')}, weights only{head}"
    return f"int8 per channel, weights only{head}"
