"""Decode steps replayed as CUDA graphs: a token step through every block in one launch on a GPU.

A decode step of one sequence (or a small batch) on a GPU is launch-bound: each block issues some 25 small
kernels, and PyTorch's dispatch of each costs more than the kernel runs (pythia-160m's 12 blocks: ~300 launches
for ~0.1 ms of memory traffic). `attach(model)` (done by `neolm.load` on CUDA unless native=False) sets
`model.decode_step` to a GraphStep: the first step of a batch shape into a KV cache runs eagerly, then CUDA
records it into a graph; every later step copies its inputs into the graph's buffers and replays it.

To be replayable, a step must not depend on Python numbers that change from step to step, so `static_blocks`
takes the cache slot as a 0-d tensor, writes the new keys and values there (index_copy_), and attends over the
whole cache with a mask that hides the slots not written yet (and, in GPT-Neo's local layers, those out of the
window) instead of over a slice that grows. neolm sizes its caches to the prompt plus max_new_tokens, so
little is read beyond what the slice would.

A graph is kept under what it bakes in: the batch shape and dtype, the cache's tensors (their addresses and
shape: the caching allocator gives a new cache of the same size the same memory, so the next generate call
of that shape finds its graph), whether padding keys are hidden, and the number of layers (an early exit).
The blocks' modules and tensors are watched as the native step watches them (neolm.native.decode): a swapped
layer or a moved tensor drops every graph. At most MAX_GRAPHS are kept, the least recently used dropped first.
The step declines (the torch path runs) with autograd on, with forward hooks on the blocks, and while LoRA
adapters are held unmerged (neolm.multilora: which adapter a row gets is Python state a graph cannot see).
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from neolm.model import KVCache, slot_masks
from neolm.multilora import AdapterLinear
from neolm.native.decode import GLOBAL_HOOKS, _snapshot, _Watch

log = logging.getLogger(__name__)

MAX_GRAPHS = 8  # graphs kept per model (each holds its own pool of intermediate tensors)


def static_blocks(model, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, slot: torch.Tensor,
                  key_valid: torch.Tensor | None, layers: int | None = None) -> torch.Tensor:  # fmt: skip
    """The blocks' output (B, 1, C) for one new token per row, x (B, 1, C) embedded, at cache slot `slot` (0-d
    tensor), positions (B, 1); key_valid (B, >= S) or None. The same numbers as GPT.forward's step up to rounding
    (attention sums over every slot, the masked ones giving 0), with no Python number that changes per step."""
    rope = model.rope_at(positions, x.dtype)  # (B, 1, 1, dims)
    masks = slot_masks(model.config.layer_windows, cache.max_len, slot, key_valid)
    for i, block in enumerate(model.blocks[:layers]):
        x = block(x, rope, masks[block.window], cache.layer(i), slot)
    return x


def clear_tail(cache: KVCache) -> None:
    """Zero the slots of `cache` not written yet. A step that attends over the whole cache reads them, under a
    mask, and a masked NaN still poisons the sum (NaN * 0); caches made with torch.empty (KVCache.aligned: "written
    before read") hold whatever the memory held."""
    for t in (cache.k, cache.v, cache.k_scale, cache.v_scale):
        if t is not None:
            t[:, :, :, cache.length :].zero_()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # (B, 1, C) the step's inputs, copied in before each replay
    positions: torch.Tensor  # (B, 1)
    slot: torch.Tensor  # () int64
    valid: torch.Tensor | None  # (B, S)
    out: torch.Tensor  # (B, 1, C), written by each replay


class GraphStep:
    """model.decode_step on CUDA (see the module's doc): (x (B, 1, C), positions (B, 1), cache, key_valid,
    layers) -> the blocks' output (B, 1, C), valid until the next step, or None where the torch path must run."""

    def __init__(self, model):
        self.model = weakref.ref(model)
        self.failed = False  # a recording failed: every later step runs in torch (logged once)
        self._build(model)

    def _build(self, model) -> None:
        """Watch the blocks as they are now, with no graph yet."""
        tensors = [*model.blocks.parameters(), *model.blocks.buffers()]
        self.watch = _Watch(_snapshot(model, tensors))
        watched = [*model.blocks.modules(), model.wte, *([model.wpe] if model.wpe is not None else [])]
        self.hooks = [d for m in watched for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.hooks += [getattr(torch.nn.modules.module, name, {}) for name in GLOBAL_HOOKS]
        self.adapted = any(isinstance(m, AdapterLinear) for m in model.blocks.modules())
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.cleared: weakref.WeakSet[KVCache] = weakref.WeakSet()  # caches whose unwritten slots are zeros

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, key_valid=None,
                 layers: int | None = None) -> torch.Tensor | None:  # fmt: skip
        k = cache.k
        model = self.model()
        if model is not None and not self.watch.unchanged():
            log.info("the model changed since its CUDA graphs were recorded: dropped them")
            self._build(model)
        if (
            model is None
            or self.failed
            or self.adapted
            or x.device.type != "cuda"
            or k.device != x.device
            or torch.is_grad_enabled()
            or tuple(positions.shape) != (x.shape[0], 1)
            or k.shape[1] != x.shape[0]
            or (key_valid is not None and (key_valid.shape[0] != x.shape[0] or key_valid.shape[1] < k.shape[3]))
            or torch.cuda.is_current_stream_capturing()
            or any(self.hooks)
        ):
            return None
        scales = (None, None) if cache.k_scale is None else (cache.k_scale.data_ptr(), cache.v_scale.data_ptr())
        key = (tuple(x.shape), x.dtype, tuple(k.shape), k.dtype, k.data_ptr(), cache.v.data_ptr(), *scales,
               key_valid is None, layers)  # fmt: skip
        if cache not in self.cleared:
            clear_tail(cache)
            self.cleared.add(cache)
        g = self.graphs.get(key)
        if g is None:
            return self._record(model, key, x, positions, cache, key_valid, layers)
        self.graphs.move_to_end(key)
        g.x.copy_(x)
        g.positions.copy_(positions)
        g.slot.fill_(cache.length)
        if g.valid is not None:
            g.valid.copy_(key_valid[:, : k.shape[3]])
        g.graph.replay()
        return g.out

    def _record(self, model, key, x, positions, cache, key_valid, layers) -> torch.Tensor:
        """Run this step eagerly (its answer), then record the same step over buffers of its own into a graph."""
        with torch.inference_mode(False):  # buffers later steps may copy into, inside inference mode or not
            x, positions = x.clone(), positions.clone()
            slot = torch.tensor(cache.length, device=x.device)
            valid = None if key_valid is None else key_valid[:, : cache.max_len].clone()
        out = static_blocks(model, x, positions, cache, slot, valid, layers)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records; runs nothing
                recorded = static_blocks(model, x, positions, cache, slot, valid, layers)
        except Exception as e:  # noqa: BLE001 (a layer that cannot be recorded: every step in torch from now on)
            log.warning("decode steps run in torch: recording a CUDA graph failed (%s)", str(e).splitlines()[0])
            self.failed = True
            return out
        self.graphs[key] = _Graph(graph, x, positions, slot, valid, recorded)
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return out


def attach(model) -> str:
    """Set model.decode_step to a GraphStep where the model is on a GPU; returns "" or why not."""
    model.decode_step = None
    device = model.ln_f.weight.device
    if device.type != "cuda":
        return f"the model is on {device.type}, not a CUDA GPU"
    model.decode_step = GraphStep(model)
    return ""
