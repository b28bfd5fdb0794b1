"""The model configuration: one dataclass for both families.

`Config.from_hf()` is the only place in neolm that knows the Hugging Face config.json schemas
(`gpt_neo`, and `gpt_neox` in its classic and `rope_parameters` forms); `Config.to_hf()` writes
them back. The model reads only the fields below, each at one place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from neolm.errors import NeolmError

ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu")
FAMILIES = ("gpt_neo", "gpt_neox")


@dataclass(frozen=True)
class Config:
    family: str  # "gpt_neo" | "gpt_neox": the HF model_type, kept for export and display
    vocab_size: int
    n_positions: int  # context length
    d_model: int
    n_layer: int
    n_head: int
    d_ff: int
    pos_embedding: str  # "learned" (GPT-Neo) | "rotary" (GPT-NeoX)
    rotary_dims: int = 0  # int(head_dim * rotary_pct); an odd count rotates one more dim, as transformers does
    rotary_base: float = 10000.0
    attn_scale: float = 1.0  # multiplies q.k: 1.0 for GPT-Neo, 1/sqrt(head_dim) for GPT-NeoX
    layer_windows: tuple[int | None, ...] = ()  # per layer: None = global, w = local (sees w keys)
    parallel_residual: bool = False  # x + attn(ln1 x) + mlp(ln2 x)  vs  sequential
    qkv_bias: bool = False
    out_bias: bool = True  # attention output projection
    tie_embeddings: bool = True  # lm_head shares wte
    activation: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tokenizer: str = "gpt2"  # built-in tokenizer used when a checkpoint has none
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # HF keys kept for export

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise NeolmError(f"unknown model family {self.family!r}; neolm knows {', '.join(FAMILIES)}")
        if self.d_model % self.n_head:
            raise NeolmError(f"hidden size {self.d_model} is not divisible by the {self.n_head} attention heads")
        if len(self.layer_windows) != self.n_layer:
            raise NeolmError(f"{len(self.layer_windows)} attention layer kinds given for {self.n_layer} layers")
        if self.activation not in ACTIVATIONS:
            raise NeolmError(f"unknown activation {self.activation!r}; neolm knows {', '.join(ACTIVATIONS)}")
        if self.pos_embedding not in ("learned", "rotary"):
            raise NeolmError(f"unknown position embedding {self.pos_embedding!r}")
        if not 0 <= self.rotary_dims + self.rotary_dims % 2 <= self.head_dim:
            raise NeolmError(f"rotary dims {self.rotary_dims} exceed the head dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def n_params(self) -> int:
        """Parameter count (a tied head counted once)."""
        d, f, v = self.d_model, self.d_ff, self.vocab_size
        attn = 3 * d * d + (3 * d if self.qkv_bias else 0) + d * d + (d if self.out_bias else 0)
        mlp = 2 * d * f + f + d
        block = attn + mlp + 4 * d
        emb = v * d + (self.n_positions * d if self.pos_embedding == "learned" else 0)
        head = 0 if self.tie_embeddings else v * d
        return emb + self.n_layer * block + 2 * d + head

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> Config:
        model_type = hf.get("model_type")
        if model_type not in _READERS:
            raise NeolmError(
                f"{source}: unknown model_type {model_type!r}; neolm supports {', '.join(sorted(_READERS))}"
            )
        return _READERS[model_type](_Keys(hf, source))

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that both neolm and `transformers` read."""
        return _WRITERS[self.family](self)


class _Keys:
    """Reads keys from an HF config dict; a missing required key is a one-line error naming it."""

    def __init__(self, hf: dict[str, Any], source: str):
        self.hf, self.source = hf, source

    def req(self, *names: str):
        for name in names:
            if name in self.hf and self.hf[name] is not None:
                return self.hf[name]
        raise NeolmError(f"{self.source}: missing required key {names[0]!r}")

    def get(self, name: str, default=None):
        value = self.hf.get(name)
        return default if value is None else value

    def token_id(self, name: str) -> int | None:
        value = self.hf.get(name)
        if isinstance(value, list):  # HF allows a list of eos ids; the first is the canonical one
            value = value[0] if value else None
        return value


def _expand_attention_types(attention_types, source: str) -> list[str]:
    """[[["global", "local"], 12]] -> ["global", "local", ... 24 entries]."""
    try:
        kinds = [kind for pattern, repeat in attention_types for _ in range(repeat) for kind in pattern]
    except (TypeError, ValueError):
        raise NeolmError(f"{source}: attention_types must look like [[['global', 'local'], 12]]") from None
    unknown = sorted(set(kinds) - {"global", "local"})
    if unknown:
        raise NeolmError(f"{source}: unknown attention type(s) {unknown} in attention_types")
    return kinds


def _read_gpt_neo(k: _Keys) -> Config:
    n_layer = int(k.req("num_layers", "num_hidden_layers"))
    d_model = int(k.req("hidden_size"))
    window = int(k.get("window_size", 256))
    kinds = _expand_attention_types(k.req("attention_types"), k.source)
    if len(kinds) != n_layer:
        raise NeolmError(f"{k.source}: attention_types describe {len(kinds)} layers but num_layers is {n_layer}")
    return Config(
        family="gpt_neo",
        vocab_size=int(k.req("vocab_size")),
        n_positions=int(k.req("max_position_embeddings")),
        d_model=d_model,
        n_layer=n_layer,
        n_head=int(k.req("num_heads", "num_attention_heads")),
        d_ff=int(k.get("intermediate_size", 4 * d_model)),
        pos_embedding="learned",
        attn_scale=1.0,  # GPT-Neo does not scale attention scores
        layer_windows=tuple(window if kind == "local" else None for kind in kinds),
        parallel_residual=False,
        qkv_bias=False,
        out_bias=True,
        tie_embeddings=bool(k.get("tie_word_embeddings", True)),
        activation=k.get("activation_function", "gelu_new"),
        layer_norm_eps=float(k.get("layer_norm_epsilon", 1e-5)),
        bos_token_id=k.token_id("bos_token_id"),
        eos_token_id=k.token_id("eos_token_id"),
        tokenizer="gpt2",
        extra={"window_size": window},
    )


def _read_gpt_neox(k: _Keys) -> Config:
    d_model = int(k.req("hidden_size"))
    n_head = int(k.req("num_attention_heads", "num_heads"))
    n_layer = int(k.req("num_hidden_layers", "num_layers"))
    rope = k.get("rope_parameters") or k.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NeolmError(f"{k.source}: rope_type {rope_type!r} is not supported (only 'default')")
    rotary_pct = rope.get("partial_rotary_factor", k.get("rotary_pct", 0.25))
    rotary_base = rope.get("rope_theta", k.get("rotary_emb_base", 10000.0))
    head_dim = d_model // n_head if n_head else 0
    bias = bool(k.get("attention_bias", True))
    return Config(
        family="gpt_neox",
        vocab_size=int(k.req("vocab_size")),
        n_positions=int(k.req("max_position_embeddings")),
        d_model=d_model,
        n_layer=n_layer,
        n_head=n_head,
        d_ff=int(k.req("intermediate_size")),
        pos_embedding="rotary",
        rotary_dims=int(head_dim * float(rotary_pct)),
        rotary_base=float(rotary_base),
        attn_scale=1.0 / math.sqrt(head_dim) if head_dim else 1.0,
        layer_windows=(None,) * n_layer,
        parallel_residual=bool(k.get("use_parallel_residual", True)),
        qkv_bias=bias,
        out_bias=bias,
        tie_embeddings=bool(k.get("tie_word_embeddings", False)),
        activation=k.get("hidden_act", "gelu"),
        layer_norm_eps=float(k.get("layer_norm_eps", 1e-5)),
        bos_token_id=k.token_id("bos_token_id"),
        eos_token_id=k.token_id("eos_token_id"),
        tokenizer="gpt-neox-20b",
        extra={"rotary_pct": float(rotary_pct)},
    )


def _write_gpt_neo(c: Config) -> dict[str, Any]:
    windows = {w for w in c.layer_windows if w is not None}
    if len(windows) > 1:
        raise NeolmError("GPT-Neo's config.json has one window size; this model has several")
    kinds = ["local" if w else "global" for w in c.layer_windows]
    return {
        "architectures": ["GPTNeoForCausalLM"],
        "model_type": "gpt_neo",
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.n_positions,
        "hidden_size": c.d_model,
        "num_layers": c.n_layer,
        "num_heads": c.n_head,
        "intermediate_size": c.d_ff,
        "attention_types": [[[kind], 1] for kind in kinds],
        "window_size": windows.pop() if windows else c.extra.get("window_size", 256),
        "activation_function": c.activation,
        "layer_norm_epsilon": c.layer_norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "embed_dropout": 0.0,
        "attention_dropout": 0.0,
        "resid_dropout": 0.0,
    }


def _write_gpt_neox(c: Config) -> dict[str, Any]:
    rotary_pct = c.extra.get("rotary_pct", c.rotary_dims / c.head_dim)
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.n_positions,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "intermediate_size": c.d_ff,
        "rotary_pct": rotary_pct,
        "rotary_emb_base": c.rotary_base,
        "use_parallel_residual": c.parallel_residual,
        "attention_bias": c.qkv_bias,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": c.activation,
        "layer_norm_eps": c.layer_norm_eps,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
    }


_READERS = {"gpt_neo": _read_gpt_neo, "gpt_neox": _read_gpt_neox}
_WRITERS = {"gpt_neo": _write_gpt_neo, "gpt_neox": _write_gpt_neox}
