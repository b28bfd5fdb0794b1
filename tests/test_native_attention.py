"""neolm.native.attention: prompt attention on the AVX-512 kernels equals F.scaled_dot_product_attention for
every mask the model makes (causal, sliding window, padding, a cache offset), the native rotary embedding equals
the model's bit for bit, and the model uses them only where it should."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import neolm
from conftest import TINY, hf_model, save_hf
from neolm import native
from neolm.model import apply_rotary, rotary_table
from neolm.native.attention import prompt_attention, rotate

HAVE, WHY = native.available()
pytestmark = pytest.mark.skipif("f32" not in HAVE, reason=f"no native kernels here: {WHY}")


def _reference(q, k, v, mask, scale):  # (B, T, H, D) in fp32
    q, k, v = q.float(), k.float(), v.float()
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


def _masks(B, T, S, g):
    """What GPT._masks makes: causal (T == S only), (T, S) causal with a cache offset, a window of 5, and
    (B, 1, T, S) with padding keys (each query still sees its own slot)."""
    i = torch.arange(S - T, S)[:, None]
    j = torch.arange(S)[None]
    masks = {"causal": "causal"} if T == S else {}
    masks["offset"] = j <= i
    masks["window"] = (j <= i) & (j > i - 5)
    valid = torch.rand(B, S, generator=g) > 0.3
    masks["padding"] = ((j <= i) & valid[:, None, None, :]) | (j == i)
    return masks


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("d", [8, 64, 80, 256])  # a vector with a tail; one pass; two, with a tail; four
@pytest.mark.parametrize("B,H,T,S", [(1, 3, 5, 5), (2, 2, 37, 37), (3, 2, 9, 40), (2, 1, 70, 130), (1, 2, 300, 300), (2, 1, 40, 600)])
def test_equals_sdpa(dtype, tol, d, B, H, T, S):
    """(300 and 600 keys: a key table of several pages, many blocks of queries.)"""
    g = torch.Generator().manual_seed(d + T)
    if T == S:  # q, k, v as the model has them: strided views of the fused projection
        q, k, v = torch.randn(B, T, H, 3, d, generator=g).to(dtype).permute(3, 0, 2, 1, 4)
    else:  # keys from a cache: contiguous (B, H, S, D)
        q, k, v = (torch.randn(B, H, n, d, generator=g).to(dtype) for n in (T, S, S))
    for name, mask in _masks(B, T, S, g).items():
        got = prompt_attention(q, k, v, mask, d**-0.5)
        assert got is not None and got.shape == (B, T, H, d) and got.dtype == dtype, name
        want = _reference(q, k, v, mask, d**-0.5)
        assert (got.float() - want).abs().max().item() < tol, name


def test_a_query_that_sees_no_key_gets_zeros():
    q, k, v = (torch.randn(1, 2, 4, 16) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    mask[2] = False
    got = prompt_attention(q, k, v, mask, 0.25)
    assert torch.equal(got[0, 2], torch.zeros(2, 16))
    assert torch.allclose(got[0, [0, 1, 3]], _reference(q, k, v, mask, 0.25)[0, [0, 1, 3]], atol=1e-6)


def test_declines_what_it_does_not_take():
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    causal = "causal"
    assert prompt_attention(q[:, :, :1], k, v, None, 1.0) is None  # one query: decoding stays in torch
    assert prompt_attention(q.half(), k.half(), v.half(), causal, 1.0) is None
    assert prompt_attention(q, k.double(), v, causal, 1.0) is None
    big = torch.randn(1, 1, 4, 272)
    assert prompt_attention(big, big, big, causal, 1.0) is None  # head dim past 256
    assert prompt_attention(q, k, v, torch.ones(3, 6, 6, dtype=torch.bool), 1.0) is None  # not (T,S)/(B,1,T,S)
    assert prompt_attention(q, k, v, torch.zeros(6, 6), 1.0) is None  # an additive float mask
    assert prompt_attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, causal, 1.0) is None
    with torch.enable_grad():
        assert prompt_attention(q.requires_grad_(), k, v, causal, 1.0) is None  # training: SDPA's autograd


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_the_model_uses_it_only_when_native(tmp_path, name, monkeypatch):
    """neolm.load gives every block the kernel (native=False: none), and a padded batch's logits agree."""
    folder = save_hf(hf_model(TINY[name]), tmp_path)
    on, off = neolm.load(folder).model, neolm.load(folder, native=False).model
    assert all(b.attn.attend is prompt_attention and b.attn.rotate is rotate for b in on.blocks)
    assert all(b.attn.attend is None and b.attn.rotate is None for b in off.blocks)
    calls = []
    for block in on.blocks:
        monkeypatch.setattr(block.attn, "attend", lambda *a: calls.append(1) or prompt_attention(*a))
    ids = torch.randint(0, 1000, (2, 30), generator=torch.Generator().manual_seed(5))
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :7] = False  # left padding
    with torch.inference_mode():
        got, want = on(ids, key_valid=valid), off(ids, key_valid=valid)
    assert len(calls) == len(on.blocks)
    assert (got - want).abs().max().item() < 1e-4


def _qkv_and_rope(dtype, B, T, H, D, dims, seed=0):
    """A fused projection's q, k, v (3, B, H, T, D) as the model views it, and the cos, sin rows (B, 1, T, dims)
    of each sequence's own positions (a padded batch: they differ)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, H, 3, D, generator=g).to(dtype).permute(3, 0, 2, 1, 4)
    cos, sin = rotary_table(4 * T, dims, 10000.0)
    positions = torch.randint(0, 3 * T, (B, 1), generator=g) + torch.arange(T)  # (B, T)
    return qkv, (cos[positions][:, None].to(dtype), sin[positions][:, None].to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,dims", [(64, 16), (128, 32), (80, 80), (256, 64), (96, 24)])  # pythia's quarter, all dims,
def test_rotate_equals_apply_rotary_bit_for_bit(dtype, D, dims):  # half-vectors (8, 12 pairs), several vectors
    """The native kernel, in place, gives apply_rotary's numbers exactly (each product rounded to the dtype, then
    their sum), touches only q and k's rotated dims, and leaves v alone."""
    qkv, rope = _qkv_and_rope(dtype, 2, 19, 3, D, dims)
    want = apply_rotary(qkv[:2], *rope)
    got = qkv.clone()
    assert rotate(got[:2], *rope)
    assert torch.equal(got[:2], want)
    assert torch.equal(got[2], qkv[2])
    assert torch.equal(got[:2, ..., dims:], qkv[:2, ..., dims:])


def test_rotate_declines_what_it_does_not_take():
    qkv, (cos, sin) = _qkv_and_rope(torch.float32, 1, 6, 2, 16, 8)
    x = qkv[:2]
    assert not rotate(x.half(), cos.half(), sin.half())
    assert not rotate(x, cos.double(), sin.double())  # (the model gives the table in x's dtype)
    assert not rotate(x, cos[..., :3], sin[..., :3])  # an odd number of dims
    assert not rotate(x, cos[:, :, :4], sin[:, :, :4])  # rows for other positions
    assert not rotate(x.transpose(-1, -2).contiguous().transpose(-1, -2), cos, sin)
    with torch.enable_grad():
        assert not rotate(x.clone().requires_grad_(), cos, sin)  # training: apply_rotary's autograd
    assert torch.equal(x, qkv[:2])  # none of them touched it
