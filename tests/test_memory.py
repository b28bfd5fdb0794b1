"""neolm.memory's huge pages: `into_huge_pages` and `neolm.load(huge_pages=True)`."""

import logging
import mmap
import sys

import pytest
import torch
from conftest import TINY, hf_model, save_hf

from neolm import memory
from neolm.errors import NeolmError

LINUX = sys.platform.startswith("linux")
THP = memory.transparent_huge_pages()
needs_thp = pytest.mark.skipif(
    THP not in ("always", "madvise"), reason=f"the kernel's transparent huge pages are {THP or 'absent'}"
)


def _extent(tensors) -> tuple[int, int]:
    """(lowest address, highest end) of contiguous tensors' data."""
    return min(t.data_ptr() for t in tensors), max(t.data_ptr() + t.nbytes for t in tensors)


@pytest.mark.skipif(not LINUX, reason="madvise(MADV_HUGEPAGE) is Linux's")
def test_into_huge_pages_moves_storages_in_place_and_keeps_views_and_values():
    big = torch.randn(1_500_000)  # 6 MB
    view = big[1006:].view(-1, 7)[:, 2]  # a strided view into the same storage
    half = torch.randn(300, 400, dtype=torch.bfloat16)
    small = torch.randn(100)  # under HUGE_MIN_BYTES: stays where it is
    expect = [t.clone() for t in (big, view, half, small)]
    small_at, big_at = small.data_ptr(), big.data_ptr()

    moved, huge = memory.into_huge_pages([big, view, half, small, big])

    for t, want in zip((big, view, half, small), expect):
        assert torch.equal(t, want)
    assert small.data_ptr() == small_at and big.data_ptr() != big_at
    assert view.untyped_storage().data_ptr() == big.untyped_storage().data_ptr()  # still one storage
    assert view.data_ptr() == big.data_ptr() + 1008 * 4
    assert big.untyped_storage().data_ptr() == half.untyped_storage().data_ptr()  # both in the new mapping
    lo, hi = _extent([big, half])
    assert lo % memory.HUGE_PAGE == 0 and hi - lo <= moved
    assert moved == sum(-(-n // mmap.PAGESIZE) * mmap.PAGESIZE for n in (big.nbytes, half.nbytes))  # page-aligned each
    view.add_(1)  # a write through the view reaches the moved storage
    assert torch.equal(big[1008 : 1008 + 7 * 5 : 7], expect[1][:5] + 1)
    if THP in ("always", "madvise"):
        assert 0 < huge <= moved
    assert memory.into_huge_pages([small, torch.empty(0)]) == (0, 0)


@pytest.mark.skipif(not LINUX, reason="weight_empty's mappings of their own and /proc/self/maps are Linux's")
def test_into_huge_pages_frees_the_memory_of_weight_empty():
    """A weight of MIN_BYTES or more (a mapping of its own: the native kernels' codes, float weights) moved into
    huge pages leaves its old mapping unmapped: no view's base keeps it (int8 pythia-1.4b kept 1.2 GB so)."""
    from pathlib import Path

    big = memory.weight_empty((memory.MIN_BYTES // 1024, 1024), torch.int8).fill_(3)
    assert big.shape == (memory.MIN_BYTES // 1024, 1024) and big.is_contiguous()
    old = big.data_ptr()
    assert f"{old:x}-" in Path("/proc/self/maps").read_text()
    moved, _ = memory.into_huge_pages([big])
    assert moved == memory.MIN_BYTES and big.data_ptr() != old and bool((big == 3).all())
    assert f"{old:x}-" not in Path("/proc/self/maps").read_text()  # unmapped as it moved


WIDER = {  # tiny configs whose matrices reach HUGE_MIN_BYTES
    "neox": dict(TINY["neox-parallel-pct25"], hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "neo": dict(TINY["neo"], hidden_size=256, num_heads=4),
}


@needs_thp
@pytest.mark.parametrize(
    "family, quantize, activations",
    [("neox", None, False), ("neox", "int8", False), ("neox", "int4", False), ("neo", "int8", True)],
)
def test_load_with_huge_pages_gives_the_same_model(tmp_path, caplog, family, quantize, activations):
    """Every weight of 64 KiB or more, wherever the layers keep it (the native kernels' packed codes included),
    moves into one huge-page mapping; logits and greedy text stay the same, through the native decode step."""
    import neolm

    folder = save_hf(hf_model(WIDER[family], std=0.2), tmp_path)
    kwargs = {"device": "cpu", "quantize": quantize, "quantize_head": quantize is not None}
    kwargs["quantize_activations"] = activations
    plain = neolm.load(folder, **kwargs)
    with caplog.at_level(logging.INFO, logger="neolm.api"):
        huge = neolm.load(folder, huge_pages=True, **kwargs)
    assert "MB of weights moved" in caplog.text

    tensors = {id(t): t for t in memory.module_tensors(huge.model) if t.nbytes >= memory.HUGE_MIN_BYTES}.values()
    assert len(tensors) >= 3 * 4 + 1  # the blocks' matrices (q/k/v, out, fc, proj of 3 or 4 layers), embedding(s)
    lo, hi = _extent(tensors)
    assert lo % memory.HUGE_PAGE == 0 and hi - lo < sum(t.nbytes + 4096 for t in tensors)  # one mapping
    ids = torch.tensor([[5, 17, 300, 2, 9000]])
    with torch.inference_mode():
        assert torch.equal(huge.model(ids), plain.model(ids))
    prompts = ["The sea", "A cat sat on the"]  # a batch too
    assert huge.generate(prompts, max_new_tokens=12) == plain.generate(prompts, max_new_tokens=12)


def test_huge_pages_without_the_kernels_support_leave_the_weights_and_warn(tmp_path, caplog, monkeypatch):
    import neolm

    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(memory, "THP_ENABLED", setting)
    assert memory.transparent_huge_pages() == "never"
    folder = save_hf(hf_model(TINY["neo"]), tmp_path / "model")
    with caplog.at_level(logging.WARNING, logger="neolm.api"):
        lm = neolm.load(folder, device="cpu", huge_pages=True)
    assert "left in 4 KiB pages" in caplog.text and "'never'" in caplog.text
    plain = neolm.load(folder, device="cpu")
    assert lm.generate("The sea", max_new_tokens=3) == plain.generate("The sea", max_new_tokens=3)
    monkeypatch.setattr(memory, "THP_ENABLED", tmp_path / "absent")
    assert memory.transparent_huge_pages() is None


def test_huge_pages_refuses_mmap_and_devices_other_than_the_cpu(tmp_path):
    import neolm

    folder = save_hf(hf_model(TINY["neo"]), tmp_path)
    with pytest.raises(NeolmError, match="choose one"):
        neolm.load(folder, huge_pages=True, mmap=True)
    with pytest.raises(NeolmError, match="CPU memory"):
        neolm.load(folder, huge_pages=True, device="meta")


def test_module_tensors_finds_what_layers_keep_outside_parameters_and_buffers():
    class Packed:  # as neolm.native's Int4Gemv: codes in a plain object's attribute
        def __init__(self):
            self.q, self.n = torch.ones(4), 4

    layer = torch.nn.Linear(3, 2)
    layer.register_buffer("scale", torch.ones(2))
    layer.kernel_copy = torch.zeros(5)  # a tensor attribute (as a quantized layer's `_kweight`)
    layer.packed = Packed()
    model = torch.nn.Sequential(layer, torch.nn.LayerNorm(2))
    found = {id(t) for t in memory.module_tensors(model)}
    want = [layer.weight, layer.bias, layer.scale, layer.kernel_copy, layer.packed.q, model[1].weight, model[1].bias]
    assert found == {id(t) for t in want}
