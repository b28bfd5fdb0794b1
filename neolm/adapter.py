"""LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors): read one and merge it into a
model's weights as they load (`neolm.load(..., adapter=)`), and write the updates a neolm LoRA run learnt
(neolm.train.lora) as one, which PEFT loads onto the transformers model.

A LoRA update of a linear layer is W += scale B A (scale = lora_alpha / r, or / sqrt(r) with use_rslora). The
adapter's tensors are named after the transformers model's modules ("base_model.model.gpt_neox.layers.0.attention.
query_key_value.lora_A.weight"); checkpoint.NAME_MAPS turns them into neolm's, GPT-Neo's separate q/k/v into parts
of the fused projection. What PEFT adapters can hold beyond plain LoRA on linear layers (DoRA, per-module ranks,
trained biases, whole modules to save, embeddings) is refused with an error that says so.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from neolm import checkpoint
from neolm.config import Config
from neolm.errors import NeolmError
from neolm.model import GPT

log = logging.getLogger(__name__)

PREFIX = "base_model.model."  # PEFT's names: the wrapped model's module names after it
CONFIG_FILE, WEIGHTS_FILES = "adapter_config.json", ("adapter_model.safetensors", "adapter_model.bin")


def _settings(folder: Path) -> tuple[dict, float]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise NeolmError(f"{folder} is not a LoRA adapter: it has no {CONFIG_FILE}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NeolmError(f"{path} is not JSON: {e}") from None
    if cfg.get("peft_type") != "LORA":
        raise NeolmError(f"{folder} holds a {cfg.get('peft_type')} adapter; neolm merges LoRA adapters")
    refused = {"use_dora": "DoRA", "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
               "modules_to_save": "whole modules to save", "fan_in_fan_out": "fan_in_fan_out layers"}  # fmt: skip
    for key, what in refused.items():
        if cfg.get(key):
            raise NeolmError(f"the adapter {folder} uses {what} ({key}); neolm merges plain LoRA adapters")
    if cfg.get("bias", "none") != "none":
        raise NeolmError(f"the adapter {folder} trains biases (bias={cfg['bias']!r}); neolm merges LoRA weights only")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise NeolmError(f"{path} must give r (an integer >= 1) and lora_alpha, got {r!r} and {alpha!r}")
    return cfg, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHTS_FILES:
        path = folder / name
        if path.is_file():
            reader = checkpoint.open_weights(path)
            return {key: reader.get(key) for key in list(reader.keys())}
    raise NeolmError(f"the adapter {folder} has no weights ({' or '.join(WEIGHTS_FILES)})")


def lora_factors(folder: str | Path, config: Config) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The updates of a PEFT LoRA adapter as {neolm weight name: (A (r', in), B (out, r'))} in fp32, the scale in B,
    so that the weight's update is B @ A. GPT-Neo's q, k and v updates of one layer become one of the fused
    projection: their A's stacked (r' = 3r) and B block-diagonal, each part's rows in the fused per-head order."""
    folder = Path(folder)
    cfg, scale = _settings(folder)
    tensors = _weights(folder)
    H, D, C = config.n_head, config.head_dim, config.d_model
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(config).state_dict().items()}
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in tensors if ".lora_" in key})
    other = sorted(key for key in tensors if ".lora_A." not in key and ".lora_B." not in key)
    if other:
        raise NeolmError(f"the adapter {folder} holds tensors neolm cannot merge: {', '.join(other[:4])}")
    parts: dict[str, list[tuple[str | None, torch.Tensor, torch.Tensor]]] = {}  # name -> [(qkv part, A, B)]
    for module in modules:
        try:
            a, b = tensors[f"{module}.lora_A.weight"].float(), tensors[f"{module}.lora_B.weight"].float() * scale
        except KeyError:
            raise NeolmError(f"the adapter {folder} lacks {module}'s lora_A or lora_B weight") from None
        hf = module.removeprefix(PREFIX) + ".weight"
        mapped = checkpoint.neolm_name(config.family, hf)
        if mapped is None or not mapped[0].startswith("blocks."):
            raise NeolmError(
                f"the adapter {folder} adapts {hf}, which is not a linear layer of a {config.family} block"
            )
        name, part = mapped
        if name not in shapes:
            raise NeolmError(f"the adapter {folder} adapts {hf}: this model has {config.n_layer} layers")
        want = tuple(shapes[name]) if part is None else (C, C)
        if (b.shape[0], a.shape[1]) != want or a.shape[0] != b.shape[1]:
            raise NeolmError(f"the adapter's update of {hf} is {(b.shape[0], a.shape[1])}, the model's weight "
                             f"{want}: it was made for another model")  # fmt: skip
        parts.setdefault(name, []).append((part, a, b))
    if not parts:
        raise NeolmError(f"the adapter {folder} holds no LoRA weights")
    factors = {}
    for name, pieces in parts.items():
        if pieces[0][0] is None:
            factors[name] = pieces[0][1:]
            continue
        a = torch.cat([a for _, a, _ in pieces])  # (3r, C) for q, k and v
        b = torch.zeros(3 * C, a.shape[0])  # per-head [H, 3, D] rows, as the model's qkv
        col = 0
        for part, a_part, b_part in pieces:
            r = a_part.shape[0]
            b.view(H, 3, D, -1)[:, checkpoint.QKV_PARTS.index(part), :, col : col + r] = b_part.view(H, D, r)
            col += r
        factors[name] = (a, b)
    log.info("LoRA adapter %s: r %d, alpha %s, %d layers (base: %s)", folder, cfg["r"], cfg["lora_alpha"],
             len(factors), cfg.get("base_model_name_or_path"))  # fmt: skip
    return factors


def lora_deltas(folder: str | Path, config: Config) -> dict[str, torch.Tensor]:
    """The updates of a PEFT LoRA adapter as {neolm tensor name: fp32 delta of its shape}."""
    return {name: b @ a for name, (a, b) in lora_factors(folder, config).items()}


def write_lora_adapter(state: dict[str, torch.Tensor], config: Config, folder: str | Path, r: int, alpha: float,
                       dropout: float, base: str | None) -> Path:  # fmt: skip
    """PEFT's adapter files for the LoRA updates in a neolm state dict (keys X.lora_a (r, in), X.lora_b (out, r)):
    GPT-Neo's fused qkv update becomes q, k and v updates with its A each and their rows of its B."""
    H, D, C = config.n_head, config.head_dim, config.d_model
    tensors, targets = {}, set()
    for key, a in state.items():
        if not key.endswith(".lora_a"):
            continue
        layer = key.removesuffix(".lora_a")  # blocks.{i}.attn.qkv
        a, b = a.detach().float().cpu(), state[f"{layer}.lora_b"].detach().float().cpu()
        try:
            parts = [(checkpoint.hf_name(config.family, layer + ".weight"), b)]
        except KeyError:  # stored as separate q, k, v
            rows = b.view(H, 3, D, -1)
            parts = [(checkpoint.hf_name(config.family, layer + ".weight", p), rows[:, i].reshape(C, -1))
                     for i, p in enumerate(checkpoint.QKV_PARTS)]  # fmt: skip
        for hf, b_part in parts:
            module = PREFIX + hf.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = a.clone()  # (q, k and v each their own copy of the fused A)
            tensors[f"{module}.lora_B.weight"] = b_part.contiguous()
            targets.add(module.rsplit(".", 1)[1])
    if not tensors:
        raise NeolmError("the state dict holds no LoRA updates")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(tensors, out / WEIGHTS_FILES[0], metadata={"format": "pt"})
    settings = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                "modules_to_save": None, "inference_mode": True, "base_model_name_or_path": base}  # fmt: skip
    (out / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return out
