"""bitsandbytes 4-bit checkpoints (transformers' `BitsAndBytesConfig(load_in_4bit=True)`), read in plain
PyTorch on any device: no bitsandbytes at run time.

Per quantized Linear the checkpoint holds (HF name NAME):
  NAME.weight                         uint8 (ceil(n/2), 1): 4-bit codes of the flattened (N, K) weight, two a
                                      byte, the earlier element in the high nibble (n = N * K)
  NAME.weight.absmax                  float32 (ceil(n/B),): one scale per block of B consecutive elements, or,
                                      with double quantization, uint8 codes of those scales
  NAME.weight.quant_map               float32 (16,): the code table (bitsandbytes dequantizes with its own,
                                      identical, built-in NF4/FP4 table; so does neolm)
  NAME.weight.nested_absmax           float32 (ceil(blocks/256),)     } double quantization only: scales of
  NAME.weight.nested_quant_map        float32 (256,)                  } the scales, 8-bit blockwise
  NAME.weight.quant_state.bitsandbytes__nf4 (or __fp4): uint8 JSON {"quant_type", "blocksize", "dtype", "shape",
                                      "nested_blocksize", "nested_dtype", "nested_offset"}
Dequantization (bitsandbytes' dequantize_4bit, bit for bit):
  absmax = nested_quant_map[absmax] * nested_absmax[block // nested_blocksize] + nested_offset  (if nested)
  w[i] = TABLE[code i] * absmax[i // B], in float32, then cast to the quant_state dtype.
Blocks run over the flattened weight; they may straddle rows.

The layers keep the packed codes (half a byte a weight) and dequantize on each call: NF4/FP4 codes are
not uniform, so no integer kernel reproduces them exactly. GPT-Neo's separate q/k/v projections stay three
quantized tensors behind neolm's fused per-head qkv layer.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from neolm import checkpoint
from neolm.config import Config
from neolm.errors import NeolmError
from neolm.model import GPT
from neolm.quant.linear import QuantLinear

log = logging.getLogger(__name__)

NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 (1 sign, 2 exponent, 1 mantissa bits) in code order, normalised by its largest magnitude (12);
# code 8 ("-0") is +0.0 in bitsandbytes' table.
FP4 = tuple(
    v / 12 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
)
TABLES = {"nf4": NF4, "fp4": FP4}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STATE = re.compile(r"^(?P<base>.+\.weight)\.quant_state\.bitsandbytes__(?P<type>\w+)$")
_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (n,) * scales[i // blocksize], float32; the last block may be short."""
    n = values.numel()
    pad = -n % blocksize
    out = F.pad(values, (0, pad)).view(-1, blocksize) * scales.view(-1, 1)
    return out.view(-1)[:n]


class Bnb4bitWeight(nn.Module):
    """One stored bitsandbytes 4-bit weight (N, K)."""

    def __init__(self, packed, absmax, quant_type, blocksize, shape, dtype, nested=None):
        super().__init__()
        self.quant_type, self.blocksize, self.shape, self.dtype = quant_type, blocksize, tuple(shape), dtype
        self.register_buffer("packed", packed.reshape(-1))  # (ceil(n/2),) uint8
        self.register_buffer("absmax", absmax)  # (blocks,) float, or uint8 codes when nested
        self.register_buffer("pairs", torch.tensor(TABLES[quant_type])[_pair_index()].contiguous())  # (256, 2)
        self.nested_blocksize = self.offset = None
        if nested is not None:
            nested_absmax, nested_code, self.nested_blocksize, offset = nested
            self.register_buffer("nested_absmax", nested_absmax.float())
            self.register_buffer("nested_code", nested_code.float())
            self.offset = float(offset)

    def scales(self) -> torch.Tensor:
        """Per-block scales, float32 (blocks,)."""
        if self.nested_blocksize is None:
            return self.absmax.float()
        a = _blockwise(self.nested_code[self.absmax.long()], self.nested_absmax, self.nested_blocksize)
        return a + torch.tensor(self.offset, dtype=torch.float32, device=a.device)

    def dequantize(self) -> torch.Tensor:
        """The weight (N, K) in its stored dtype, equal to bitsandbytes' dequantize_4bit."""
        n, bs = self.shape[0] * self.shape[1], self.blocksize
        values = torch.index_select(self.pairs, 0, self.packed.int()).view(-1)[:n]  # (n,) float32 codes
        scales = self.scales()
        full = n - n % bs
        values[:full].view(-1, bs).mul_(scales[: full // bs, None])  # in place: one pass over the weight
        values[full:].mul_(scales[full // bs :])  # a short last block (at most one scale)
        return values.view(self.shape).to(self.dtype)


def _pair_index() -> torch.Tensor:
    """(256, 2): the two codes of a byte, high nibble first."""
    b = torch.arange(256)
    return torch.stack((b >> 4, b & 15), dim=1)


class Bnb4bitLinear(QuantLinear):
    """A Linear layer made of one stored weight, or of GPT-Neo's three (q, k, v) fused per head."""

    bits = 4

    def __init__(self, parts: list[Bnb4bitWeight], bias, dtype, heads: tuple[int, int] | None = None):
        n_out = sum(p.shape[0] for p in parts)
        super().__init__(parts[0].shape[1], n_out, False, dtype, "meta")
        self.parts = nn.ModuleList(parts)
        self.heads = heads  # (H, D): the parts are q, k, v, interleaved into neolm's [H, 3, D] layout
        self.bias = bias

    @property
    def qweight(self) -> torch.Tensor:
        return self.parts[0].packed

    def prepare(self, name=""):
        self._prepared_on = self.qweight.device  # nothing to pack: no integer kernel reproduces NF4/FP4

    def dequantize(self, dtype=None):
        dtype = dtype or self.dtype
        if self.heads is None:
            return self.parts[0].dequantize().to(dtype)
        (H, D), C = self.heads, self.in_features
        w = torch.empty(H, 3, D, C, dtype=dtype, device=self.qweight.device)
        for i, part in enumerate(self.parts):
            w[:, i] = part.dequantize().view(H, D, C)
        return w.view(3 * H * D, C)

    def extra_repr(self) -> str:
        p = self.parts[0]
        return f"{super().extra_repr()}, {p.quant_type}, blocksize={p.blocksize}" + (
            ", double quantization" if p.nested_blocksize else ""
        )


# ---- reading a checkpoint -------------------------------------------------------------------
def check_config(quant: dict, source: str) -> None:
    if quant.get("load_in_8bit") or quant.get("_load_in_8bit"):
        raise NeolmError(f"{source}: bitsandbytes 8-bit checkpoints are not supported; neolm reads bitsandbytes "
                         "4-bit (nf4, fp4) checkpoints")  # fmt: skip
    if not (quant.get("load_in_4bit") or quant.get("_load_in_4bit")):
        raise NeolmError(f"{source}: bitsandbytes quantization_config is neither 4-bit nor 8-bit")


def _quant_state(name: str, blob: torch.Tensor) -> dict:
    try:
        state = json.loads(bytes(blob.to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict):
        raise NeolmError(f"tensor {name} is corrupt: not a JSON quantization state")
    return state


def _weight(base: str, qtype: str, get, has, want_shape) -> Bnb4bitWeight:
    """The Bnb4bitWeight stored under HF name `base` (e.g. ...q_proj.weight), validated."""
    state_name = f"{base}.quant_state.bitsandbytes__{qtype}"
    state = _quant_state(state_name, get(state_name))
    for part in ("absmax", "quant_map") + (("nested_absmax", "nested_quant_map") if "nested_offset" in state else ()):
        if not has(f"{base}.{part}"):
            raise NeolmError(f"bitsandbytes checkpoint is missing tensor {base}.{part}")
    if not has(base):
        raise NeolmError(f"bitsandbytes checkpoint is missing tensor {base}")

    def bad(what: str):
        return NeolmError(f"bitsandbytes tensor {base}: {what}")

    try:
        blocksize, shape, dtype = int(state["blocksize"]), tuple(int(s) for s in state["shape"]), state["dtype"]
        quant_type = state.get("quant_type", qtype)
    except (KeyError, TypeError, ValueError):
        raise bad(f"quantization state lacks blocksize, shape or dtype ({state_name})") from None
    if quant_type not in TABLES or quant_type != qtype:
        raise bad(f"unknown 4-bit type {quant_type!r} (neolm reads nf4 and fp4)")
    if blocksize not in BLOCKSIZES:
        raise bad(f"blocksize {blocksize} is not one of {', '.join(map(str, BLOCKSIZES))}")
    if dtype not in FLOATS:
        raise bad(f"dtype {dtype!r} is not float32, float16 or bfloat16")
    if shape != tuple(want_shape):
        raise bad(f"shape {shape} does not fit the model's {tuple(want_shape)}")
    n = shape[0] * shape[1]
    blocks = -(-n // blocksize)
    packed, absmax, table = get(base), get(f"{base}.absmax"), get(f"{base}.quant_map")
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: the same bytes
        packed = packed.contiguous().view(torch.uint8)
    if packed.numel() != -(-n // 2):
        raise bad(f"{packed.numel()} bytes of codes for shape {shape} (expected {-(-n // 2)})")
    if absmax.numel() != blocks:
        raise bad(f"{absmax.numel()} block scales for {n} weights in blocks of {blocksize} (expected {blocks})")
    expected_table = torch.tensor(TABLES[quant_type])
    if table.numel() != 16 or not torch.allclose(table.float().cpu(), expected_table, atol=1e-6):
        log.warning("%s.quant_map differs from bitsandbytes' %s table; the built-in table is used, as bitsandbytes "
                    "does", base, quant_type)  # fmt: skip
    nested = None
    if "nested_offset" in state:
        nested_absmax, nested_code = get(f"{base}.nested_absmax"), get(f"{base}.nested_quant_map")
        try:
            nested_blocksize, offset = int(state["nested_blocksize"]), float(state["nested_offset"])
        except (KeyError, TypeError, ValueError):
            raise bad("double-quantization state lacks nested_blocksize or nested_offset") from None
        if absmax.dtype != torch.uint8 or nested_code.numel() != 256 or nested_blocksize < 1:
            raise bad("double-quantization tensors have the wrong type or size")
        if nested_absmax.numel() != -(-blocks // nested_blocksize):
            raise bad(f"{nested_absmax.numel()} nested scales for {blocks} blocks of {nested_blocksize}")
        nested = (nested_absmax, nested_code, nested_blocksize, offset)
    elif not absmax.is_floating_point():
        raise bad(f"block scales are {absmax.dtype} without double quantization")
    for t, what in ((absmax, "absmax"), (nested[0] if nested else None, "nested_absmax")):
        if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
            raise bad(f"{what} holds NaN or infinite values (corrupt file)")
    return Bnb4bitWeight(packed, absmax, quant_type, blocksize, shape, FLOATS[dtype], nested)


def load_bnb(folder: Path, raw: dict, config: Config, dtype: torch.dtype, device=None) -> GPT:
    """A model from a bitsandbytes 4-bit checkpoint folder (quantized layers stay packed)."""
    check_config(raw["quantization_config"], str(folder / "config.json"))
    readers = {}  # HF name -> reader
    for path in checkpoint.weight_files(folder):
        reader = checkpoint.open_weights(path)
        readers.update(dict.fromkeys(reader.keys(), reader))
    quantized = {}  # HF base name -> 4-bit type
    for name in readers:
        m = _STATE.match(name)
        if m:
            quantized[m["base"]] = m["type"]
    companions = {f"{base}.{suffix}" for base in quantized for suffix in _PARTS}
    companions |= {f"{base}.quant_state.bitsandbytes__{t}" for base, t in quantized.items()}

    def get(name):
        return readers[name].get(name)

    with torch.device("meta"):
        model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    H, D, C = config.n_head, config.head_dim, config.d_model
    parts: dict[str, dict[str, Bnb4bitWeight]] = {}  # neolm module -> {part or "": weight}
    float_names = []
    unexpected = []
    for hf in readers:
        if hf in companions or checkpoint.IGNORED.search(hf):
            continue
        mapped = checkpoint.neolm_name(config.family, hf)
        if mapped is None or mapped[0] not in expected:
            if not (mapped and mapped[0] == "lm_head.weight" and config.tie_embeddings):
                unexpected.append(hf)
            continue
        name, part = mapped
        if hf in quantized:
            want = (C, C) if part else expected[name]
            parts.setdefault(name.removesuffix(".weight"), {})[part or ""] = _weight(
                hf, quantized[hf], get, readers.__contains__, want
            )
        else:
            float_names.append(hf)
    if unexpected:
        raise NeolmError(f"bitsandbytes checkpoint {folder} has {len(unexpected)} unexpected tensor(s): "
                         f"{checkpoint._list(unexpected)}")  # fmt: skip
    state = _float_state(folder, float_names, readers, config, dtype, expected)
    for module_name, found in parts.items():
        if set(found) not in ({""}, set("qkv")):
            raise NeolmError(f"bitsandbytes checkpoint {folder}: layer {module_name} has quantized parts "
                             f"{sorted(found)} and float ones")  # fmt: skip
        ordered = [found[""]] if "" in found else [found[p] for p in "qkv"]
        bias_name = module_name + ".bias"
        bias = nn.Parameter(state.pop(bias_name), False) if bias_name in state else None
        layer = Bnb4bitLinear(ordered, bias, dtype, None if "" in found else (H, D))
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        expected.pop(module_name + ".weight")
        expected.pop(bias_name, None)
    missing = set(expected) - set(state)
    if missing:
        raise NeolmError(f"bitsandbytes checkpoint {folder} does not fit its config.json: missing {len(missing)} "
                         f"tensor(s): {checkpoint._list(missing)}")  # fmt: skip
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.wte.weight
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module._prepared_on = module.qweight.device
    model.quant_config = raw["quantization_config"]
    log.info("bitsandbytes 4-bit checkpoint: %d quantized layers, dequantized per call", len(parts))
    return model


def _float_state(folder, names, readers, config: Config, dtype, expected) -> dict[str, torch.Tensor]:
    """The unquantized tensors under neolm names, converted to dtype (q/k/v fused when stored apart)."""
    H, D, C = config.n_head, config.head_dim, config.d_model
    state, wrong = {}, []
    for hf in names:
        name, part = checkpoint.neolm_name(config.family, hf)
        tensor = readers[hf].get(hf)
        want = expected[name] if part is None else torch.Size((C, C))
        if tensor.shape != want or not tensor.is_floating_point():
            wrong.append(f"{hf} {tuple(tensor.shape)} {tensor.dtype} (expected {tuple(want)})")
            continue
        if part is None:
            state[name] = tensor.to(dtype)
        else:
            if name not in state:
                state[name] = torch.empty(expected[name], dtype=dtype)
            state[name].view(H, 3, D, C)[:, checkpoint.QKV_PARTS.index(part)] = tensor.view(H, D, C)
        if part is not None or state[name].data_ptr() != tensor.data_ptr():
            readers[hf].release(hf)  # copied: drop the mapped pages
    if wrong:
        raise NeolmError(
            f"bitsandbytes checkpoint {folder}: mis-shaped {len(wrong)} tensor(s): {checkpoint._list(wrong, 4)}"
        )
    return state
