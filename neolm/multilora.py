"""Many LoRA adapters over one model, unmerged, each row of a batch with its own (as vLLM's multi-LoRA serving and
S-LoRA): `LanguageModel.load_adapter` adds one, `set_adapter` picks the one every generation uses, and the server
(`neolm serve --lora-modules NAME=PATH`) gives each request the adapter its `model` names, in one batch.

A module swap, applied after the model is built (and quantized) as quantization is: each adapted linear layer
becomes an AdapterLinear, which keeps the layer as it was (`base`) and every adapter's factors side by side,
A's rows stacked in `a` (R, in) and B's columns (scale included) as rows of `bt` (R, out), adapter k owning the
rows `spans[k]` (empty where it does not adapt this layer). What each row of the next forwards uses is set on the
AdapterSet the layers share (`rows`): 0 (the base model), an adapter for every row, or one per row. Then

    one adapter k:    y = base(x) + (x @ a[k's rows].T) @ bt[k's rows]
    one per row:      y = base(x) + ((x @ a.T) * mask) @ bt      mask (N, 1, R): 1 where column r is row n's adapter's

so a batch of rows with different adapters costs two thin products per layer whatever their number, and the
columns of other adapters add exact zeros. The native decode step (neolm.native.decode) does the same in its
own loops (decode.cpp's `lora`), reading only each row's own adapter's rows. The update is computed in the
model's dtype beside the base layer's output, as PEFT's unmerged LoRA does; merging an adapter into the weights
(neolm.load's adapter=) gives the same numbers but for rounding. While adapters are held, the model's
state_dict names the layers' own weights `...qkv.base.weight`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from neolm.errors import NeolmError
from neolm.model import GPT

log = logging.getLogger(__name__)

LAYERS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc"), ("mlp", "proj"))  # a block's linear layers
BASE = "__base__"  # PEFT's name, in adapter_names, for the model without an adapter


@dataclass(frozen=True)
class Mixed:
    """A generation whose prompts run with different adapters of `adapters` (PEFT's mixed adapter batches):
    prompt i's index (0: none) is per_prompt[i]."""

    adapters: AdapterSet
    per_prompt: tuple[int, ...]


class AdapterSet:
    """The adapters a model holds unmerged (adapter k: names[k - 1]; 0 is the base model) and which each row of
    its next forwards uses (`rows`). Made by AdapterSet.attach; the layers it swapped in share it."""

    def __init__(self, model: GPT):
        self.model = model
        self.names: list[str | None] = []  # None: a deleted adapter's index, kept so that the others keep theirs
        self.layers: dict[str, AdapterLinear] = {}  # every block's linear layers, by weight name ("blocks.0.attn.qkv")
        self.rows: int | torch.Tensor = 0  # the adapter of every row, or (N,) one per row
        self._masks: dict[tuple, torch.Tensor] = {}  # per-row masks for the rows now, by layers' spans

    @classmethod
    def attach(cls, model: GPT) -> AdapterSet:
        """Swap every block's linear layers for AdapterLinears holding no adapter yet."""
        adapters = cls(model)
        for i, block in enumerate(model.blocks):
            for parent, attr in LAYERS:
                holder = getattr(block, parent)
                layer = AdapterLinear(getattr(holder, attr), adapters)
                setattr(holder, attr, layer)
                adapters.layers[f"blocks.{i}.{parent}.{attr}"] = layer
        return adapters

    def detach(self) -> None:
        """Put the model's own layers back."""
        for name, layer in self.layers.items():
            holder = self.model.get_submodule(name.rsplit(".", 1)[0])
            setattr(holder, name.rsplit(".", 1)[1], layer.base)
        self.layers, self.names = {}, []

    @property
    def held(self) -> list[str]:
        return [name for name in self.names if name is not None]

    def index(self, name: str) -> int:
        """The adapter's index (1, 2, ...), for select()."""
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise NeolmError(f"no adapter named {name!r}; loaded: {', '.join(self.held) or 'none'}") from None

    def mixed(self, names: Sequence[str], prompts: int) -> Mixed:
        """PEFT's adapter_names: an adapter's name per prompt, or "__base__" for none."""
        if isinstance(names, str) or len(names) != prompts:
            raise NeolmError(f"adapter_names must be a list of one name per prompt ({prompts}), got {names!r}")
        return Mixed(self, tuple(0 if name == BASE else self.index(name) for name in names))

    def add(self, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Hold an adapter's factors ({weight name: (A (r, in), B (out, r))}, neolm.adapter.lora_factors); returns
        its index."""
        if name in self.names:
            raise NeolmError(f"an adapter named {name!r} is loaded already")
        unknown = sorted({n.removesuffix(".weight") for n in factors} - set(self.layers))
        if unknown:
            raise NeolmError(f"the adapter {name!r} adapts {', '.join(unknown[:4])}, which this model does not have")
        index = len(self.names) + 1
        for key, layer in self.layers.items():
            a, b = factors.get(key + ".weight", (None, None))
            layer.append(index, a, b)
        self.names.append(name)
        self._masks.clear()
        return index

    def remove(self, name: str) -> None:
        index = self.index(name)
        for layer in self.layers.values():
            layer.drop(index)
        self.names[index - 1] = None
        if bool(torch.as_tensor(self.rows == index).any()):
            self.rows = 0
        self._masks.clear()

    def select(self, rows: int | Sequence[int]) -> None:
        """The adapter every row of the next forwards uses (0: none), or one per row."""
        if not isinstance(rows, int):
            rows = list(rows)
            rows = rows[0] if len(set(rows)) == 1 else torch.tensor(rows, device=self.model.ln_f.weight.device)
        if isinstance(rows, int) and not 0 <= rows <= len(self.names):
            raise NeolmError(f"no adapter {rows}")
        self.rows = rows
        self._masks.clear()

    @contextlib.contextmanager
    def using(self, rows: int | Sequence[int]) -> Iterator[None]:
        """select(rows) for the forwards inside, then the selection before."""
        before = self.rows
        self.select(rows)
        try:
            yield
        finally:
            self.rows = before
            self._masks.clear()

    def native_rows(self, n: int) -> torch.Tensor | None:
        """Each row's adapter for a native decode step of n rows ((n,) int64), or None when no row uses one."""
        if isinstance(self.rows, int):
            return None if self.rows == 0 else torch.full((n,), self.rows, dtype=torch.long)
        return self.rows

    def mask(self, layer: AdapterLinear, dtype: torch.dtype) -> torch.Tensor:
        """(N, 1, R): 1 at the columns of each row's adapter, for the layers laid out as `layer` (its spans)."""
        key = (layer.spans, dtype)
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = (layer.owner[None, :] == self.rows[:, None]).to(dtype)[:, None, :]
        return mask


class AdapterLinear(nn.Module):
    """A linear layer (`base`: float or quantized, kept as it was) plus the LoRA updates of the adapters its
    AdapterSet holds; which one each row gets is the set's `rows` (see the module's doc)."""

    def __init__(self, base: nn.Module, adapters: AdapterSet):
        super().__init__()
        self.base, self.adapters = base, adapters
        self.in_features, self.out_features = base.in_features, base.out_features
        ref = adapters.model.ln_f.weight  # the activations' dtype and device (a quantized layer holds codes)
        empty = {"dtype": ref.dtype, "device": ref.device}
        self.register_buffer("a", torch.empty(0, self.in_features, **empty), persistent=False)  # (R, in)
        self.register_buffer("bt", torch.empty(0, self.out_features, **empty), persistent=False)  # (R, out)
        self.register_buffer("owner", torch.empty(0, dtype=torch.long, device=ref.device), persistent=False)  # (R,)
        # adapter k's rows of a and bt (0: the base model's, none); layers laid out alike share the per-row masks
        self.spans: tuple[tuple[int, int], ...] = ((0, 0),)

    def append(self, index: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Adapter `index`'s factors A (r, in) and B (out, r), or None where it does not adapt this layer."""
        start = self.a.shape[0]
        if a is not None:
            if a.shape[1] != self.in_features or b.shape != (self.out_features, a.shape[0]):
                raise NeolmError(f"a LoRA update of {tuple(b.shape)} @ {tuple(a.shape)} does not fit a layer of "
                                 f"{self.in_features} -> {self.out_features}")  # fmt: skip
            self.a = torch.cat((self.a, a.to(self.a)))
            self.bt = torch.cat((self.bt, b.t().to(self.bt)))
            self.owner = torch.cat((self.owner, torch.full((a.shape[0],), index, device=self.owner.device)))
        self.spans += ((start, self.a.shape[0]),)

    def drop(self, index: int) -> None:
        """Forget adapter `index`'s factors (its span becomes empty; the others keep their indices)."""
        start, stop = self.spans[index]
        n = stop - start
        keep = torch.cat((torch.arange(start), torch.arange(stop, self.a.shape[0]))).to(self.a.device)
        self.a, self.bt, self.owner = self.a[keep], self.bt[keep], self.owner[keep]
        self.spans = tuple((start, start) if k == index else (lo - n, hi - n) if lo >= stop else (lo, hi)
                           for k, (lo, hi) in enumerate(self.spans))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.adapters.rows
        if isinstance(rows, int):
            start, stop = self.spans[rows]
            if start == stop:
                return y
            return y + (x @ self.a[start:stop].t()) @ self.bt[start:stop]  # (..., r) then (..., out)
        if x.shape[0] != rows.shape[0]:
            raise NeolmError(f"{x.shape[0]} rows, and an adapter chosen for {rows.shape[0]}")
        mask = self.adapters.mask(self, x.dtype)  # (N, 1, R)
        return y + ((x @ self.a.t()) * mask) @ self.bt

    def native_weights(self):
        """The base layer's, with the adapters' factors, for the native decode step (decode.cpp's `lora`)."""
        native = getattr(self.base, "native_weights", None)
        weights = None if native is None else native()
        if weights is None:
            return None
        lora = (self.a, self.bt, self.owner) if self.a.shape[0] else None
        return dataclasses.replace(weights, lora=lora, lora_rows=self.adapters.native_rows)
