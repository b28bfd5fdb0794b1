"""neolm-quantized checkpoint folders: writing and (memory-mapped) reading.

A folder is config.json + model.safetensors (+ the tokenizer). config.json holds the model's usual
Hugging Face keys plus

    "quantization_config": {"quant_method": "neolm", "format_version": 1, "bits": 8 | 4,
                            "group_size": null | 32 | 64 | 128 | 256, "scale_dtype": "bfloat16",
                            "modules_not_to_convert": ["lm_head"], ...}

model.safetensors uses neolm's own tensor names (the fused per-head qkv of model.py). A quantized Linear
`NAME` stores
    int8: NAME.qweight int8 (N, K); NAME.scale bf16 (N,)                     w = qweight * scale
    int4: NAME.qweight uint8 (N, K/2), column 2j in the high nibble; NAME.scale, NAME.zero bf16 (N, K/G)
                                                                               w = (q - 8) * scale + zero
    both: NAME.bias in the float dtype, when the layer has one.
Every other tensor (embeddings, LayerNorms, unquantized layers) is stored as in the float model.
The format does not depend on a kernel: layers are packed for the device's kernel when loaded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from neolm import checkpoint
from neolm.config import Config
from neolm.errors import NeolmError
from neolm.memory import release_freed, weight_copy
from neolm.model import GPT
from neolm.quant import linear
from neolm.quant.linear import QuantLinear

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def quantized_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The tensors to save: quantized layers in their saved form, everything else as it is."""
    tied = model.config.tie_embeddings and isinstance(model.lm_head, nn.Linear)
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        if isinstance(module, QuantLinear):
            if not hasattr(module, "export"):
                raise NeolmError(f"layer {prefix} ({type(module).__name__}) cannot be saved in neolm's format")
            out.update({dot + k: v.detach() for k, v in module.export().items()})
            continue
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tied and dot + name == "lm_head.weight":
                continue
            out[dot + name] = t.detach()
    return out


def save_quantized(model: GPT, folder: str | Path, tokenizer=None, float_dtype: torch.dtype | None = None) -> Path:
    """Write a quantized model (from `quantize_model`) as a folder that `neolm.load` reads with no flag.

    float_dtype: of the unquantized tensors (embeddings, LayerNorms, biases); default the model's.
    """
    spec = getattr(model, "quant_config", None)
    if spec is None:
        raise NeolmError("the model is not quantized; quantize it first (neolm.quant.quantize_model)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = quantized_tensors(model)
    float_dtype = float_dtype or model.wte.weight.dtype
    codes = (".qweight", ".scale", ".zero")
    tensors = {
        k: v.to(float_dtype) if v.is_floating_point() and not k.endswith(codes) else v for k, v in tensors.items()
    }
    hf = model.config.to_hf() | {"torch_dtype": str(float_dtype).removeprefix("torch."), "quantization_config": spec}
    checkpoint.save_safetensors(tensors, folder / "model.safetensors", {"format": "pt", "neolm_quant": "1"})
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(hf, indent=2) + "\n")
    os.replace(tmp, folder / "config.json")
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def parse_config(quant: dict, source: str) -> tuple[int, int, tuple[str, ...]]:
    """(bits, group_size, modules_not_to_convert) from a neolm quantization_config, checked."""
    version = quant.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise NeolmError(f"{source}: neolm quantization format {version!r} is not known to this neolm (it reads "
                         f"{FORMAT_VERSION}); upgrade neolm")  # fmt: skip
    bits = quant.get("bits")
    if bits not in (4, 8):
        raise NeolmError(f"{source}: quantization_config bits must be 8 or 4, got {bits!r}")
    group_size = quant.get("group_size") or 0
    if bits == 4:
        if not isinstance(group_size, int):
            raise NeolmError(f"{source}: quantization_config group_size must be a whole number, got {group_size!r}")
        linear.check_group_size(group_size)
    skip = quant.get("modules_not_to_convert") or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise NeolmError(f"{source}: quantization_config modules_not_to_convert must be a list of layer names")
    return bits, group_size, tuple(skip)


def load_quantized(folder: Path, raw: dict, config: Config, dtype: torch.dtype, device=None, native: bool = True,
                   activations: bool = False) -> GPT:  # fmt: skip
    """A model from a neolm-quantized folder: codes memory-mapped (until the kernels repack them), float
    tensors copied into process memory as checkpoint.load_state_dict does; assigned into a meta-device model."""
    source = str(folder / "config.json")
    bits, group_size, skip = parse_config(raw["quantization_config"], source)
    with torch.device("meta"):
        model = GPT(config)
    linear.checked_targets(model, bits, group_size, skip, source)
    linear.swap_empty(model, bits, group_size, skip, dtype, native)
    expected = dict(model.state_dict())
    tied = config.tie_embeddings and isinstance(model.lm_head, nn.Linear)
    if tied:
        expected.pop("lm_head.weight")
    state, unexpected, wrong = {}, [], []
    in_place = []  # (reader, name) of tensors still backed by the file mapping
    for path in checkpoint.weight_files(folder):
        reader = checkpoint.open_weights(path)
        for name in list(reader.keys()):
            if name not in expected:
                unexpected.append(name)
                continue
            tensor, want = reader.get(name), expected[name]
            quantized = want.dtype in (torch.int8, torch.uint8) or name.endswith((".scale", ".zero"))
            ok_dtype = tensor.dtype == want.dtype if quantized else tensor.is_floating_point()
            if tensor.shape != want.shape or not ok_dtype:
                kind = str(want.dtype).removeprefix("torch.") if quantized else "floating point"
                wrong.append(f"{name} is {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}, "
                             f"expected {kind} {tuple(want.shape)}")  # fmt: skip
                continue
            state[name] = tensor if quantized else weight_copy(tensor, dtype)  # as checkpoint.load_state_dict
            codes = name.endswith(".qweight")  # (copied by the layer's `prepare`, which aligns them)
            if quantized and not codes and tensor.data_ptr() % linear.ALIGN:  # the kernels read aligned memory
                state[name] = tensor.clone()
            if state[name].data_ptr() != tensor.data_ptr():
                reader.release(name)
            else:
                in_place.append((reader, name))
    missing = set(expected) - set(state) - {w.split(" ")[0] for w in wrong}
    problems = []
    if wrong:
        problems.append(f"mismatched {len(wrong)} tensor(s): {checkpoint._list(wrong, 3)}")
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {checkpoint._list(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {checkpoint._list(unexpected)}")
    if problems:
        raise NeolmError(
            f"quantized checkpoint {folder} does not fit its config.json (int{bits}): " + "; ".join(problems)
        )
    for name, t in state.items():
        if name.endswith((".scale", ".zero")) and not torch.isfinite(t).all():
            raise NeolmError(f"quantized checkpoint {folder} is corrupt: tensor {name} holds NaN or infinite values")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.wte.weight
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    mapped: dict[str, list] = {}  # layer -> (reader, name, address) of its tensors still backed by the file mapping
    for reader, name in in_place:
        mapped.setdefault(name.rpartition(".")[0], []).append((reader, name, state[name].data_ptr()))
    del state  # the model holds what it uses: what `prepare` replaces is freed layer by layer

    def release(layer: str) -> None:  # e.g. codes copied or repacked for the kernels: drop the mapped originals
        kept = {t.data_ptr() for t in model.get_submodule(layer).buffers()}
        for reader, name, address in mapped.pop(layer, []):
            if address not in kept:
                reader.release(name)
        release_freed()  # and the allocator's pages of the layer's temporaries (its kernel check, a repacking)

    prepare(model, release, activations)  # layer by layer: the mapped and the prepared codes are never all resident at once
    model.quant_config = raw["quantization_config"]
    return model


def prepare(model: nn.Module, after_each=None, activations: bool = False) -> None:
    """Each quantized layer's `prepare`, then after_each(its name). activations: the layers that can will quantize
    their inputs to int8 too (`linear.quantize_activations`, which the caller still runs): they pack their codes
    for it first, instead of into the weight-only layout and then again (2.3 s of a 4.3 s pythia-1.4b W8A8 load)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            if activations and module.takes_int8_activations():
                module.quantize_activations()
            module.prepare(name)
            if after_each is not None:
                after_each(name)
