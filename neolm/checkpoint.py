"""Reading and writing Hugging Face checkpoints.

Per-family tensor-name maps are data (`NAME_MAPS`). Weights are memory-mapped, each tensor copied
(converted if asked) into process memory and its pages of the mapping released at once, then assigned
into a model built on the meta device: peak memory stays near the size of the model being built.
The copy is the default even when dtypes match: matrices streamed from the pages of Hugging Face files decoded
3-12% slower (bench/PROFILE.md, sessions 20-21), and the model no longer depends on the file. `mmap=True` keeps them in the file's pages instead: loads take no new memory and
next to no time, and processes mapping the same file share its pages (as llama.cpp does by default).

Pickle files (`pytorch_model.bin`) are read with `torch.load(weights_only=True)`: a checkpoint
never runs code.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

from neolm.config import Config
from neolm.errors import NeolmError
from neolm.memory import weight_copy, weight_empty
from neolm.model import GPT

log = logging.getLogger(__name__)

# ---- tensor-name maps: HF name template -> neolm name template ---------------------------------
# {i} is a layer number, {p} "weight" or "bias". A target ending in "#q", "#k" or "#v" is that part of
# the fused per-head qkv projection (layout [H, 3, D] along the output dim).
NAME_MAPS: dict[str, dict[str, str]] = {
    "gpt_neo": {
        "transformer.wte.weight": "wte.weight",
        "transformer.wpe.weight": "wpe.weight",
        "transformer.h.{i}.ln_1.{p}": "blocks.{i}.ln1.{p}",
        "transformer.h.{i}.attn.attention.q_proj.weight": "blocks.{i}.attn.qkv.weight#q",
        "transformer.h.{i}.attn.attention.k_proj.weight": "blocks.{i}.attn.qkv.weight#k",
        "transformer.h.{i}.attn.attention.v_proj.weight": "blocks.{i}.attn.qkv.weight#v",
        "transformer.h.{i}.attn.attention.out_proj.{p}": "blocks.{i}.attn.proj.{p}",
        "transformer.h.{i}.ln_2.{p}": "blocks.{i}.ln2.{p}",
        "transformer.h.{i}.mlp.c_fc.{p}": "blocks.{i}.mlp.fc.{p}",
        "transformer.h.{i}.mlp.c_proj.{p}": "blocks.{i}.mlp.proj.{p}",
        "transformer.ln_f.{p}": "ln_f.{p}",
        "lm_head.weight": "lm_head.weight",
    },
    "gpt_neox": {
        "gpt_neox.embed_in.weight": "wte.weight",
        "gpt_neox.layers.{i}.input_layernorm.{p}": "blocks.{i}.ln1.{p}",
        "gpt_neox.layers.{i}.attention.query_key_value.{p}": "blocks.{i}.attn.qkv.{p}",
        "gpt_neox.layers.{i}.attention.dense.{p}": "blocks.{i}.attn.proj.{p}",
        "gpt_neox.layers.{i}.post_attention_layernorm.{p}": "blocks.{i}.ln2.{p}",
        "gpt_neox.layers.{i}.mlp.dense_h_to_4h.{p}": "blocks.{i}.mlp.fc.{p}",
        "gpt_neox.layers.{i}.mlp.dense_4h_to_h.{p}": "blocks.{i}.mlp.proj.{p}",
        "gpt_neox.final_layer_norm.{p}": "ln_f.{p}",
        "embed_out.weight": "lm_head.weight",  # published checkpoints
        "lm_head.weight": "lm_head.weight",  # transformers >= 5 saves this name
    },
}
# Buffers that old checkpoints carry and that are recomputed, never loaded.
IGNORED = re.compile(r"(\.attn\.attention\.bias|\.attention\.bias|\.masked_bias|\.rotary_emb\.inv_freq)$")
QKV_PARTS = "qkv"


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern + "$")


_COMPILED = {family: [(_compile(src), dst) for src, dst in table.items()] for family, table in NAME_MAPS.items()}


def neolm_name(family: str, hf_name: str) -> tuple[str, str | None] | None:
    """('blocks.3.attn.qkv.weight', 'q') for an HF tensor name, None if the family has no such tensor."""
    for pattern, target in _COMPILED[family]:
        m = pattern.match(hf_name)
        if m:
            name = target.format(**m.groupdict())
            name, _, part = name.partition("#")
            return name, part or None
    return None


# ---- file readers ---------------------------------------------------------------------------
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """A memory-mapped .safetensors file, validated against its size before any tensor is touched."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NeolmError(f"{path} is truncated or not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise NeolmError(f"{path} is truncated or not a safetensors file (header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise NeolmError(f"{path} is corrupt: its header is not valid JSON") from None
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        if not isinstance(header, dict):
            raise NeolmError(f"{path} is corrupt: its header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise NeolmError(f"{path} is corrupt: bad header entry for tensor {name!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize or begin < 0:
                raise NeolmError(f"{path} is corrupt: tensor {name!r} has {end - begin} bytes for shape {shape}")
            if self._base + end > size:
                raise NeolmError(
                    f"{path} is truncated: tensor {name!r} needs {self._base + end} bytes, the file has {size}"
                )
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self):
        return self.entries.keys()

    def get(self, name: str) -> torch.Tensor:
        """The tensor, backed by the mapping (writes stay private to this process)."""
        dtype, shape, begin, end = self.entries[name]
        offset = self._base + begin
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        if offset % dtype.itemsize:  # unaligned: copy rather than map
            return torch.frombuffer(bytearray(self._map[offset : self._base + end]), dtype=dtype).reshape(shape)
        return torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=offset).view(
            shape
        )

    def release(self, name: str) -> None:
        """Drop the mapped pages that only this tensor uses (after it was copied elsewhere)."""
        _, _, begin, end = self.entries[name]
        page = mmap.PAGESIZE
        lo = -(-(self._base + begin) // page) * page
        hi = (self._base + end) // page * page
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class PickleFile:
    """A pytorch_model.bin, loaded with weights_only=True (memory-mapped where the format allows)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
            raise NeolmError(f"{path} was refused: it holds more than tensors ({first})") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
            raise NeolmError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:200]})") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise NeolmError(f"{path} does not hold a flat dict of tensors")
        self._state = state

    def keys(self):
        return self._state.keys()

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]

    def release(self, name: str) -> None:
        self._state.pop(name, None)


# Quantized checkpoints neolm reads (neolm.quant): bitsandbytes 4-bit, and neolm's own int8/int4.
QUANT_METHODS = ("bitsandbytes", "neolm")


def read_hf_config(folder: Path) -> dict:
    """config.json of a checkpoint folder as a dict; a quantization_config of an unknown method is refused."""
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NeolmError(f"{folder} has no config.json; is it a Hugging Face checkpoint folder?") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NeolmError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise NeolmError(f"{path} does not hold a JSON object")
    quant = data.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        if method not in QUANT_METHODS:
            raise NeolmError(f"{path}: {method} quantized checkpoints are not supported (neolm reads "
                             "bitsandbytes 4-bit and its own int8/int4 checkpoints)")  # fmt: skip
    return data


# generation_config.json keys not taken as defaults: the special tokens come from config.json (the model's), and
# transformers' cache settings (which may name caches of other models, "hybrid") change nothing in neolm
NOT_DEFAULTS = ("eos_token_id", "pad_token_id", "bos_token_id", "cache_implementation", "max_cache_len",
                "disable_compile")  # fmt: skip


def read_generation_defaults(folder: Path, known: set[str]) -> dict:
    """Generation defaults from a checkpoint's generation_config.json (the keys neolm knows), else {}."""
    path = folder / "generation_config.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NeolmError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise NeolmError(f"{path} does not hold a JSON object")
    return {k: v for k, v in data.items() if k in known and k not in NOT_DEFAULTS}


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in the first layout found."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise NeolmError(f"{index} is corrupt: expected a JSON object with a 'weight_map'") from None
            missing = [n for n in names if not (folder / n).exists()]
            if missing:
                raise NeolmError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
            return [folder / n for n in names]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return [folder / name]
    raise NeolmError(
        f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or a sharded index of either"
    )


def open_weights(path: Path):
    return SafetensorsFile(path) if path.suffix == ".safetensors" else PickleFile(path)


# ---- building the model -----------------------------------------------------------------------
def _list(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_state_dict(
    folder: Path, config: Config, dtype: torch.dtype, finish=None, mmap: bool = False, adjust=None
) -> dict[str, torch.Tensor]:
    """neolm's state dict from the weight files in `folder`, converted to `dtype`.

    mmap: tensors stored in `dtype` stay in the file's (copy-on-write) pages instead of being copied; those
    converted or fused are copied as always.

    finish(name, tensor) -> {name: tensor, ...}: what to keep of each tensor once it is complete (e.g. its
    quantized form, so that the float weights are never all in memory at once); by default the tensor.
    adjust(name, tensor) -> tensor, if given, comes first (e.g. a LoRA adapter's update added; never in place).
    Missing, unexpected and mis-shaped tensors are one error that lists them.
    """
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    H, D, C = config.n_head, config.head_dim, config.d_model
    state: dict[str, torch.Tensor] = {}
    complete: set[str] = set()
    fused: dict[str, torch.Tensor] = {}  # q/k/v projections still waiting for a part
    parts_seen: dict[str, set[str]] = {}

    def done(name: str, tensor: torch.Tensor) -> None:
        complete.add(name)
        if adjust is not None:
            tensor = adjust(name, tensor)
        state.update(finish(name, tensor) if finish is not None else {name: tensor})
    unexpected, misshaped, wrong = [], [], set()
    for path in weight_files(folder):
        reader = open_weights(path)
        log.debug("reading %s (%d tensors)", path, len(reader.keys()))
        for hf_name in list(reader.keys()):
            if IGNORED.search(hf_name):
                continue
            mapped = neolm_name(config.family, hf_name)
            if mapped is None or (mapped[0] not in expected):
                if not (mapped and mapped[0] == "lm_head.weight" and config.tie_embeddings):
                    unexpected.append(hf_name)
                continue
            name, part = mapped
            tensor = reader.get(hf_name)
            want = expected[name] if part is None else torch.Size((C, C))
            if tensor.shape != want or not tensor.is_floating_point():
                misshaped.append(f"{hf_name} {tuple(tensor.shape)} {tensor.dtype} (expected {tuple(want)})")
                wrong.add(name)
                continue
            if part is None and mmap and tensor.dtype == dtype:
                done(name, tensor)
                continue  # its pages stay mapped
            if part is None:
                done(name, weight_copy(tensor, dtype))
            else:  # one of q/k/v into the fused per-head [H, 3, D] projection
                if name not in fused:
                    fused[name] = weight_empty(expected[name], dtype)
                fused[name].view(H, 3, D, C)[:, QKV_PARTS.index(part)] = tensor.view(H, D, C)
                parts_seen.setdefault(name, set()).add(part)
                if len(parts_seen[name]) == len(QKV_PARTS):
                    done(name, fused.pop(name))
            reader.release(hf_name)
    missing = set(expected) - complete - wrong - set(fused)  # (an incomplete q/k/v is listed by its parts)
    missing |= {f"{name} (parts {''.join(sorted(set(QKV_PARTS) - p))})" for name, p in parts_seen.items() if len(p) < 3}
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_list(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)} tensor(s): {_list(misshaped, 4)}")
    if problems:
        raise NeolmError(f"checkpoint {folder} does not fit its config.json: " + "; ".join(problems))
    return state


def build_model(config: Config, state: dict[str, torch.Tensor], device=None) -> GPT:
    """A model built on the meta device with `state` assigned into it (no copies on CPU)."""
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


# ---- writing ---------------------------------------------------------------------------------
_REVERSE = {family: [(_compile(dst), src) for src, dst in table.items()] for family, table in NAME_MAPS.items()}


def hf_name(family: str, name: str, part: str | None = None) -> str:
    """The Hugging Face name of a neolm tensor (or of one q/k/v part); the first map entry wins."""
    key = name + (f"#{part}" if part else "")
    for pattern, src in _REVERSE[family]:
        m = pattern.match(key)
        if m:
            return src.format(**m.groupdict())
    raise KeyError(key)


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names (q/k/v split again where the family stores them so)."""
    return to_hf_names(model.config, model.state_dict())


def to_hf_names(config: Config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename neolm tensors (weights, or their gradients) to Hugging Face names."""
    H, D, C = config.n_head, config.head_dim, config.d_model
    out = {}
    for name, tensor in tensors.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        try:
            out[hf_name(config.family, name)] = tensor
        except KeyError:  # this family stores the fused projection as separate q, k, v
            per_head = tensor.view(H, 3, D, C)
            for i, part in enumerate(QKV_PARTS):
                out[hf_name(config.family, name, part)] = per_head[:, i].reshape(C, C)
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None
) -> None:
    """Write a .safetensors file one tensor at a time (no second copy of the model in memory), atomically:
    a temporary file, then a rename. `dtype` converts floating-point tensors as they are written."""
    def target(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * target(t).itemsize
        header[name] = {"dtype": _ST_NAMES[target(t)], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 64)  # data starts 64-byte aligned: whole cache lines where mapped
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().cpu().to(target(t)).contiguous().view(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)


def save_checkpoint(model: GPT, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """config.json + model.safetensors in Hugging Face format (loads in neolm and in transformers)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    dtype = dtype or next(iter(tensors.values())).dtype
    hf_config = model.config.to_hf() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    save_safetensors(tensors, folder / "model.safetensors", dtype=dtype)
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(hf_config, indent=2) + "\n")
    os.replace(tmp, folder / "config.json")
    return folder
