"""Architecture presets as Hugging Face config.json dicts: the published configs, plus small ones.

`neolm train --preset NAME` starts from fresh random weights of that shape.
"""

from __future__ import annotations

from neolm.config import Config
from neolm.errors import NeolmError


def _neo(hidden: int, layers: int, heads: int, **extra) -> dict:
    return {
        "model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 2048, "hidden_size": hidden,
        "num_layers": layers, "num_heads": heads, "attention_types": [[["global", "local"], layers // 2]],
        "window_size": 256, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True, **extra,
    }  # fmt: skip


def _pythia(hidden: int, layers: int, heads: int, vocab: int = 50304, **extra) -> dict:
    return {
        "model_type": "gpt_neox", "vocab_size": vocab, "max_position_embeddings": 2048, "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": 4 * hidden,
        "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": True, "hidden_act": "gelu",
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": False, **extra,
    }  # fmt: skip


PRESETS: dict[str, dict] = {
    "gpt-neo-125M": _neo(768, 12, 12),
    "gpt-neo-1.3B": _neo(2048, 24, 16),
    "gpt-neo-2.7B": _neo(2560, 32, 20),
    "pythia-14m": _pythia(128, 6, 4),
    "pythia-31m": _pythia(256, 6, 8),
    "pythia-70m": _pythia(512, 6, 8),
    "pythia-160m": _pythia(768, 12, 12),
    "pythia-410m": _pythia(1024, 24, 16),
    "pythia-1b": _pythia(2048, 16, 8),
    "pythia-1.4b": _pythia(2048, 24, 16),
    "pythia-2.8b": _pythia(2560, 32, 32),
    "pythia-6.9b": _pythia(4096, 32, 32, vocab=50432),
    "pythia-12b": _pythia(5120, 36, 40, vocab=50688),
    "gpt-neox-20b": _pythia(6144, 44, 64, vocab=50432),
    # small shapes for laptops, tests and neolm's default model
    "neo-tiny": _neo(64, 2, 4, max_position_embeddings=256, window_size=32),
    "neo-shakespeare": _neo(192, 8, 6, max_position_embeddings=512),
    "neox-tiny": _pythia(64, 2, 4, max_position_embeddings=256),
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise NeolmError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return Config.from_hf(PRESETS[name], source=f"preset {name}")
