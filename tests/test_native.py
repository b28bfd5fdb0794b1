"""neolm.native: the AVX-512 one-row (gemv.cpp) and few-row (gemm.cpp) kernels equal torch's matmul on the
same (dequantized) weights."""

from __future__ import annotations

import platform

import pytest
import torch

from neolm import native
from neolm.quant.kernels import pack_int4
from neolm.quant.linear import quantize_int4, quantize_int8

HAVE, WHY = native.available()
needs = {name: pytest.mark.skipif(name not in HAVE, reason=f"no native {name} kernel here: {WHY or 'no AVX512-BF16'}")
         for name in native.FEATURES}  # fmt: skip
SHAPES = [(1, 16), (37, 100), (130, 64), (333, 768)]  # rows not a multiple of 4, widths with and without tails
ROWS_OF_X = [1, 3, 8, 13]  # one row (gemv), a tile of 4 or 8 and less, more than a tile (gemm)


def _data(n, k, seed=0, m=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(n, generator=g)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float):
    assert got.shape == want.shape
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err < tol, err


@needs["f32"]
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("m", ROWS_OF_X)
def test_f32(n, k, with_bias, m):
    w, x, b = _data(n, k, m=m)
    b = b if with_bias else None
    _close(native.float_gemv(x, w, b), torch.nn.functional.linear(x, w, b), 1e-5)


@needs["bf16"]
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS_OF_X)
def test_bf16(n, k, m):
    w, x, b = (t.bfloat16() for t in _data(n, k, m=m))
    y = native.float_gemv(x, w, b)
    assert y.dtype == torch.bfloat16
    _close(y, x.float() @ w.float().t() + b.float(), 1e-2)  # one bf16 rounding of the fp32 sum


@needs["int8"]
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", ROWS_OF_X)
def test_int8(n, k, dtype, m):
    w, x, b = _data(n, k, m=m)
    q, scale = quantize_int8(w)
    x, b = x.to(dtype), b.to(dtype)
    y = native.int8_gemv(x, q, scale, b)
    assert y.dtype == dtype
    want = x.bfloat16().float() @ (q.float() * scale.float()[:, None]).t() + b.float()  # bf16 activations
    _close(y, want, 1e-5 if dtype == torch.float32 else 1e-2)
    if m > 1:  # a row gets the numbers it gets in any other batch; alone (a kernel of its own), the same up to
        # the rounding of fp32 sums
        assert torch.equal(y[m - 2 :], native.int8_gemv(x[m - 2 :], q, scale, b))
        _close(native.int8_gemv(x[m - 1 :], q, scale, b), y[m - 1 :], 1e-5 if dtype == torch.float32 else 1e-2)


@needs["int8f"]
@pytest.mark.parametrize("n,k", SHAPES + [(96, 5), (50, 777), (200, 48)])  # panels of 48, the last 16/32/48 wide
@pytest.mark.parametrize("m", [1, 3, 8, 9, 20])  # tiles of up to 8 rows of X
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8f(n, k, m, dtype):
    """int8 codes in fp32 arithmetic (int8f.cpp): x as it is, exact products, fp32 sums; every row gets the same
    numbers alone as in any batch; the layout gives back the codes."""
    w, x, b = _data(n, k, m=m)
    q, scale = quantize_int8(w)
    x, b = (x * torch.linspace(0.1, 100, m)[:, None]).to(dtype), b.to(dtype)
    packed = native.int8f_pack(q)
    assert torch.equal(native.int8f_rows(packed, n, k), q)
    some = torch.tensor([0, n - 1, n // 2, n // 3]).unique()  # the first and last panels' rows among them
    assert torch.equal(native.int8f_rows(packed, n, k, some), q[some])
    y = native.int8f_matmul(x, packed, scale, b, n, k)
    assert y.dtype == dtype
    want = x.double() @ (q.double() * scale.double()[:, None]).t() + b.double()
    _close(y, want, 1e-6 if dtype == torch.float32 else 1e-2)
    for i in {0, m - 1}:
        assert torch.equal(native.int8f_matmul(x[i : i + 1], packed, scale, b, n, k), y[i : i + 1])


@needs["int8f"]
def test_int8f_takes_every_code():
    gen = torch.Generator().manual_seed(0)
    q = (torch.arange(256)[:, None] + torch.arange(100)).remainder(256).sub(128).to(torch.int8)  # -128..127
    x = torch.randn(5, 100, generator=gen) * 1e3
    scale = torch.rand(256, generator=gen).bfloat16()
    y = native.int8f_matmul(x, native.int8f_pack(q), scale, None, 256, 100)
    want = (x.double() @ q.double().t()) * scale.double()
    assert (y.double() - want).abs().max() <= 1e-6 * want.abs().max()


def _int4h(codes, scale, zero, g):
    return native.Int4Panels(pack_int4(codes), scale, zero, g)


@needs["int4h"]
@pytest.mark.parametrize("n,k,g", [(64, 64, 64), (100, 256, 32), (200, 512, 128), (130, 768, 256), (1, 64, 32)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 20])  # tiles of up to 8 rows of X
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4h(n, k, g, m, dtype):
    """int4 codes in fp16 arithmetic (int4h.cpp): rows of x scaled by a power of two and rounded to fp16, fp16
    sums over blocks of up to 64 in-features, fp32 beyond: each output within a few fp16 roundings (2^-11) of
    the sum of its products' magnitudes, for rows of any magnitude (int4.cpp's rounding of x to bf16 allows
    2^-9); every row gets the same numbers alone as in any batch; the panels give back the codes in their saved
    packing. n: panels of 64 and a part of one."""
    w, x, b = _data(n, k, m=m)
    codes, scale, zero = quantize_int4(w, g)
    x, b = (x * torch.logspace(-6, 4, m)[:, None]).to(dtype), b.to(dtype)  # 1e-6 .. 1e4
    panels = _int4h(codes, scale, zero, g)
    assert torch.equal(panels.canonical(), pack_int4(codes)) and torch.equal(panels.codes(), codes)
    y = panels(x, b)
    assert y.dtype == dtype
    wd = ((codes.double().view(n, k // g, g) - 8) * scale.double()[..., None] + zero.double()[..., None]).view(n, k)
    want, size = x.double() @ wd.t() + b.double(), x.double().abs() @ wd.abs().t() + b.double().abs()
    err = ((y.double() - want).abs() / size).max().item()
    assert err < (3e-3 if dtype == torch.float32 else 6e-3), err  # (bf16: the output's rounding too)
    for i in {0, m - 1}:
        assert torch.equal(panels(x[i : i + 1], b), y[i : i + 1])


@needs["int4h"]
def test_int4h_takes_every_code_exactly():
    """Every code in every nibble position of a panel's words, against x whose fp16 products and sums are exact
    (halves, sums of at most 64 of them): the kernel's sum is then the float64 one, up to fp32's rounding of the
    group's scale and zero terms."""
    n, k, g = 96, 256, 64
    codes = (torch.arange(n)[:, None] + torch.arange(k) * 7).remainder(16).to(torch.uint8)  # 0..15 everywhere
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(n, k // g, generator=gen).add(0.5).bfloat16()
    zero = torch.randn(n, k // g, generator=gen).bfloat16()
    x = torch.randint(-1, 2, (5, k), generator=gen).float()  # -1, 0, 1: x' = x / 2 exactly
    x[0] = 0  # a zero row
    y = _int4h(codes, scale, zero, g)(x, None)
    wd = ((codes.double().view(n, k // g, g) - 8) * scale.double()[..., None] + zero.double()[..., None]).view(n, k)
    want = x.double() @ wd.t()
    assert torch.equal(y[0], torch.zeros(n))
    assert (y.double() - want).abs().max() <= 1e-6 * want.abs().max()


@needs["int4h"]
def test_int4h_passes_inf_and_nan_on():
    codes, scale, zero = quantize_int4(torch.randn(64, 64), 32)
    x = torch.randn(3, 64)
    x[1, 5], x[2, 7] = float("inf"), float("nan")
    y = _int4h(codes, scale, zero, 32)(x, None)
    assert y[0].isfinite().all() and not y[1].isfinite().any() and y[2].isnan().all()


def test_int4h_supported_shapes():
    assert native.int4h_supported(768, 32) and native.int4h_supported(768, 64) and native.int4h_supported(2048, 256)
    assert not native.int4h_supported(96, 16) and not native.int4h_supported(960, 96)  # blocks of 64 or one group
    assert not native.int4h_supported(96, 64)


def _int8a8_reference(x, q, scale, b, bits=8):
    """int8a8.cpp's product in float64: each row of x to int8 (bits 8) with scale max |x| / 127, or to 16 bits
    with max |x| / 32639 (round half to even, after a multiplication in fp32 as the kernel's)."""
    top = 127 if bits == 8 else 32639
    amax = x.float().abs().amax(1, keepdim=True)
    inv = torch.full_like(amax, top) / amax  # (top / amax is top * (1 / amax) in torch, rounded twice)
    xq = torch.round(x.float() * torch.where(amax > 0, inv, torch.zeros_like(amax)))
    assert xq.abs().max() <= top
    y = (xq.double() @ q.double().t()) * (amax.double() / top) * scale.double()
    return y + (b.double() if b is not None else 0)


@needs["int8a16"]
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("n,k", SHAPES + [(9, 777)])
@pytest.mark.parametrize("m", [1, 3, 6, 7, 8, 12, 13, 40])  # tiles of up to 12 rows of q x 32 out-features
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8a8(n, k, m, dtype, bits):
    """int8 codes against x quantized to 8 bits or 16 (two rows of bytes, tiles of 6 rows of x): integer sums are
    exact, so the kernel equals the float64 reference up to the fp32 rounding of the scaling, and every row
    gets the same numbers alone as in any batch (any path)."""
    w, x, b = _data(n, k, m=m)
    q, scale = quantize_int8(w)
    x, b = (x * torch.linspace(0.1, 10, m)[:, None]).to(dtype), b.to(dtype)
    x[0, : k // 2] = 0  # a row with zeros, and (m > 1) a row of zeros only
    if m > 1:
        x[1] = 0
    packed = native.int8a8_pack(q)
    assert torch.equal(native.int8a8_unpack(packed, n, k), q)
    some = torch.tensor([0, n - 1, n // 2, n // 3]).unique()
    assert torch.equal(native.int8a8_unpack(packed, n, k, some), q[some])
    y = native.int8a8_matmul(x, packed, scale, b, n, k, bits)
    assert y.dtype == dtype
    want = _int8a8_reference(x, q, scale, b, bits)
    _close(y, want, 1e-6 if dtype == torch.float32 else 1e-2)
    for i in {0, m - 1}:
        assert torch.equal(native.int8a8_matmul(x[i : i + 1], packed, scale, b, n, k, bits), y[i : i + 1])
    if bits == 16 and dtype == torch.float32:  # near the fp32 product: each number of x within max |x| / 65278
        w8 = q.double() * scale.double()[:, None]
        exact, bound = x.double() @ w8.t() + b.double(), x.double().abs().amax(1, keepdim=True) / 65278 @ w8.abs().sum(1)[None]
        assert ((y - exact).abs() <= bound * 1.001 + 1e-6 * exact.abs().max()).all()


@needs["int8a16"]
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("k", [1, 63, 64, 100])
def test_int8a8_takes_every_code(k, bits):
    """Every code against every byte of x's quantized rows (16 bits: both bytes' extremes, +-32639 included)."""
    gen = torch.Generator().manual_seed(k)
    q = (torch.arange(255)[:, None] + torch.arange(k)).remainder(255).sub(127).to(torch.int8)  # -127..127
    x = torch.randn(20, k, generator=gen) * 1e3
    x[1] = torch.linspace(-1, 1, k) if k > 1 else 1.0  # (16 bits: -32639 .. 32639 in steps, high and low bytes
    x[2] = -x[1]  # through their ranges)
    scale = torch.rand(255, generator=gen).bfloat16()
    y = native.int8a8_matmul(x, native.int8a8_pack(q), scale, None, 255, k, bits)
    want = _int8a8_reference(x, q, scale, None, bits)
    assert (y.double() - want).abs().max() <= 1e-6 * want.abs().max()


@needs["int8"]
@pytest.mark.parametrize("k", [1, 16, 63, 64, 100, 200])
def test_int8_one_row_takes_every_code(k):
    """The one-row kernel splits each code into two bf16 numbers by its bits: every byte value (-128 included),
    in-feature counts with and without a tail of the 64 a step takes, and large activations."""
    gen = torch.Generator().manual_seed(k)
    q = (torch.arange(256)[:, None] + torch.arange(k)).remainder(256).sub(128).to(torch.int8)  # every value in a column
    x = torch.randn(1, k, generator=gen) * torch.tensor([1.0, 300.0]).repeat(k)[:k]
    scale = torch.rand(256, generator=gen).bfloat16()
    y = native.int8_gemv(x, q, scale, None)
    want = (x.bfloat16().double() @ q.double().t()) * scale.double()
    assert (y.double() - want).abs().max() <= 1e-6 * want.abs().max()


def test_int4_layout():
    n, k = 20, 32  # 20 rows: one block of 16, one of 4 rows and 12 zero rows, two zero blocks (a band of 4)
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0))
    packed = native.pack_int4_gemv(codes)
    assert packed.shape == (64, k // 2) and packed.dtype == torch.uint8
    chunks = packed.view(k // 8, 4, 64)  # (chunk, block of the band, byte)
    c = codes.to(torch.uint8)
    # byte 16 L + i of chunk j: row 4 L + (i % 8) / 2, in-feature 8 j + 2 (i / 8) + i % 2 low, + 4 high
    for block, j, lane, i in [(0, 0, 0, 0), (0, 1, 2, 5), (0, 3, 3, 15), (1, 2, 0, 9), (1, 2, 0, 3)]:
        row, f = 16 * block + 4 * lane + (i % 8) // 2, 8 * j + 2 * (i // 8) + i % 2
        byte = chunks[j, block, 16 * lane + i].item()
        assert (byte & 15, byte >> 4) == (c[row, f].item(), c[row, f + 4].item())
    assert torch.equal(chunks[:, 1].reshape(k // 8, 4, 16)[:, 1:], torch.zeros(k // 8, 3, 16, dtype=torch.uint8))
    assert not chunks[:, 2:].any()  # the padding blocks of the band
    assert torch.equal(native.unpack_int4_gemv(packed, n), c)
    # two bands: block 5 (rows 80-95) is the second block of the second band
    codes = torch.randint(0, 16, (96, k), generator=torch.Generator().manual_seed(1))
    chunks = native.pack_int4_gemv(codes).view(2, k // 8, 4, 64)
    byte = chunks[1, 2, 1, 16 * 3 + 4].item()  # chunk 2, lane 3, i = 4: row 80 + 12 + 2, in-feature 16 + 0
    assert (byte & 15, byte >> 4) == (codes[94, 16].item(), codes[94, 20].item())


@needs["int4"]
@pytest.mark.parametrize(
    "n,k,group", [(1, 128, 64), (37, 256, 64), (130, 256, 128), (333, 768, 256), (5, 1024, 128), (70, 96, 32)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", ROWS_OF_X)
def test_int4(n, k, group, dtype, m):
    w, x, b = _data(n, k, m=m)
    codes, scale, zero = quantize_int4(w, group)
    w_dq = ((codes.view(n, k // group, group).float() - 8) * scale.float()[..., None] + zero.float()[..., None]).view(n, k)
    x, b = x.to(dtype), b.to(dtype)
    y = native.Int4Gemv.from_codes(codes, scale, zero, group)(x, b)
    assert y.dtype == dtype
    want = x.bfloat16().float() @ w_dq.t() + b.float()  # activations in bf16, as torch's int4 kernel has them
    _close(y, want, 1e-5 if dtype == torch.float32 else 1e-2)
    if m > 1:  # each row gets the numbers it gets alone
        assert torch.equal(y[m - 1 :], native.Int4Gemv.from_codes(codes, scale, zero, group)(x[m - 1 :], b))


@needs["int4a8"]
@pytest.mark.parametrize("n,k,group", [(1, 128, 64), (37, 256, 64), (130, 256, 128), (70, 96, 32), (65, 512, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 4, 6, 8, 9])  # 4-row tiles x 64 out-features; 5-8 rows: one tile
def test_int4a8(n, k, group, dtype, m):
    """int4 x int8: each group's integer sum is exact, so the kernel equals the float64 reference on the same
    int8 rows up to fp32 roundings, and every row gets the same numbers alone as in any batch."""
    w, x, b = _data(n, k, m=m)
    codes, scale, zero = quantize_int4(w, group)
    w_dq = ((codes.view(n, k // group, group).double() - 8) * scale.double()[..., None] + zero.double()[..., None])
    x, b = (x * torch.linspace(0.1, 10, m)[:, None]).to(dtype), b.to(dtype)
    if m > 1:
        x[1] = 0  # a row of zeros only
    gemv = native.Int4Gemv.from_codes(codes, scale, zero, group)
    y = gemv.a8(x, b)
    assert y.dtype == dtype
    amax = x.float().abs().amax(1, keepdim=True)
    xq = torch.round(x.float() * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
    want = (xq.double() @ w_dq.view(n, k).t()) * (amax.double() / 127) + b.double()
    _close(y, want, 1e-5 if dtype == torch.float32 else 1e-2)
    for i in {0, m - 1}:
        assert torch.equal(gemv.a8(x[i : i + 1], b), y[i : i + 1])
    _close(gemv.a8(x, None), want - b.double(), 1e-5 if dtype == torch.float32 else 1e-2)


@needs["int4"]
@pytest.mark.parametrize("n,k,group", [(6, 128, 64), (37, 256, 128), (333, 768, 256), (40, 96, 32)])
def test_int4_to_bf16(n, k, group):
    """The native copy of int4 codes back to weights: (q - 8) s + z rounded to bf16, any block of rows."""
    w, _, _ = _data(n, k)
    codes, scale, zero = quantize_int4(w, group)
    w_dq = ((codes.view(n, k // group, group).float() - 8) * scale.float()[..., None] + zero.float()[..., None]).view(n, k)
    gemv = native.Int4Gemv.from_codes(codes, scale, zero, group)
    full = gemv.to_bf16(0, n)
    assert full.dtype == torch.bfloat16 and full.shape == (n, k)
    assert torch.allclose(full.float(), w_dq, rtol=2 ** -8, atol=1e-6)  # within bf16 rounding
    assert torch.equal(gemv.to_bf16(0, n - 1), full[: n - 1])  # ending inside a block of rows
    if n > 16:
        assert torch.equal(gemv.to_bf16(16, n), full[16:])  # from a later block of rows
    with pytest.raises(AssertionError):
        gemv.to_bf16(2, n)  # not at a block of rows
    assert torch.equal(gemv.codes(), codes)  # the layout inverts (rows padded to blocks of 16 dropped)
    from_saved = native.Int4Gemv(pack_int4(codes), scale, zero, group)
    assert torch.equal(from_saved.q, gemv.q) and torch.equal(from_saved.sz, gemv.sz)
    # the scales and zeros as stored (bf16), a band of 64 rows side by side per group: scales, then zeros
    bands = -(-n // 64)
    assert gemv.sz.dtype == torch.bfloat16 and gemv.sz.shape == (bands, k // group, 2, 64)
    row, t = n - 1, k // group - 1
    assert gemv.sz[row // 64, t, 0, row % 64] == scale[row, t] and gemv.sz[row // 64, t, 1, row % 64] == zero[row, t]
    assert torch.equal(gemv.q, native.pack_int4_gemv(codes))  # the native repacking lays out as the reference


@needs["int4"]
@pytest.mark.parametrize("n", [256, 250])
def test_int4_layer_keeps_one_copy_on_native_kernels(n, monkeypatch):
    """Where the native kernels fit, an int4 layer's codes live only in their layout (no aten packed copy), and
    every number of rows gets the products aten's kernel gives elsewhere."""
    from neolm.quant.linear import Int4Linear

    linear = torch.nn.Linear(256, n)
    layer, aten = (Int4Linear.from_linear(linear, group_size=64) for _ in range(2))
    with monkeypatch.context() as m:
        m.setattr(native, "available", lambda: (set(), "switched off"))
        aten.prepare()
    assert aten.layout != "native" and aten._native is None
    layer.prepare()
    assert layer.layout == "native" and layer.qweight is layer._native.q and layer._kweight is None
    assert torch.equal(layer.codes(), aten.codes()) and torch.equal(layer.dequantize(), aten.dequantize())
    assert all(torch.equal(a, b) for a, b in zip(layer.export().values(), aten.export().values()))
    with torch.inference_mode():
        for m in (1, 5, native.FEW_ROWS + 3, layer.prefill_rows + 1):  # native kernels, bf16 weights and GEMM
            x = torch.randn(m, 256)
            _close(layer(x), aten(x), 2e-2)
    codes = layer.codes()
    layer.prepare()  # again (as after a move): from its own layout
    assert layer.layout == "native" and torch.equal(layer.codes(), codes)


@needs["int4"]
@pytest.mark.parametrize("gemm", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layer_prefill_through_dequantized_blocks(dtype, bits, gemm, monkeypatch):
    """Many-row int8/int4 products go through dequantized weights and the GEMM, a block of rows at a time, in
    the GEMM dtype `ops.gemm_dtype` picks (both tried here; int8: the codes, exact in either, with the row
    scales applied to the fp32 result; int4: the weights from the native kernels' copy of the codes, rounded to
    bf16): the dequantized product on activations in the GEMM's dtype."""
    from neolm.quant import linear as quant_linear
    from neolm.quant.linear import Int4Linear, Int8Linear

    monkeypatch.setattr(quant_linear, "gemm_dtype", lambda: gemm)
    linear = torch.nn.Linear(1024, 8200).to(dtype)  # in-features x 8200 rows: two blocks of rows of 8192
    layer = Int8Linear.from_linear(linear) if bits == 8 else Int4Linear.from_linear(linear, group_size=128)
    layer.prepare()
    # int8a8.cpp's 16-bit, int8f.cpp's fp32 and int4h.cpp's fp16 arithmetic (this CPU's bf16 is slow) take prompts
    panels = layer.layout != "rows" if bits == 8 else layer.in_fp16()
    assert layer.prefills() != panels
    x = torch.randn(2, layer.prefill_rows // 2 + 3, 1024).to(dtype)
    with torch.inference_mode():
        got = layer(x)
        want = x.to(gemm).float() @ layer.dequantize(torch.float32).t() + layer.bias.float()
    assert got.dtype == dtype and got.shape == (2, layer.prefill_rows // 2 + 3, 8200)
    if bits == 8 and dtype == gemm == torch.float32:  # fp32 codes, activations and sums: rounding order only
        tol = 1e-4 if layer.layout == "a8" else 1e-5  # (or x in 16 bits a row)
    else:
        tol = 4e-3 if bits == 8 and dtype == torch.float32 else 8e-3 if bits == 8 else 2e-2
    _close(got, want, tol)
    with torch.inference_mode():
        _close(layer(x[:, :2]), want[:, :2], max(tol, 8e-3))  # fewer rows: the native kernels, the same product


@needs["int4"]
@pytest.mark.parametrize("gemm,blocks", [(torch.bfloat16, False), (torch.float32, True)])
def test_int4_prompts_go_to_the_gemm_sooner_where_it_runs_in_fp32(gemm, blocks, monkeypatch):
    """70 rows: below int4's bf16 crossover (160), above its fp32 one (64); int4.cpp's layout (a CPU without
    int4h.cpp's fp16, which takes prompts itself)."""
    from neolm.quant import linear as quant_linear

    monkeypatch.setattr(quant_linear, "gemm_dtype", lambda: gemm)
    monkeypatch.setattr(quant_linear.Int4Linear, "in_fp16", lambda self: False)
    layer = quant_linear.Int4Linear.from_linear(torch.nn.Linear(256, 128), group_size=64)
    layer.prepare()
    calls = []
    block_matmul = layer._block_matmul
    monkeypatch.setattr(layer, "_block_matmul", lambda x: calls.append(x.shape[0]) or block_matmul(x))
    x = torch.randn(70, 256)
    with torch.inference_mode():
        _close(layer(x), x.bfloat16().float() @ layer.dequantize(torch.float32).t() + layer.bias, 2e-2)
    assert calls == ([70] if blocks else [])


@needs["f32"]
@pytest.mark.parametrize("n", [1, 15, 16, 17, 50257])
def test_argmax_is_torchs(n):
    """First of equal maxima, first NaN, rows of -inf, tails past whole vectors: as torch.argmax."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(9, n, generator=g)
    x[1] = -float("inf")
    x[2] = 3.0  # all equal: index 0
    x[3, n // 2 :] = 7.0  # equal maxima from the middle: the first of them
    x[4, n - 1] = float("nan")
    x[5, n // 3] = float("nan")
    x[5, n - 1] = 99.0
    x[6, n - 1] = float("inf")
    x[7] = x[7].round()  # many ties in different lanes
    x[8, 0] = float("nan")
    assert torch.equal(native.argmax(x), x.argmax(dim=-1))
    assert torch.equal(native.argmax(x[:1]), x[:1].argmax(dim=-1))


@needs["int8"]
@pytest.mark.parametrize("shape", [(1, 5), (37, 33), (64, 256)])
def test_int8_to_bf16(shape):
    q = torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(native.int8_to_bf16(q), q.to(torch.bfloat16))  # exact: at most 8 significant bits


@needs["int4"]
def test_native_false_keeps_quantized_layers_on_aten(tmp_path):
    """neolm.load(native=False): quantized layers keep aten's kernels and layouts, for every number of rows."""
    import neolm
    from conftest import TINY, hf_model, save_hf
    from neolm.quant.linear import Int4Linear, Int8Linear

    folder = save_hf(hf_model(dict(TINY["neox-sequential-pct100"], hidden_size=128, num_attention_heads=4,
                                   intermediate_size=256)), tmp_path)  # fmt: skip
    for quantize, kind in (("int8", Int8Linear), ("int4", Int4Linear)):
        lm = neolm.load(folder, quantize=quantize, group_size=64, native=False)
        layers = [m for m in lm.model.modules() if isinstance(m, kind)]
        assert layers and not any(m.native or m.prefills() or m.native_weights() is not None for m in layers)
        assert all("native" not in m.gemv_kernels() for m in layers)  # nor offered to compile=True
        assert all(getattr(m, "layout", "cpu") != "native" for m in layers) and lm.model.decode_step is None
        on = neolm.load(folder, quantize=quantize, group_size=64)
        # (int8 in int8a8.cpp's or int8f.cpp's layout and int4 in int4h.cpp's, where this CPU's bf16 is slow, take
        # prompts)
        layers = [m for m in on.model.modules() if isinstance(m, kind)]
        assert all(m.native and m.prefills() != (m.layout != "rows" if kind is Int8Linear else m.in_fp16()) for m in layers)
        ids = torch.randint(0, 1000, (1, 40))
        with torch.inference_mode():  # 40 rows: aten's kernel vs the bf16 blocks, the same product
            _close(lm.model(ids), on.model(ids), 3e-2)


def test_int4_supported_shapes():
    assert native.int4_supported(768, 64) and native.int4_supported(2048, 128) and native.int4_supported(768, 256)
    assert native.int4_supported(768, 32) and native.int4_supported(96, 32)  # any group of 8s dividing K
    assert not native.int4_supported(100, 20) and not native.int4_supported(96, 64)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the kernels are for x86-64")
def test_available_says_why_not(monkeypatch):
    native._library.cache_clear()
    monkeypatch.setenv("CXX", "no-such-compiler-anywhere")
    try:
        have, why = native.available()
        assert have == set() and "no-such-compiler-anywhere" in why
    finally:
        native._library.cache_clear()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the kernels are for x86-64")
def test_an_unusable_cache_folder_means_no_kernels_not_a_crash(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    native._library.cache_clear()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    try:
        have, why = native.available()
        assert have == set() and "cannot build or load" in why
    finally:
        native._library.cache_clear()


def test_every_source_is_packaged():
    """Wheels carry every file the kernels are compiled from (a missing header broke non-editable installs)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["neolm"]
    for path in native.SOURCES + native.HEADERS:
        assert any(fnmatch.fnmatch(f"native/{path.name}", p) for p in patterns), path.name


@needs["int8a16"]
def test_native_matmuls_refuse_other_input_dtypes():
    """The kernels write fp32 or bf16: an fp16 input is refused, not given an fp32 result in its buffer."""
    q = torch.randint(-127, 128, (40, 64), dtype=torch.int8)
    scale = torch.rand(40).bfloat16()
    with pytest.raises(TypeError, match="float16"):
        native.int8a8_matmul(torch.randn(2, 64).half(), native.int8a8_pack(q), scale, None, 40, 64, 16)
