"""KV caches in int8 (kv_cache_dtype="int8"): codes and a scale per key and value row, in the torch path and the
native decode step."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY, hf_model, save_hf
from conftest import rel_error as _rel

import neolm
from neolm import native
from neolm.eval.scoring import loglikelihoods
from neolm.model import KVCache, quantize_kv

needs_native = pytest.mark.skipif(not native.available()[0], reason=f"no native kernels: {native.available()[1]}")
INT4_WIDE = {**TINY["neox-parallel-pct25"], "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    specs = {**TINY, "neox-128": INT4_WIDE}
    return {name: save_hf(hf_model(spec, seed=i, std=0.2), tmp_path_factory.mktemp(name))
            for i, (name, spec) in enumerate(specs.items())}  # fmt: skip


def test_quantize_kv_rows():
    x = torch.randn(2, 3, 5, 64) * torch.logspace(-3, 3, 5)[:, None]  # rows of very different sizes
    x[0, 0, 0] = 0.0  # a row of zeros
    x[1, 2, 4, 7] = -1e4  # one large number in a row
    codes, scale = quantize_kv(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    assert codes.abs().amax(-1)[scale > 0].eq(127).all()  # each row's largest number is +-127
    assert codes[0, 0, 0].eq(0).all() and scale[0, 0, 0] == 0
    assert ((codes * scale[..., None] - x).abs() <= scale[..., None] / 2 * (1 + 1e-6)).all()  # nearest code
    assert torch.equal(quantize_kv(x.bfloat16())[0], quantize_kv(x.bfloat16().float())[0])


def test_an_int8_cache_in_the_torch_path(folders):
    """Prefill and decode steps through an int8 cache stay near the exact cache's logits; the cache holds codes and
    scales that give back the keys and values."""
    lm = neolm.load(folders["neox-parallel-pct25"], kv_cache_dtype="int8", native=False)
    exact = neolm.load(folders["neox-parallel-pct25"], native=False).model
    model = lm.model
    assert model.cache_dtype == torch.int8
    ids = torch.randint(0, 50000, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache, plain = KVCache(model.config, 2, 20, torch.int8), KVCache(model.config, 2, 20, torch.float32)
        assert cache.k.dtype == torch.int8 and cache.k_scale.shape == cache.k.shape[:-1]
        steps = [model(ids[:, :12], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
        truth = [exact(ids[:, :12], cache=plain)] + [exact(ids[:, t : t + 1], cache=plain) for t in range(12, 20)]
    error = max(_rel(a, b) for a, b in zip(steps, truth))
    assert 0 < error < 0.05, error
    # the first layer's keys and values come from the tokens alone, so both runs have the same: within half a code
    for codes, scale, truth in ((cache.k[0], cache.k_scale[0], plain.k[0]), (cache.v[0], cache.v_scale[0], plain.v[0])):
        assert ((codes * scale[..., None] - truth).abs() <= scale[..., None] * (0.5 + 1e-5)).all()


def test_rows_and_reorder_carry_the_scales(folders):
    lm = neolm.load(folders["neo"], kv_cache_dtype="int8", native=False)
    cache = KVCache(lm.model.config, 3, 10, torch.int8)
    with torch.inference_mode():
        lm.model(torch.randint(0, 50000, (3, 6)), cache=cache)
    index = torch.tensor([2, 0])
    picked = cache.rows(index, extra=4)
    assert picked.length == 6 and picked.max_len == 10
    for name in ("k", "v", "k_scale", "v_scale"):
        mine, theirs = getattr(picked, name), getattr(cache, name)
        assert torch.equal(mine[:, :, :, :6], theirs[:, index, :, :6]) and not mine[:, :, :, 6:].any()
    index = torch.tensor([2, 0, 0])  # beam search: each row takes the filled slots of the row it continues
    before = [getattr(cache, name).clone() for name in ("k", "v", "k_scale", "v_scale")]
    cache.reorder(index)
    for name, old in zip(("k", "v", "k_scale", "v_scale"), before):
        assert torch.equal(getattr(cache, name)[:, :, :, :6], old[:, index, :, :6])
        assert torch.equal(getattr(cache, name)[:, :, :, 6:], old[:, :, :, 6:])  # slots not filled are left


def test_scoring_with_an_int8_cache(folders):
    """lm-eval scoring shares each context's cache rows among its continuations (KVCache.rows): with an int8
    cache their log-likelihoods stay near the exact ones (a request alone is scored in one forward, no cache)."""
    requests = [([5, 6, 7, 8, 9], [10, 11]), ([5, 6, 7, 8, 9], [12]), ([1, 2], [3, 4, 5])]
    exact = loglikelihoods(neolm.load(folders["neo"]).model, requests)
    int8 = loglikelihoods(neolm.load(folders["neo"], kv_cache_dtype="int8").model, requests)
    for (a, _), (b, _) in zip(int8[:2], exact[:2]):
        assert a != b and abs(a - b) < 0.01 * abs(b)
    assert int8[2] == exact[2]


def _step_by_step(model, ids: torch.Tensor, prefill: int) -> list[tuple[float, float, float]]:
    """Each step once natively and once in torch from the same (torch-filled) cache: per step, the relative
    difference of the logits, the largest difference of the codes written, and of the scales (relative)."""
    step, (B, S) = model.decode_step, ids.shape
    cache, out = KVCache(model.config, B, S + 1, torch.int8), []
    with torch.inference_mode():
        model.decode_step = None
        model(ids[:, :prefill], cache=cache)
        for t in range(prefill, S):
            twin = copy.deepcopy(cache)
            model.decode_step = step
            fast = model(ids[:, t : t + 1], cache=twin)
            model.decode_step = None
            slow = model(ids[:, t : t + 1], cache=cache)
            codes = max(int((a.int() - b.int()).abs().max()) for a, b in ((twin.k, cache.k), (twin.v, cache.v)))
            scales = max(_rel(a, b) for a, b in ((twin.k_scale, cache.k_scale), (twin.v_scale, cache.v_scale)))
            out.append((_rel(fast, slow), codes, scales))
    model.decode_step = step
    return out


@needs_native
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize(("name", "quantize"), [("neo", None), ("neox-sequential-pct100", None), ("neox-128", "int4")])
def test_the_native_step_reads_and_writes_an_int8_cache(folders, name, quantize, rows):
    """The native step's codes and scales are the torch path's (quantize_kv), and so are its logits: past
    GPT-Neo's local window (8 here), with rotary and without."""
    lm = neolm.load(folders[name], quantize=quantize, kv_cache_dtype="int8")
    assert lm.model.decode_step is not None
    ids = torch.randint(0, 50000, (rows, 24), generator=torch.Generator().manual_seed(3))
    steps = _step_by_step(lm.model, ids, prefill=5)
    logits, codes, scales = (sorted(column) for column in zip(*steps))
    mid = len(steps) // 2
    if quantize is None:  # keys computed 1e-7 apart in fp32 (rotary, matmul order) now and then round to the
        # neighbouring code
        assert codes[-1] <= 1 and codes[mid] == 0 and scales[-1] < 1e-5 and logits[mid] < 1e-5 and logits[-1] < 1e-3, (
            steps
        )
    else:  # int4: the torch path rounds the activations to bf16 (2^-8) where the native kernel does not
        assert codes[-1] <= 1 and scales[-1] < 1e-2 and logits[mid] < 2e-2 and logits[-1] < 0.05, steps


@needs_native
def test_an_int8_cache_for_a_bf16_model(folders):
    """In a bf16 model both paths compute attention over an int8 cache in fp32 and round its output to bf16 (at
    different points): the native step must be as close to the fp32 model with an exact cache as the torch path."""
    ids = torch.randint(0, 50000, (3, 24), generator=torch.Generator().manual_seed(5))
    folder = folders["neox-parallel-pct25"]
    lm = neolm.load(folder, dtype="bfloat16", kv_cache_dtype="int8")
    exact = neolm.load(folder).model

    def run(model) -> torch.Tensor:
        cache = KVCache(model.config, 3, 25, model.cache_dtype)
        with torch.inference_mode():
            model(ids[:, :5], cache=cache)
            return torch.cat([model(ids[:, t : t + 1], cache=cache).float() for t in range(5, 24)], 1)

    truth, fast = run(exact), run(lm.model)
    lm.model.decode_step = None
    slow = run(lm.model)
    assert _rel(fast, truth) <= 1.5 * _rel(slow, truth) + 1e-3


@needs_native
def test_greedy_text_with_an_int8_cache(folders):
    """A padded batch generates through the native step as through the torch path, and near the exact cache's
    text."""
    folder = folders["neo"]
    lm = neolm.load(folder, kv_cache_dtype="int8")
    prompts, kw = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]], {"max_new_tokens": 12, "min_new_tokens": 12}
    fast = lm.generate_ids(prompts, **kw)
    step, lm.model.decode_step = lm.model.decode_step, None
    assert fast == lm.generate_ids(prompts, **kw)
    lm.model.decode_step = step
    exact = neolm.load(folder).generate_ids(prompts, **kw)
    same = sum(a == b for x, y in zip(fast, exact) for a, b in zip(x, y))
    assert same >= len(prompts) * 12 // 2, (fast, exact)  # random weights: flat logits, so some tokens may flip


def test_kv_quality_report(folders, tmp_path):
    """bench/kv_quality.py: the exact cache's teacher-forced decoding equals one forward per window, and each
    cache dtype gets a row."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i} and more words" for i in range(200)), encoding="utf-8")
    out = tmp_path / "KV.md"
    script = Path(__file__).resolve().parents[1] / "bench" / "kv_quality.py"
    cmd = [sys.executable, str(script), "--model", str(folders["neo"]), "--texts", str(text), "--windows", "3",
           "--length", "24", "--prompt", "4", "--batch", "2", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    report = out.read_text(encoding="utf-8")
    gap = float(re.search(r"one forward over each window \(no cache\) to ([0-9.e+-]+)\.", report).group(1))
    assert gap < 1e-4
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ") and "%" in line}
    assert set(rows) == {"auto", "bfloat16", "int8"} and "+0.000% | 100.00%" in rows["auto"]
