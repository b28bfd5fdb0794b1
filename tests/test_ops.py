"""neolm.ops: the inference Linear (oneDNN on CPU) and the opt-in compiled one-token GEMV."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, hf_model, save_hf

import neolm
from neolm import native, ops
from neolm.quant.linear import QuantLinear

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler"
)


@pytest.mark.parametrize("rows", [1, 8, 33])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_linear_equals_f_linear(rows, dtype, tol):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((2, rows, 96), (40, 96), (40,)))
    with torch.inference_mode():
        for bias in (b, None):
            got, want = ops.linear(x, w, bias).float(), F.linear(x.float(), w.float(), None if bias is None else bias.float())
            assert got.shape == (2, rows, 40)
            assert ((got - want).abs().max() / want.abs().max()).item() < tol


@pytest.mark.parametrize("slow,want", [(None, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_gemm_dtype_is_the_faster_one_with_a_margin_for_fp32(monkeypatch, slow, want):
    """ops.gemm_dtype times oneDNN's GEMM in both dtypes: fp32 only where it beats bf16 by the margin (a tie
    keeps bf16); here the clock is faked so that each call of `slow` takes 2 units and the others 1."""
    clock = [0.0]
    real_onednn = ops._onednn

    def timed_onednn(x, w, bias):
        clock[0] += 2.0 if x.dtype == slow else 1.0
        return real_onednn(x, w, bias)

    monkeypatch.setattr(ops, "_onednn", timed_onednn)
    monkeypatch.setattr(ops.time, "perf_counter", lambda: clock[0])
    assert ops.gemm_dtype.__wrapped__() == want


@pytest.mark.parametrize("rows", [ops.FP32_ROWS, 70])
def test_bf16_products_of_many_rows_in_fp32(monkeypatch, rows):
    """Where the fp32 GEMM is the faster one, a bf16 product of many rows upcasts its weights a block at a time:
    the bf16 product's numbers but for the order of the fp32 sums (here several blocks, a bias, 3-d input)."""
    monkeypatch.setattr(ops, "gemm_dtype", lambda: torch.float32)
    monkeypatch.setattr(ops, "FP32_BLOCK", 40 * 96)  # 130 rows of W: 4 blocks of 33 (the last 31)
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).bfloat16() for s in ((2, rows, 96), (130, 96), (130,)))
    with torch.inference_mode():
        got = ops.linear(x, w, b)
        want = (x.double() @ w.double().t() + b.double()).bfloat16()
        assert got.dtype == torch.bfloat16 and got.shape == (2, rows, 130)
        assert (got.double() - want.double()).abs().max() <= 2 ** -7 * want.double().abs().max()
        monkeypatch.setattr(ops, "gemm_dtype", lambda: torch.bfloat16)
        plain = ops.linear(x, w, b)  # oneDNN's bf16 GEMM
    assert (got.double() - plain.double()).abs().max() <= 2 ** -7 * plain.double().abs().max()


def test_linear_keeps_autograd():
    layer = ops.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()  # oneDNN's op has no backward: training must go through F.linear
    assert x.grad is not None and layer.weight.grad is not None


WIDE = {  # widths the native int4 kernel takes (multiples of 128)
    "neo-128": {**TINY["neo"], "hidden_size": 128, "num_heads": 4},
    "neox-128": {**TINY["neox-sequential-pct100"], "hidden_size": 128, "intermediate_size": 256},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    configs = {name: TINY[name] for name in ("neo", "neox-parallel-pct25")} | WIDE
    return {name: save_hf(hf_model(config), tmp_path_factory.mktemp(name)) for name, config in configs.items()}


@needs_compiler
@pytest.mark.parametrize(
    "name,quantize",
    [(name, q) for name in ("neo", "neox-parallel-pct25") for q in (None, "int8")] + [(name, "int4") for name in WIDE],
)
def test_compiled_gemv_decodes_the_same(tiny, name, quantize):
    """compile=True: one-token steps go through one-row kernels; logits equal the eager ones, greedy text too.
    (int8: eager runs aten's packed kernel with bf16 activations where the width allows, the GEMV fp32
    activations, hence the looser bound and no token-for-token comparison on near-flat random logits.)"""
    eager = neolm.load(tiny[name], quantize=quantize)
    fast = neolm.load(tiny[name], quantize=quantize, compile=True)
    kept = ops.compile_gemv(fast.model)  # again: the count is of the layers left on a one-row kernel
    assert kept == sum(1 for m in fast.model.modules() if getattr(m, "gemv", None) is not None)
    linears = [m for m in fast.model.modules() if isinstance(m, (ops.Linear, QuantLinear))]
    offers = [m.gemv_kernels() for m in linears]
    assert all(offers) or (quantize == "int4" and not native.available()[0])  # int4: only a native kernel
    for m, offer in zip(linears, offers):  # every layer on a one-row kernel, whatever the timing chose
        m.gemv = next(iter(offer.values()), None)
    ids = torch.randint(0, 50000, (1, 1), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = eager.model(ids), fast.model(ids)
    assert ((a - b).abs().max() / a.abs().max()).item() < (1e-5 if quantize is None else 2e-2)
    prompt = [[11, 22, 33, 44]]
    kw = dict(max_new_tokens=12, min_new_tokens=12)
    out = fast.generate_ids(prompt, **kw)
    assert len(out[0]) == 12
    if quantize is None:
        assert out == eager.generate_ids(prompt, **kw)


@needs_compiler
@pytest.mark.parametrize("compiled_wins", [True, False])
def test_compile_keeps_the_gemv_only_where_it_is_faster(monkeypatch, tiny, compiled_wins):
    def fake_timing(modules, x, passes=3):
        modules[0](x)  # still runs (and compiles) the layers
        if modules[0].gemv is None:  # the layers' own kernel
            return 1.5
        return 1.0 if compiled_wins else 2.0

    monkeypatch.setattr(ops, "_seconds_per_pass", fake_timing)
    lm = neolm.load(tiny["neo"])
    n = ops.compile_gemv(lm.model)
    with_gemv = [m for m in lm.model.modules() if isinstance(m, ops.Linear) and m.gemv is not None]
    assert n == len(with_gemv) == (sum(isinstance(m, ops.Linear) for m in lm.model.modules()) if compiled_wins else 0)


@pytest.mark.skipif(not native.available()[0], reason=f"no native kernels: {native.available()[1]}")
@pytest.mark.parametrize("name,quantize", [("neo", None), ("neo", "int8"), ("neo-128", "int4")])
def test_native_kernels_take_a_few_rows(monkeypatch, tiny, name, quantize):
    """A layer on the native kernel also sends products of up to FEW_ROWS rows (a decode step of a batch) to
    it (gemm.cpp), with the same results as its own kernel; more rows go to its own kernel."""
    monkeypatch.setattr(ops, "_seconds_per_pass", lambda modules, x, passes=3: 2.0 if modules[0].gemv is None else 1.0)
    lm = neolm.load(tiny[name], quantize=quantize, quantize_head=quantize is not None, compile=True)
    linears = [m for m in lm.model.modules() if isinstance(m, (ops.Linear, QuantLinear))]
    assert all(m.gemv_rows == native.FEW_ROWS for m in linears)
    for layer in linears:
        calls = []
        kernel = layer.gemv
        layer.gemv = lambda *args, kernel=kernel: calls.append(args[0].shape[0]) or kernel(*args)
        x = torch.randn(2, native.FEW_ROWS // 2 + 1, layer.in_features)  # 2 x 9 rows: more than FEW_ROWS
        with torch.inference_mode():
            own = layer(x)
            few = torch.cat([layer(x[i]) for i in range(2)])  # 9 rows each
        assert calls == [native.FEW_ROWS // 2 + 1] * 2
        tol = 1e-5 if quantize is None else 2e-2  # aten's int8/int4 kernels take bf16 activations, the native int8 fp32
        assert ((few - own.flatten(0, 1)).abs().max() / own.abs().max()).item() < tol


@pytest.mark.skipif(not native.available()[0], reason=f"no native kernels: {native.available()[1]}")
def test_float_layers_are_native_by_default(tiny):
    """Without compile, the output head and the blocks' float layers take the native kernels for one to
    FEW_ROWS rows (short prompts, assisted generation's checks); native=False leaves them on their own kernel."""
    for native_on in (True, False):
        model = neolm.load(tiny["neo"], native=native_on).model
        layers = [model.lm_head, model.blocks[0].mlp.fc, model.blocks[1].attn.proj]
        assert all(m.gemv is (native.float_gemv if native_on else None) for m in layers)
        assert all(m.gemv_rows == (native.FEW_ROWS if native_on else 1) for m in layers)


def test_compile_errors_are_clear(monkeypatch, tiny):
    def broken(fn, *tensors):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return call

    monkeypatch.setattr(ops, "compiled", broken)
    monkeypatch.setattr(native, "available", lambda: (set(), "no AVX-512 (test)"))  # torch.compile's GEMV, then
    with pytest.raises(neolm.NeolmError, match="C\\+\\+ compiler"):
        neolm.load(tiny["neo"], compile=True)
