"""Logits parity with transformers (eager attention, fp32), loading through neolm's own reader."""

from __future__ import annotations

import pytest
import torch

import neolm
from conftest import REAL, TINY, hf_model, save_hf

TOL = 1e-4


def max_diff(hf, lm, ids) -> float:
    with torch.no_grad():
        ref = hf(ids).logits
        ours = lm.model(ids)
    assert ours.shape == ref.shape
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_logits_match(tiny_checkpoints, name):
    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder, dtype="float32", device="cpu")
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    assert max_diff(hf, lm, ids) <= TOL  # 40 tokens > window 8 for GPT-Neo


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("name", list(REAL))
def test_real_shape_logits_match(tmp_path, name, fmt):
    hf = hf_model(REAL[name])
    lm = neolm.load(save_hf(hf, tmp_path, fmt), dtype="float32", device="cpu")
    ids = torch.randint(0, 50257, (1, 300), generator=torch.Generator().manual_seed(2))  # crosses window 256
    assert lm.config.n_params() == sum(p.numel() for p in hf.parameters())
    assert max_diff(hf, lm, ids) <= TOL


@pytest.mark.parametrize("name", list(TINY))
def test_cached_and_uncached_logits_agree(tiny_checkpoints, name):
    _, folder = tiny_checkpoints[name]
    model = neolm.load(folder, dtype="float32").model
    ids = torch.randint(0, 1000, (2, 30), generator=torch.Generator().manual_seed(3))
    cache = neolm.model.KVCache(model.config, 2, 30, torch.float32)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :10], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(10, 30)]
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    assert diff <= TOL


def test_bf16_close_to_fp32(tiny_checkpoints):
    _, folder = tiny_checkpoints["neox-parallel-pct25"]
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = neolm.load(folder, dtype="float32").model(ids)
        half = neolm.load(folder, dtype="bfloat16").model(ids).float()
    assert half.dtype == torch.float32
    assert torch.allclose(half, full, atol=0.15 * full.abs().max().item())


def test_in_place_activations_equal_the_activations():
    """MLP runs its activation in place at inference (no fresh (B, T, d_ff) tensor): the same numbers, and
    the functions pickle (a whole model does, as torch.save(model) needs)."""
    import pickle

    from neolm.model import _ACTIVATIONS

    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(6))
    for name, (act, in_place) in _ACTIVATIONS.items():
        y = x.clone()
        assert in_place(y) is y and torch.equal(y, act(x)), name
        assert pickle.loads(pickle.dumps((act, in_place)))[0](x).equal(act(x)), name
