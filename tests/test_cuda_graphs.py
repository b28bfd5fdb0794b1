"""neolm.cuda_graphs: decode steps replayed as CUDA graphs.

On CPU: the step a graph records (static_blocks: the cache slot as a tensor, attention over the whole cache under
a mask) against GPT.forward's torch path. On a CUDA GPU (skipped without one): the graphs themselves, against the
eager path and against transformers on the same GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY
from conftest import rel_error as _rel
from test_native_decode import _twin_runs

import neolm
from neolm.cuda_graphs import GraphStep, clear_tail, static_blocks
from neolm.model import KVCache

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _static_step(model):
    """The step a graph records, run eagerly: model.decode_step's signature."""

    def step(x, positions, cache, key_valid=None, layers=None):
        return static_blocks(model, x, positions, cache, torch.tensor(cache.length, device=x.device), key_valid, layers)

    return step


@pytest.mark.parametrize("kv", [None, "bfloat16", "int8"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name", list(TINY))
def test_the_recorded_step_equals_the_torch_path(tiny_checkpoints, name, rows, kv):
    """Past GPT-Neo's local window (8 here), with left padding, with bf16 and int8 caches beside an fp32 model:
    attending over the whole cache under a mask gives the torch path's logits and fills the same cache."""
    lm = neolm.load(tiny_checkpoints[name][1], device="cpu", native=False, kv_cache_dtype=kv)
    ids = torch.randint(0, 50000, (rows, 24), generator=torch.Generator().manual_seed(3))
    (static, eager), (c_static, c_eager) = _twin_runs(lm.model, ids, 5, (_static_step(lm.model), None))
    # a bf16 or int8 cache: a rounding of a stored number flips now and then (by one int8 code: 1/127 of the row)
    tol = {None: 1e-5, "bfloat16": 5e-3, "int8": 1e-2}[kv]
    assert _rel(static, eager) < tol
    assert _rel(c_static.k, c_eager.k) < tol and _rel(c_static.v, c_eager.v) < tol
    if kv == "int8":
        assert _rel(c_static.k_scale, c_eager.k_scale) < tol


@pytest.mark.parametrize("kv", [None, "int8"])
def test_unwritten_slots_are_cleared_before_a_step_reads_them(tiny_checkpoints, kv):
    """A cache made with torch.empty holds anything past its written slots, NaN too; a step over the whole cache
    reads them under a mask, and a masked NaN still poisons the sum. GraphStep clears them first (clear_tail)."""
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1], device="cpu", native=False, kv_cache_dtype=kv)
    model, ids = lm.model, torch.randint(0, 50000, (2, 12), generator=torch.Generator().manual_seed(7))
    cache = KVCache(model.config, 2, 16, model.cache_dtype)
    with torch.inference_mode():
        model(ids[:, :8], cache=cache)
        for t in (cache.k, cache.v) if kv is None else (cache.k_scale, cache.v_scale):
            t[:, :, :, 8:] = float("nan")
        step = _static_step(model)
        poisoned = step(model.wte(ids[:, 8:9]), torch.full((2, 1), 8), cache)
        assert poisoned.isnan().all()
        clear_tail(cache)
        assert torch.equal(cache.k[:, :, :, 8:], torch.zeros_like(cache.k[:, :, :, 8:]))
        y = step(model.wte(ids[:, 8:9]), torch.full((2, 1), 8), cache)
        model.decode_step, cache.length = None, 8
        want = model(ids[:, 8:9], cache=cache, head=False)
    assert _rel(model.ln_f(y), want) < 1e-5


def test_the_recorded_step_takes_an_early_exit(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neo"][1], device="cpu", native=False)
    ids = torch.randint(0, 50000, (1, 20), generator=torch.Generator().manual_seed(4))
    (static, eager), _ = _twin_runs(lm.model, ids, 4, (_static_step(lm.model), None), layers=2)
    assert _rel(static, eager) < 1e-5


def test_graphs_are_attached_on_cuda_only(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neo"][1], device="cpu")
    assert not isinstance(lm.model.decode_step, GraphStep)
    if CUDA:
        assert isinstance(neolm.load(tiny_checkpoints["neo"][1], device="cuda").model.decode_step, GraphStep)
        assert neolm.load(tiny_checkpoints["neo"][1], device="cuda", native=False).model.decode_step is None


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name", list(TINY))
def test_graphs_replay_the_eager_steps(tiny_checkpoints, name, rows, dtype):
    """Replayed graphs give the eager (native=False) path's logits and caches on the GPU, one graph for the run."""
    lm = neolm.load(tiny_checkpoints[name][1], device="cuda", dtype=dtype)
    step = lm.model.decode_step
    ids = torch.randint(0, 50000, (rows, 24), generator=torch.Generator().manual_seed(3)).cuda()
    (graphed, eager), (c_graphed, c_eager) = _twin_runs(lm.model, ids, 5, (step, None))
    assert len(step.graphs) == 1
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert _rel(graphed, eager) < tol
    assert _rel(c_graphed.k, c_eager.k) < tol and _rel(c_graphed.v, c_eager.v) < tol


@needs_cuda
@pytest.mark.parametrize("name", list(TINY))
def test_greedy_text_on_cuda_equals_transformers(tiny_checkpoints, name):
    """neolm on the GPU (graphs) against transformers on the same GPU, fp32: the same greedy tokens, and the same
    logits for a batch of prompts of different lengths."""
    hf, folder = tiny_checkpoints[name]
    hf = hf.to("cuda")
    try:
        lm = neolm.load(folder, device="cuda", dtype="float32")
        prompt = torch.randint(0, 50000, (1, 12), generator=torch.Generator().manual_seed(5)).cuda()
        with torch.inference_mode():
            want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=40,
                               min_new_tokens=40, pad_token_id=0)[0, 12:].tolist()  # fmt: skip
            assert _rel(lm.model(prompt), hf(prompt).logits) < 1e-4
        got = lm.generate_ids([prompt[0].tolist()], max_new_tokens=40, min_new_tokens=40, do_sample=False)[0]
        assert got == want
        assert len(lm.model.decode_step.graphs) >= 1
    finally:
        hf.to("cpu")


@needs_cuda
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_layers_are_recorded(tiny_checkpoints, quantize):
    """int8 and int4 weights on the GPU (aten's packed kernels where they take the layer): graphs replay them."""
    lm = neolm.load(tiny_checkpoints["neox-sequential-pct100"][1], device="cuda", dtype="bfloat16", quantize=quantize,
                    group_size=32)  # fmt: skip
    step = lm.model.decode_step
    ids = torch.randint(0, 50000, (2, 20), generator=torch.Generator().manual_seed(6)).cuda()
    (graphed, eager), _ = _twin_runs(lm.model, ids, 4, (step, None))
    assert len(step.graphs) == 1 and not step.failed
    assert _rel(graphed, eager) < 2e-2


@needs_cuda
def test_graphs_are_kept_per_cache_and_dropped_when_the_model_changes(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1], device="cuda", dtype="float32")
    step = lm.model.decode_step
    prompt = [list(range(100, 110))]
    first = lm.generate_ids(prompt, max_new_tokens=12, do_sample=False)
    assert lm.generate_ids(prompt, max_new_tokens=12, do_sample=False) == first
    assert 1 <= len(step.graphs) <= 2  # the same cache shape: the allocator's same memory, the same graph
    seen = []
    handle = lm.model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:  # a hook: the steps run in torch, so that it sees every block
        assert lm.generate_ids(prompt, max_new_tokens=12, do_sample=False) == first
        assert len(seen) == 1 + 11
    finally:
        handle.remove()
    with torch.no_grad():
        lm.model.blocks[0].mlp.fc.weight = torch.nn.Parameter(lm.model.blocks[0].mlp.fc.weight * 0)
    changed = lm.generate_ids(prompt, max_new_tokens=12, do_sample=False)
    lm.model.decode_step = None
    assert changed == lm.generate_ids(prompt, max_new_tokens=12, do_sample=False)


@needs_cuda
@pytest.mark.parametrize(
    "name, kv", [("neo", None), ("neox-parallel-pct25", None), ("neo", "int8"), ("neo", "bfloat16")]
)
def test_a_batch_that_rows_join_and_leave_replays_the_eager_tokens(tiny_checkpoints, name, kv):
    """Continuous batching on the GPU (rows joining, finished ones dropped: the cache rebuilt, new graphs), fp32:
    every sequence gets the tokens of the eager path, and what it gets alone."""
    from test_generate import run_plan

    from neolm.generate import DecodeBatch
    from neolm.generation_config import GenerationConfig

    greedy = GenerationConfig(max_new_tokens=30, do_sample=False)
    plan = {0: ([5, 6, 7, 8, 9], greedy), 3: ([11, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16],
            GenerationConfig(max_new_tokens=6, do_sample=False)), 4: ([2, 2, 2], GenerationConfig(
            max_new_tokens=20, do_sample=False, repetition_penalty=1.5)), 12: ([40, 41], greedy)}  # fmt: skip
    runs = []
    for native in (True, False):
        lm = neolm.load(tiny_checkpoints[name][1], device="cuda", dtype="float32", native=native, kv_cache_dtype=kv)
        runs.append(run_plan(DecodeBatch(lm.model), plan)[0])
        if native:
            assert lm.model.decode_step.graphs
            alone = {i: lm.generate_ids([p], **dataclasses.asdict(gc))[0] for i, (p, gc) in enumerate(plan.values())}
    assert runs[0] == runs[1]
    assert list(runs[0].values()) == list(alone.values())
