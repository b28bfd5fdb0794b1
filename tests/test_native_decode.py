"""neolm.native.decode: a whole decode step (one sequence or a padded batch) in one native call, against the
torch path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, hf_model, save_hf
from conftest import rel_error as _rel

import neolm
from neolm import native
from neolm.model import KVCache
from neolm.native import decode

pytestmark = pytest.mark.skipif(not native.available()[0], reason=f"no native kernels: {native.available()[1]}")

WIDE = {  # widths the native int4 kernel takes (multiples of 128)
    "neo-128": {**TINY["neo"], "hidden_size": 128, "num_heads": 4},
    "neox-128": {**TINY["neox-parallel-pct25"], "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256},
}
LONG_HEADS = {  # head dims past the attention's 128 dims a pass (136 = 128 + a masked 8); fp32 only: in bf16 a
    # model this wide is chaotic enough that either path's distance to fp32 varies by 1.5x from seed to seed
    "neox-136": {**TINY["neox-parallel-pct25"], "hidden_size": 272, "num_attention_heads": 2, "intermediate_size": 64},
}
CASES = [(name, dtype, None) for name in TINY for dtype in ("float32", "bfloat16")] + [("neox-136", "float32", None)]
CASES += [(name, "float32", "int8") for name in ("neo", "neox-parallel-pct25")] + [("neox-parallel-pct25", "bfloat16", "int8")]
CASES += [(name, dtype, "int4") for name in WIDE for dtype in ("float32", "bfloat16")]
# relative to the largest logit. int8 and int4 round activations to bf16: an fp32 difference of 1e-7 between the
# paths flips a rounding now and then, and the flips add up over the steps
TOLERANCE = {None: 1e-5, "int8": 2e-2, "int4": 2e-2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    configs = TINY | WIDE | LONG_HEADS
    return {name: save_hf(hf_model(spec, seed=i, std=0.2), tmp_path_factory.mktemp(name))
            for i, (name, spec) in enumerate(configs.items())}  # fmt: skip


def _step_by_step(model, ids: torch.Tensor, prefill: int) -> list[float]:
    """Each step once with the native step and once with the torch path from the same cache (the torch path's):
    the relative differences of the logits and of the caches after it."""
    step = model.decode_step
    B, S = ids.shape
    positions = torch.arange(S)[None].expand(B, S)
    cache, errors = KVCache(model.config, B, S + 1, model.cache_dtype), []
    with torch.inference_mode():
        model.decode_step = None
        model(ids[:, :prefill], positions[:, :prefill], cache)
        for t in range(prefill, S):
            twin = copy.deepcopy(cache)
            model.decode_step = step
            fast = model(ids[:, t : t + 1], positions[:, t : t + 1], twin)
            model.decode_step = None
            slow = model(ids[:, t : t + 1], positions[:, t : t + 1], cache)
            errors += [_rel(fast.float(), slow.float()), _rel(twin.k, cache.k), _rel(twin.v, cache.v)]
    model.decode_step = step
    return errors


PADS = [0, 3, 1]  # left padding of each row of a batch, as generate() lays prompts of different lengths out


def _twin_runs(model, ids: torch.Tensor, prefill: int, steps: tuple | None = None, layers: int | None = None):
    """Logits (B, S - prefill, V) of the same decode steps through each of `steps` (model.decode_step values;
    default: the model's own step, then the torch path), and the caches they fill. A batch (B > 1) is left-padded
    by PADS, with positions counted from each row's first real token, as in generate(). layers: an early exit."""
    step = model.decode_step
    steps = (step, None) if steps is None else steps
    B, S = ids.shape
    device = ids.device
    pads = torch.tensor(PADS[:B], device=device)[:, None] if B > 1 else torch.zeros(1, 1, dtype=torch.long, device=device)
    slots = torch.arange(S, device=device)[None]
    positions = (slots - pads).clamp(min=0)  # (B, S)
    caches = [KVCache(model.config, B, S + 1, model.cache_dtype, device) for _ in steps]
    logits = [[] for _ in steps]
    with torch.inference_mode():
        for run, (cache, use) in enumerate(zip(caches, steps)):
            if B > 1:
                cache.valid = torch.ones(B, cache.max_len, dtype=torch.bool, device=device)
                cache.valid[:, :S] = slots >= pads
            model.decode_step = use
            model(ids[:, :prefill], positions[:, :prefill], cache, layers=layers)
            for t in range(prefill, S):
                logits[run].append(model(ids[:, t : t + 1], positions[:, t : t + 1], cache, layers=layers).float())
    model.decode_step = step
    return [torch.cat(x, 1) for x in logits], caches


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name,dtype,quantize", CASES)
def test_native_step_equals_the_torch_path(folders, name, dtype, quantize, rows):
    """Logits of every step and the cache each path fills agree, for one sequence and for a left-padded
    batch: past the local window (GPT-Neo's is 8 here), with partial rotary, parallel and sequential
    residuals, tanh and erf GELU, odd widths. In bf16 both paths round differently: the native one must be as
    close to the fp32 model as the torch one."""
    lm = neolm.load(folders[name], dtype=dtype, quantize=quantize, compile=True)
    assert isinstance(lm.model.decode_step, decode.DecodeStep)
    chosen = {}  # each quantized layer's kernel choice at load (aten's int8 kernel crashes on some widths)
    for layer in lm.model.modules():  # the torch path's one-row matmuls: the same native kernels; more rows: torch's
        if hasattr(layer, "gemv_kernels"):
            layer.gemv, layer.gemv_rows = layer.gemv_kernels().get("native"), 1
        if quantize and rows > 1 and hasattr(layer, "use_kernel"):  # many rows: the dequantized matrix, not aten's
            chosen[layer], layer.use_kernel = layer.use_kernel, False  # kernels (bf16 activations)
    ids = torch.randint(0, 50000, (rows, 24), generator=torch.Generator().manual_seed(3))
    (fast, slow), (c_fast, c_slow) = _twin_runs(lm.model, ids, prefill=5)
    assert c_fast.length == c_slow.length == 24
    if dtype == "float32" and quantize and rows > 1:
        # bf16 activations, as in aten's int8/int4 kernels, against the exact product of the dequantized weights
        # (slow): the native batch must be as close to it as torch with the same rounding of the activations
        for layer in chosen:
            weight = layer.dequantize(torch.float32)
            layer.gemv = lambda x, q, s, b, w=weight: F.linear(x.bfloat16().float(), w, b)
            layer.gemv_rows = 10**6
        (_, rounded), (_, c_rounded) = _twin_runs(lm.model, ids, prefill=5)
        assert _rel(fast, slow) <= 1.5 * _rel(rounded, slow) + 1e-3
        for kv in ("k", "v"):
            mine, theirs, truth = (getattr(c, kv) for c in (c_fast, c_rounded, c_slow))
            assert _rel(mine, truth) <= 1.5 * _rel(theirs, truth) + 1e-3
    elif dtype == "float32":
        tol = TOLERANCE[quantize]
        assert _rel(fast, slow) < tol
        assert _rel(c_fast.k, c_slow.k) < tol and _rel(c_fast.v, c_slow.v) < tol
    else:
        reference = neolm.load(folders[name], dtype="float32")
        reference.model.decode_step = None
        (exact, _), (c_exact, _) = _twin_runs(reference.model, ids, prefill=5)
        assert _rel(fast, exact) <= 1.5 * _rel(slow, exact) + 1e-3
        for kv in ("k", "v"):
            mine, theirs, truth = (getattr(c, kv).float() for c in (c_fast, c_slow, c_exact))
            assert _rel(mine, truth) <= 1.5 * _rel(theirs, truth) + 1e-3


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_an_early_exit_runs_its_first_layers_natively(folders, name):
    """forward(layers=k), an early exit (assisted generation's assistant_early_exit), runs the native step over the
    first k blocks, with a cache of k layers: the torch path's logits and cache."""
    from neolm.speculative import EarlyExit

    lm = neolm.load(folders[name])
    step, ran = lm.model.decode_step, []

    def counted(*args):
        out = step(*args)
        ran.append(out is not None)
        return out

    early = EarlyExit(lm.model, 2)
    ids = torch.randint(0, 50000, (1, 20), generator=torch.Generator().manual_seed(4))
    logits, caches = [], []
    with torch.inference_mode():
        for use in (counted, None):
            lm.model.decode_step = use
            cache = KVCache(early.config, 1, 20, lm.model.cache_dtype)
            early(ids[:, :5], cache=cache)
            logits.append(torch.cat([early(ids[:, t : t + 1], cache=cache) for t in range(5, 20)], 1))
            caches.append(cache)
    lm.model.decode_step = step
    assert ran == [True] * 15 and caches[0].k.shape[0] == 2
    assert _rel(logits[0], logits[1]) < 1e-5 and _rel(caches[0].k, caches[1].k) < 1e-5
    with torch.inference_mode():
        whole = lm.model(ids)[:, 5:]
    assert _rel(logits[0], whole) > 1e-2


@pytest.mark.parametrize("name", list(TINY))
def test_greedy_text_is_the_same(folders, name):
    lm = neolm.load(folders[name], compile=True)
    prompt, kw = [[11, 22, 33, 44]], dict(max_new_tokens=20, min_new_tokens=20)
    fast = lm.generate_ids(prompt, **kw)
    lm.model.decode_step = None
    assert fast == lm.generate_ids(prompt, **kw)


def test_hidden_states_of_one_token_steps(folders):
    """A one-token forward with a cache asked for hidden states (head=False) gets them from the native step too:
    prompts of one token scored as they are read (the server's echo with logprobs) once crashed on its logits."""
    from neolm.generate import DecodeBatch
    from neolm.generation_config import GenerationConfig

    lm = neolm.load(folders["neox-parallel-pct25"])
    assert lm.model.decode_step is not None
    gc = GenerationConfig.from_kwargs(max_new_tokens=3, do_sample=False)
    runs = []
    for step in (lm.model.decode_step, None):
        lm.model.decode_step = step
        scored = []
        batch = DecodeBatch(lm.model)
        batch.add([[5], [6]], gc, logprobs=2, on_prompt=lambda i, scores: scored.append(i))
        runs.append([batch.step().tokens for _ in range(3)])
        assert scored == [0, 1]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize(("name", "quantize"), [("neo", None), ("neox-parallel-pct25", None), ("neox-128", "int4")])
def test_a_bf16_cache_for_a_float32_model(folders, name, quantize, rows):
    """kv_cache_dtype="bfloat16": the native step reads and writes a bf16 cache as the torch path does (keys
    and values rounded to bf16 once, attention in fp32), past GPT-Neo's local window; the text stays near the
    fp32 cache's."""
    lm = neolm.load(folders[name], quantize=quantize, kv_cache_dtype="bfloat16")
    assert lm.model.ln_f.weight.dtype == torch.float32 and lm.model.cache_dtype == torch.bfloat16
    ids = torch.randint(0, 50000, (rows, 24), generator=torch.Generator().manual_seed(3))
    errors = sorted(_step_by_step(lm.model, ids, prefill=5))
    # a key computed 1e-7 apart in fp32 now and then rounds to the neighbouring bf16 number (a cache differs by
    # an ulp, 2^-8 at most, and that step's logits by ~1e-3); the other steps agree to fp32 rounding (int4:
    # the torch path's bf16 activations, as in test_native_step_equals_the_torch_path)
    median, most = (1e-5, 1e-2) if quantize is None else (TOLERANCE[quantize], 0.05)
    assert errors[len(errors) // 2] < median and errors[-1] < most, errors
    (fast, _), (c_fast, _) = _twin_runs(lm.model, ids, prefill=5)
    assert c_fast.k.dtype == c_fast.v.dtype == torch.bfloat16
    exact = neolm.load(folders[name], quantize=quantize)
    (full, _), _ = _twin_runs(exact.model, ids, prefill=5)
    assert 0 < _rel(fast, full) < 0.2  # bf16 keys and values: 1e-3 - 5e-2 in these random models


def test_kv_cache_dtype_is_checked(folders):
    with pytest.raises(neolm.NeolmError, match="kv_cache_dtype"):
        neolm.load(folders["neo"], kv_cache_dtype="int4")
    assert neolm.load(folders["neo"], kv_cache_dtype="auto").model.cache_dtype == torch.float32
    lm = neolm.load(folders["neo"], dtype="bfloat16", kv_cache_dtype=torch.float32)
    assert lm.model.cache_dtype == torch.float32


def test_it_takes_padded_batches_and_declines_what_it_does_not_take(folders):
    """A padded batch runs natively and gives the torch path's text; gradients, and padding flags that do not
    fit the batch, stay on the torch path."""
    lm = neolm.load(folders["neo"], compile=True)
    calls = []
    step = lm.model.decode_step

    def counting(*args):
        out = step(*args)
        calls.append(out is not None)
        return out

    lm.model.decode_step = counting
    prompts, kw = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]], dict(max_new_tokens=12, min_new_tokens=12)
    batch = lm.generate_ids(prompts, **kw)  # batch 3, padded
    assert calls and all(calls)
    lm.model.decode_step = None
    assert batch == lm.generate_ids(prompts, **kw)
    assert batch == [lm.generate_ids([p], **kw)[0] for p in prompts]  # each as if alone
    lm.model.decode_step = counting
    calls.clear()
    cache = KVCache(lm.model.config, 1, 8, torch.float32)
    lm.model(torch.tensor([[1, 2]]), cache=cache)
    with torch.enable_grad():
        lm.model(torch.tensor([[3]]), cache=cache)
    assert calls == [False]
    with torch.inference_mode():
        lm.model(torch.tensor([[4]]), cache=cache)
    assert calls[-1] is True and cache.length == 4
    valid = torch.tensor([[False, True, True, True, True, True, True, True]])  # explicit padding flags
    outputs = []
    for use in (counting, None):
        lm.model.decode_step = use
        cache.length = 4
        with torch.inference_mode():
            outputs.append(lm.model(torch.tensor([[5]]), cache=cache, key_valid=valid))
    assert calls[-1] is True and torch.allclose(*outputs, atol=1e-5)


def test_attach_says_why_not(monkeypatch, folders):
    assert isinstance(neolm.load(folders["neo"]).model.decode_step, decode.DecodeStep)  # on by default
    lm = neolm.load(folders["neo"], native=False)
    assert lm.model.decode_step is None
    monkeypatch.setattr(native, "available", lambda: (set(), "no AVX-512 (test)"))
    assert decode.attach(lm.model) == "no AVX-512 (test)" and lm.model.decode_step is None
    int4 = neolm.load(folders["neo-128"], quantize="int4", native=False)
    monkeypatch.setattr(native, "available", lambda: ({"f32", "int8"}, ""))  # AVX-512 without BF16: no int4 kernel
    assert "has no native kernel" in decode.attach(int4.model)
    layer = int4.model.blocks[0].mlp.fc
    assert layer.gemv_kernels() == {} and layer._native is None  # no copy of the codes for kernels it cannot run
    monkeypatch.undo()
    assert isinstance(neolm.load(folders["neo-128"], quantize="int4", group_size=32).model.decode_step, decode.DecodeStep)
    monkeypatch.setattr(native, "int4_supported", lambda in_features, group_size: False)  # a shape it cannot take
    int4 = neolm.load(folders["neo-128"], quantize="int4", native=False)
    assert "block 0's qkv, proj, fc, out layer has no native kernel" in decode.attach(int4.model)
    assert int4.model.decode_step is None
    monkeypatch.undo()
    off = neolm.load(folders["neo-128"], quantize="int4", native=False)  # its layers stay off the native kernels
    assert "has no native kernel" in decode.attach(off.model) and off.model.decode_step is None
    assert isinstance(neolm.load(folders["neo-128"], quantize="int4").model.decode_step, decode.DecodeStep)


def test_cli_no_native(folders, capsys):
    from neolm.cli import main

    for flags in ([], ["--no-native"]):
        main(["generate", "-m", str(folders["neo"]), "--max-new-tokens", "6", "--seed", "0", *flags, "Hello"])
    default, torch_only = capsys.readouterr().out.strip().splitlines()[-2:]
    assert default == torch_only  # greedy: the same text either way


def test_a_changed_model_gets_a_new_step(folders):
    """Swapping layers (quantize_model) or replacing a tensor's data after load rebuilds the step from the
    model as it is now, so decoding never runs on the old weights."""
    from neolm.quant.linear import quantize_model

    lm = neolm.load(folders["neo"])
    first = lm.model.decode_step
    quantize_model(lm.model, 8)
    kw = dict(max_new_tokens=8, min_new_tokens=8)
    out = lm.generate_ids([[1, 2, 3]], **kw)
    assert lm.model.decode_step is not first and isinstance(lm.model.decode_step, decode.DecodeStep)
    torch_path = lm.model.decode_step
    lm.model.decode_step = None
    assert out == lm.generate_ids([[1, 2, 3]], **kw)  # the int8 model's text, not the fp32 one's
    lm.model.decode_step = torch_path
    norm = lm.model.blocks[1].ln2
    norm.weight.data = norm.weight.data * 0.5  # new memory under the same parameter
    halved = lm.generate_ids([[1, 2, 3]], **kw)
    assert lm.model.decode_step is not torch_path
    lm.model.decode_step = None
    assert halved == lm.generate_ids([[1, 2, 3]], **kw)


@pytest.mark.parametrize("where", ["block", "mlp", "global"])
def test_forward_hooks_see_every_step(folders, where):
    """A hook on a block or a part of it (or on every module) is called at each decode step, as in torch: the
    native step, which would pass it by, declines while one is set. A steering hook (adding a vector to a block's
    output) thus changes the text as it does in torch, and removing it brings the native step back."""
    lm = neolm.load(folders["neox-parallel-pct25"])
    step = lm.model.decode_step
    target = lm.model.blocks[1] if where != "mlp" else lm.model.blocks[1].mlp
    nudge = torch.randn(lm.config.d_model, generator=torch.Generator().manual_seed(0))
    calls = []

    def steer(module, args, out):
        if module is target:
            calls.append(out.shape[1])
            return out + nudge

    prompt, kw = [[11, 22, 33, 44]], dict(max_new_tokens=12, min_new_tokens=12)
    plain = lm.generate_ids(prompt, **kw)
    if where == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(steer)
    else:
        handle = target.register_forward_hook(steer)
    try:
        steered = lm.generate_ids(prompt, **kw)
        assert calls == [4] + [1] * 11  # the prompt, then each step but the last's (its token is not fed)
        lm.model.decode_step = None
        assert steered == lm.generate_ids(prompt, **kw)  # the torch path with the hook
        assert steered != plain
    finally:
        handle.remove()
        lm.model.decode_step = step
    calls.clear()
    assert lm.generate_ids(prompt, **kw) == plain and not calls


def test_hooks_on_the_model_or_its_head_keep_the_native_step(folders):
    """The step passes by the blocks and writes into the embeddings' output: hooks elsewhere (the model itself, its
    final norm and head) see what they would, so it keeps running; one on an embedding makes it step aside."""
    lm = neolm.load(folders["neox-parallel-pct25"])
    step, taken = lm.model.decode_step, []

    def counted(*args):
        out = step(*args)
        taken.append(out is not None)
        return out

    lm.model.decode_step = counted
    for module in (lm.model, lm.model.ln_f, lm.model.lm_head, lm.model.wte):
        taken.clear()
        handle = module.register_forward_pre_hook(lambda m, args: None)
        try:
            lm.generate_ids([[11, 22, 33]], max_new_tokens=5, min_new_tokens=5)
        finally:
            handle.remove()
        assert taken == [module is not lm.model.wte] * 4, type(module).__name__


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25", "neox-sequential-pct100"])
def test_what_a_hook_sees_stays_as_it_was(folders, name):
    """The model writes into some outputs in place to save memory (the MLP's becomes its block's, the activation
    overwrites fc's, q and k are rotated inside qkv's, the decode step writes into the embeddings): not while a
    hook watches them. Outputs kept by reference equal copies taken in the hook, in the prompt and every step."""
    lm = neolm.load(folders[name])
    names = ["wte", "blocks.0.mlp", "blocks.0.mlp.fc", "blocks.1.attn.qkv", "blocks.1.attn", "blocks.1"]
    modules = dict(lm.model.named_modules())
    held, copies = [], []

    def keep(module, args, out):
        held.append(out)
        copies.append(out.clone())

    handles = [modules[n].register_forward_hook(keep) for n in names]
    try:
        lm.generate_ids([[11, 22, 33, 44, 55]], max_new_tokens=4, min_new_tokens=4)
    finally:
        for handle in handles:
            handle.remove()
    assert len(held) == len(names) * 4  # the prompt and 3 steps (the last token is not fed)
    for out, kept in zip(held, copies):
        assert torch.equal(out, kept)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize(("name", "quantize", "kernel"), [("neox-parallel-pct25", "int8", "int8a8"), ("neox-128", "int4", "int4a8")])
def test_int8_activations(folders, rows, name, quantize, kernel):
    """quantize_activations: every quantized layer and the native step take the int8-activation kernel; the step
    equals the torch path (the same kernel for each layer), and both stay near the weight-only model."""
    if kernel not in native.available()[0]:
        pytest.skip(f"no {kernel} kernel here (AVX-512 VNNI)")
    lm = neolm.load(folders[name], quantize=quantize, quantize_activations=True)
    assert lm.model.blocks[0].mlp.fc.native_weights().kind == kernel
    assert isinstance(lm.model.decode_step, decode.DecodeStep)
    ids = torch.randint(0, 50000, (rows, 24), generator=torch.Generator().manual_seed(3))
    errors = sorted(_step_by_step(lm.model, ids, prefill=5))
    # ~2e-7 at most steps; a step where an activation's int8 rounding flips between the paths (their fp32
    # LayerNorms differ in the last bit) differs by ~1e-2 in these random models, and the paths then part ways
    assert errors[len(errors) // 2] < 1e-5 and errors[-1] < 0.05, errors
    (fast, _), _ = _twin_runs(lm.model, ids, prefill=5)
    weights_only = neolm.load(folders[name], quantize=quantize)
    (w_only, _), _ = _twin_runs(weights_only.model, ids, prefill=5)
    assert 0 < _rel(fast, w_only) < 0.1  # ~0.02
    fc, plain = lm.model.blocks[0].mlp.fc, weights_only.model.blocks[0].mlp.fc
    assert torch.equal(fc.export()["qweight"], plain.export()["qweight"])  # saved as the weight-only model
    assert torch.equal(fc.dequantize(), plain.dequantize())
    if quantize == "int8":  # the kernel's layout is the only copy of the codes
        assert fc.layout == "a8" and fc.a8 and plain.layout == plain.wanted_layout() and not plain.a8


@pytest.mark.parametrize("arithmetic", ["int8a16", "int8f", "int8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_arithmetic_follows_the_faster_gemm(folders, monkeypatch, arithmetic, dtype):
    """Weight-only int8 multiplies in integers against x in 16 bits a row (int8a8.cpp's layout; with VNNI) or in
    fp32 (int8f.cpp's panels, the activations as they are; without) where oneDNN's fp32 GEMM outruns its bf16
    one (`gemm_dtype`), else in bf16 (gemm.cpp); either way the native step equals the torch path, which takes
    the same kernel for every product here, and a batch's rows get their numbers alone."""
    from neolm.quant import linear as quant_linear

    have = native.available()[0]
    if arithmetic not in have or "int8f" not in have:
        pytest.skip(f"no {arithmetic} kernel here")
    fp32 = arithmetic != "int8"
    monkeypatch.setattr(quant_linear, "gemm_dtype", lambda: torch.float32 if fp32 else torch.bfloat16)
    if arithmetic == "int8f":  # a CPU without VNNI
        monkeypatch.setattr(native, "available", lambda: (have - {"int8a16"}, ""))
    lm = neolm.load(folders["neox-parallel-pct25"], dtype=dtype, quantize="int8")
    fc = lm.model.blocks[0].mlp.fc
    assert fc.layout == {"int8a16": "a8", "int8f": "panels", "int8": "rows"}[arithmetic] and not fc.a8
    assert fc.native_weights().kind == arithmetic and fc.prefills() != fp32
    plain = neolm.load(folders["neox-parallel-pct25"], dtype=dtype, quantize="int8", native=False)
    plain = plain.model.blocks[0].mlp.fc
    assert plain.layout == "rows" and torch.equal(fc.codes(), plain.codes())
    ids = torch.randint(0, 50000, (3, 24), generator=torch.Generator().manual_seed(3))
    errors = _step_by_step(lm.model, ids, prefill=5)
    # (int8a16: an activation's rounding to 16 bits flips where the paths' LayerNorms differ in the last bit)
    tol = {"int8a16": 2e-4, "int8f": 1e-5}.get(arithmetic, 2e-2) if dtype == "float32" else 2e-2
    assert max(errors) < tol, max(errors)
    if fp32:  # one sequence alone gets the batch's numbers (in fp32 the row's own sums in order, any tile)
        (batch, _), _ = _twin_runs(lm.model, ids, prefill=5)
        (alone, _), _ = _twin_runs(lm.model, ids[:1], prefill=5)
        assert torch.equal(alone[0], batch[0])


@pytest.mark.parametrize("gemm", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_arithmetic_follows_the_faster_gemm(folders, monkeypatch, gemm, dtype):
    """Weight-only int4 multiplies in fp16 (int4h.cpp's panels) where oneDNN's fp32 GEMM outruns its bf16 one
    (`gemm_dtype`: this CPU's bf16 is slow), else in bf16 (int4.cpp); either way the native step equals the
    torch path, which takes the same kernel for every product here, a batch's rows get their numbers alone,
    and the codes are the ones saved."""
    from neolm.quant import linear as quant_linear

    if "int4h" not in native.available()[0]:
        pytest.skip("no int4h kernel here (AVX512-FP16)")
    monkeypatch.setattr(quant_linear, "gemm_dtype", lambda: gemm)
    lm = neolm.load(folders["neox-128"], dtype=dtype, quantize="int4", group_size=32)
    fc = lm.model.blocks[0].mlp.fc
    fp16 = gemm == torch.float32
    assert fc.in_fp16() == fp16 and isinstance(fc._native, native.Int4Panels if fp16 else native.Int4Gemv)
    assert fc.native_weights().kind == ("int4h" if fp16 else "int4") and fc.prefills() != fp16
    plain = neolm.load(folders["neox-128"], dtype=dtype, quantize="int4", group_size=32, native=False)
    plain = plain.model.blocks[0].mlp.fc
    assert torch.equal(fc.codes(), plain.codes()) and torch.equal(fc.export()["qweight"], plain.export()["qweight"])
    ids = torch.randint(0, 50000, (3, 24), generator=torch.Generator().manual_seed(3))
    errors = _step_by_step(lm.model, ids, prefill=5)  # (an activation's rounding to fp16 or bf16 flips where
    assert max(errors) < TOLERANCE["int4"], max(errors)  # the paths' LayerNorms differ in the last bit: ~1e-3)
    (batch, _), _ = _twin_runs(lm.model, ids, prefill=5)
    (alone, _), _ = _twin_runs(lm.model, ids[:1], prefill=5)
    assert torch.equal(alone[0], batch[0])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_int8_activations_pack_the_codes_once(folders, tmp_path, monkeypatch, quantize):
    """neolm.load(quantize_activations=True), quantizing while loading or from a quantized folder: each layer packs
    its codes straight into the int8-activation kernels' layout, never into the weight-only one first."""
    from neolm.quant import io

    if not {"int8a8", "int4a8"} <= native.available()[0]:
        pytest.skip("no int8-activation kernels here (AVX-512 VNNI)")
    saved = io.save_quantized(neolm.load(folders["neox-128"], quantize=quantize, group_size=64).model, tmp_path / "q")
    weight_only = []
    monkeypatch.setattr(native, "int8f_pack", lambda *a: weight_only.append("int8f") or pytest.fail("int8f_pack"))
    monkeypatch.setattr(native.Int4Panels, "__init__", lambda *a: weight_only.append("int4h") or pytest.fail("panels"))
    for source, kwargs in ((folders["neox-128"], {"quantize": quantize, "group_size": 64}), (saved, {})):
        lm = neolm.load(source, quantize_activations=True, **kwargs)
        layers = [m for m in lm.model.modules() if hasattr(m, "int8_activations")]
        assert layers and all(m.int8_activations() for m in layers) and not weight_only
        assert isinstance(lm.model.decode_step, decode.DecodeStep)


def test_int8_activations_need_quantized_weights(folders):
    with pytest.raises(neolm.NeolmError, match="int8 or int4 weights"):
        neolm.load(folders["neo"], quantize_activations=True)
    with pytest.raises(neolm.NeolmError, match="native"):
        neolm.load(folders["neo"], quantize="int8", quantize_activations=True, native=False)
