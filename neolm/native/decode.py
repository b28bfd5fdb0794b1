"""A whole decode step in one native call (decode.cpp): one new token of each sequence through every block.

`attach(model)` (done by `neolm.load` unless native=False) sets `model.decode_step` when every block's
layers have a native kernel; `GPT.forward` then sends one-token steps with a KV cache here (one sequence or
a batch, left padding included), and everything else (prefill, training, GPUs) through torch. The step reads the
model's tensors in place; before each step it checks that the model's layers and the tensors it points
into are still the ones it was built from, and builds itself anew when they are not."""

from __future__ import annotations

import ctypes
import logging
import operator
import weakref

import torch

from neolm import native

log = logging.getLogger(__name__)

KINDS = {"f32": 0, "bf16": 1, "int8": 2, "int4": 3, "int8a8": 4, "int4a8": 5, "int8f": 6, "int4h": 7, "int8a16": 8}
CACHE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # decode.cpp `Kv`
GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")  # torch.nn.modules.module's, for every module
ACTIVATIONS = {"gelu": 0, "gelu_new": 1, "gelu_fast": 1, "gelu_pytorch_tanh": 1, "relu": 2}  # decode.cpp `act`


_p = ctypes.c_void_p


class _Lin(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("bias_bf16", ctypes.c_int32), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("g", ctypes.c_int64), ("w", _p), ("s", _p), ("bias", _p), ("lora_r", ctypes.c_int64),
                ("lora_a", _p), ("lora_bt", _p), ("lora_owner", _p)]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [("ln1_w", _p), ("ln1_b", _p), ("ln2_w", _p), ("ln2_b", _p),
                ("qkv", _Lin), ("proj", _Lin), ("fc", _Lin), ("out", _Lin), ("window", ctypes.c_int64)]  # fmt: skip


class _Model(ctypes.Structure):
    _fields_ = [("n_layer", ctypes.c_int64), ("c", ctypes.c_int64), ("heads", ctypes.c_int64), ("d", ctypes.c_int64),
                ("f", ctypes.c_int64), ("rot", ctypes.c_int64), ("act_bf16", ctypes.c_int32),
                ("parallel", ctypes.c_int32), ("act", ctypes.c_int32), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("layers", ctypes.POINTER(_Layer)), ("lora_r", ctypes.c_int64)]  # fmt: skip


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _lin(weights: native.Weights) -> _Lin:
    bias = weights.bias
    a, bt, owner = weights.lora or (None, None, None)
    return _Lin(KINDS[weights.kind], int(bias is not None and bias.dtype == torch.bfloat16), weights.n, weights.k,
                weights.g, _ptr(weights.w), _ptr(weights.s), _ptr(bias),
                0 if a is None else a.shape[0], _ptr(a), _ptr(bt), _ptr(owner))  # fmt: skip


class DecodeStep:
    """Every block of `model` for one token per sequence; built by `attach`. Call: (x (B, 1, C), positions
    (B, 1), cache, key_valid (B, S) or None) -> the last block's output (B, 1, C), or None when this call is
    not one it takes."""

    def __init__(self, model, weights: list[list[native.Weights]]):
        from neolm.model import rotary_table  # the model imports neolm.ops, which imports neolm.native

        config = model.config
        self.dtype = model.ln_f.weight.dtype
        self.lib = native._library()[0]
        keep: list = []  # every tensor the structs point into, alive as long as the step
        layers = (_Layer * config.n_layer)()
        for layer, block, lins in zip(layers, model.blocks, weights):
            norms = (block.ln1.weight, block.ln1.bias, block.ln2.weight, block.ln2.bias)
            layer.ln1_w, layer.ln1_b, layer.ln2_w, layer.ln2_b = map(_ptr, norms)
            layer.qkv, layer.proj, layer.fc, layer.out = map(_lin, lins)
            layer.window = block.window or 0
            keep += [*norms, *(t for w in lins for t in (w.w, w.s, w.bias, *(w.lora or ())))]
        self.rope = None
        if config.rotary_dims:
            self.rope = rotary_table(config.n_positions, config.rotary_dims, config.rotary_base)  # fp32 (P, rot)
        rot = 0 if self.rope is None else self.rope[0].shape[1]
        scale = config.attn_scale if config.attn_scale is not None else config.head_dim**-0.5
        self.spec = _Model(config.n_layer, config.d_model, config.n_head, config.head_dim, config.d_ff, rot,
                           int(self.dtype == torch.bfloat16), int(config.parallel_residual),
                           ACTIVATIONS[config.activation], config.layer_norm_eps, scale, layers,
                           max((layer.lora_r for lin in layers for layer in (lin.qkv, lin.proj, lin.fc, lin.out)),
                               default=0))  # fmt: skip
        self.layers, self.keep = layers, keep
        self.model = weakref.ref(model)
        self.watch = _Watch(_snapshot(model, keep))
        # forward hooks on the blocks and their parts, which the step passes by, and on the embeddings, whose
        # output it writes into (and global ones): it declines while any is set (analysis, steering); the watch
        # keeps this list to the modules of now. Hooks on the model itself, ln_f or lm_head see what they would.
        watched = [*model.blocks.modules(), model.wte, *([model.wpe] if model.wpe is not None else [])]
        self.hooks = [d for m in watched for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.hooks += [getattr(torch.nn.modules.module, name, {}) for name in GLOBAL_HOOKS]
        self.hooked = False  # (logged once)
        # where each step learns which LoRA adapter each row uses (neolm.multilora; one AdapterSet's), if any
        self.lora_rows = next((w.lora_rows for lins in weights for w in lins if w.lora_rows is not None), None)
        self.scratch = torch.empty(0, dtype=torch.uint8)  # grown to the largest batch seen
        self.n_positions = config.n_positions

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache, key_valid=None,
                 layers: int | None = None) -> torch.Tensor | None:  # fmt: skip
        """The blocks' output for one new token per row (x: (rows, 1, C) embedded), written over x; or None where
        the torch path must run. layers: the first `layers` blocks only (an early exit)."""
        k, v = cache.k, cache.v  # (L, B, H, max_len, D)
        rows, start = x.shape[0], cache.length
        spec = self.spec
        if layers is not None and layers != spec.n_layer:
            spec = _Model.from_buffer_copy(self.spec)
            spec.n_layer = layers
        if (
            k.shape[0] < spec.n_layer
            or k.shape[1] != rows
            or rows > native.FEW_ROWS
            or tuple(positions.shape) != (rows, 1)
            or x.dtype != self.dtype
            or x.device.type != "cpu"
            or k.dtype not in CACHE_KINDS
            or v.dtype != k.dtype
            or not (k.is_contiguous() and v.is_contiguous())
            or (k.dtype == torch.int8 and not (cache.k_scale.is_contiguous() and cache.v_scale.is_contiguous()))
            or torch.is_grad_enabled()
        ):
            return None
        if any(self.hooks):
            if not self.hooked:
                log.info("forward hooks watch the model's blocks: its decode steps run in torch while they are set")
            self.hooked = True
            return None
        if not self.watch.unchanged():
            return self._rebuilt(x, positions, cache, key_valid, layers)
        valid, valid_stride = None, 0
        if key_valid is not None:  # (B, S) bool, False at padding slots
            if key_valid.dtype != torch.bool or key_valid.shape[0] != rows or key_valid.shape[1] <= start:
                return None
            if key_valid.stride(1) != 1:
                key_valid = key_valid.contiguous()
            valid, valid_stride = key_valid.data_ptr(), key_valid.stride(0)
        positions = positions.to(torch.int64).contiguous()
        low, high = (int(positions), int(positions)) if rows == 1 else map(int, positions.aminmax())
        if low < 0 or high >= self.n_positions:
            return None  # the torch path says what is wrong
        x = x.contiguous()
        cos = sin = None
        if self.rope is not None:
            cos, sin = (t.data_ptr() for t in self.rope)
        need = self.lib.neolm_decode_scratch_bytes(ctypes.byref(spec), rows)
        if self.scratch.numel() < need:
            self.scratch = torch.empty(need, dtype=torch.uint8)
        scales = (None, None) if k.dtype != torch.int8 else (cache.k_scale.data_ptr(), cache.v_scale.data_ptr())
        adapters = None if self.lora_rows is None else self.lora_rows(rows)  # (rows,) int64, or None: no row uses one
        if adapters is not None and tuple(adapters.shape) != (rows,):
            return None  # the torch path says what is wrong
        self.lib.neolm_decode_step(ctypes.byref(spec), rows, x.data_ptr(), start, positions.data_ptr(), cos, sin,
                                   valid, valid_stride, k.data_ptr(), v.data_ptr(), *scales, CACHE_KINDS[k.dtype],
                                   k.shape[3], _ptr(adapters), self.scratch.data_ptr())  # fmt: skip
        return x

    def _rebuilt(self, x, positions, cache, key_valid, layers):
        """The model changed since this step was built (a layer swapped, e.g. quantize_model; a tensor moved or
        replaced): build a new step for it and run that, or decline when none can be built."""
        model = self.model()
        if model is None:
            return None
        why_not = attach(model)
        log.info("the model changed since its native decode step was built: %s", why_not or "rebuilt")
        return None if model.decode_step is None else model.decode_step(x, positions, cache, key_valid, layers)


class _Watch:
    """`unchanged()`: every (table, key) still holds its object and every watched tensor its data pointer.
    Checked before each step, so it runs as C-level maps: a generator over the ~250 entries of pythia-160m
    cost 0.26 ms a step (4% of its single-stream step)."""

    def __init__(self, snapshot: list[tuple[dict, str, object, int]]):
        self.tables, self.keys, self.objects, _ = (list(column) for column in zip(*snapshot))
        self.tensors = [obj for _, _, obj, ptr in snapshot if ptr]
        self.pointers = [ptr for *_, ptr in snapshot if ptr]

    def unchanged(self) -> bool:
        held = map(dict.get, self.tables, self.keys)
        return all(map(operator.is_, held, self.objects)) and list(map(torch.Tensor.data_ptr, self.tensors)) == self.pointers


def _snapshot(model, pointed: list) -> list[tuple[dict, str, object, int]]:
    """What a step is built from, as (table, key, object, data pointer or 0): every submodule of the blocks in
    its parent's table, each parameter or buffer the step points into with its data pointer, and int4's
    native copy of the codes."""
    ids = {id(t) for t in pointed if t is not None}
    snap = [(model._modules, "blocks", model.blocks, 0)]
    for module in model.blocks.modules():
        snap += [(module._modules, key, child, 0) for key, child in module._modules.items()]
        for table in (module._parameters, module._buffers):
            snap += [(table, key, t, t.data_ptr()) for key, t in table.items() if id(t) in ids]
        if "_native" in module.__dict__:
            snap.append((module.__dict__, "_native", module.__dict__["_native"], 0))
    return snap


def attach(model) -> str:
    """Set model.decode_step to a native step when this machine and every layer allow it; returns "" or why not."""
    model.decode_step = None
    have, why = native.available()
    if not have:
        return why
    if model.config.activation not in ACTIVATIONS:
        return f"no native {model.config.activation} activation"
    weights = []
    for i, block in enumerate(model.blocks):
        layers = (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj)
        lins = [layer.native_weights() if hasattr(layer, "native_weights") else None for layer in layers]
        missing = [name for name, w in zip(("qkv", "proj", "fc", "out"), lins) if w is None or w.kind not in have]
        if missing:
            return f"block {i}'s {', '.join(missing)} layer has no native kernel"
        weights.append(lins)
    model.decode_step = DecodeStep(model, weights)
    return ""
