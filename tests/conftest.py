"""Shared fixtures: random-weight checkpoints of both families, saved by `transformers` at test time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NAME = "neo-shakespeare"  # the bundled model's name, as the `server` fixture serves it


@pytest.fixture(scope="module")
def lm():
    """The bundled model (neolm.load()), loaded once per test module."""
    import neolm

    return neolm.load()


@pytest.fixture(scope="module")
def server(lm):
    """`neolm serve` of the bundled model as NAME (max batch 8), answering from background threads."""
    from neolm.serve.http import Server

    server = Server(lm, port=0, model_name=NAME, max_batch=8)
    server.start()
    yield server
    server.close()


# Tiny configs (HF kwargs). Vocabulary sizes of the real tokenizers so text tests can decode.
TINY = {
    "neo": dict(
        family="gpt_neo", vocab_size=50257, max_position_embeddings=512, hidden_size=48, num_layers=4,
        num_heads=3, attention_types=[[["global", "local"], 2]], window_size=8,
    ),
    "neox-parallel-pct25": dict(
        family="gpt_neox", vocab_size=50304, max_position_embeddings=512, hidden_size=60, num_hidden_layers=3,
        num_attention_heads=5, intermediate_size=96, rotary_pct=0.25, use_parallel_residual=True,
    ),
    "neox-sequential-pct100": dict(
        family="gpt_neox", vocab_size=50304, max_position_embeddings=512, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, rotary_pct=1.0, use_parallel_residual=False,
        hidden_act="gelu_new", rotary_emb_base=500.0,
    ),
}  # fmt: skip

# The real shapes of the smallest published checkpoint of each family.
REAL = {
    "gpt-neo-125M": dict(
        family="gpt_neo", vocab_size=50257, max_position_embeddings=2048, hidden_size=768, num_layers=12,
        num_heads=12, attention_types=[[["global", "local"], 6]], window_size=256,
    ),
    "pythia-160m": dict(
        family="gpt_neox", vocab_size=50304, max_position_embeddings=2048, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072, rotary_pct=0.25, rotary_emb_base=10000,
        use_parallel_residual=True, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
    ),
}  # fmt: skip


def hf_model(spec: dict, seed: int = 0, std: float = 0.02):
    """A randomly initialised transformers model (eager attention, fp32, eval mode)."""
    import transformers

    spec = dict(spec)
    family = spec.pop("family")
    torch.manual_seed(seed)
    if family == "gpt_neo":
        config = transformers.GPTNeoConfig(**spec, initializer_range=std, attn_implementation="eager")
        model = transformers.GPTNeoForCausalLM(config)
    else:
        spec.setdefault("eos_token_id", 0)
        spec.setdefault("bos_token_id", 0)
        config = transformers.GPTNeoXConfig(**spec, initializer_range=std, attn_implementation="eager")
        model = transformers.GPTNeoXForCausalLM(config)
    return model.eval()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in fp32 (whatever the tensors' dtypes)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def save_hf(model, folder: Path, fmt: str = "safetensors") -> Path:
    """Save as transformers does: save_pretrained for safetensors; torch.save of its state dict for .bin."""
    if fmt == "safetensors":
        model.save_pretrained(folder)
    else:  # transformers >= 5 writes only safetensors; .bin is what older versions wrote: the state dict
        model.config.save_pretrained(folder)
        state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """name -> (hf_model, folder) for every TINY config, saved as safetensors."""
    out = {}
    for i, (name, spec) in enumerate(TINY.items()):
        model = hf_model(spec, seed=i, std=0.2)
        out[name] = (model, save_hf(model, tmp_path_factory.mktemp(name)))
    return out

