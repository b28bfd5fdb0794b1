"""Generation against transformers.generate, and neolm's own guarantees (batching, seeds, streaming)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import REAL, hf_model, save_hf

import neolm
from neolm.errors import NeolmError
from neolm.generate import DecodeBatch, iter_generate
from neolm.generation_config import GenerationConfig
from neolm.model import KVCache
from neolm.sampling import Processors, RowState

NEOX_TOKENIZER = Path(neolm.__file__).parent / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"


def hf_generate(hf, prompt: list[int], **kwargs) -> list[int]:
    ids = torch.tensor([prompt])
    kwargs.setdefault("pad_token_id", hf.config.eos_token_id)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
    return out[0, len(prompt) :].tolist()


def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(NEOX_TOKENIZER), eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def neo125m(tmp_path_factory):
    hf = hf_model(REAL["gpt-neo-125M"], seed=5)
    return hf, neolm.load(save_hf(hf, tmp_path_factory.mktemp("neo125m")), dtype="float32")


def test_greedy_300_tokens_cross_the_local_window(neo125m):
    hf, lm = neo125m
    prompt = [464, 3290, 373, 257, 922]  # 5 tokens; 300 new ones cross window 256
    ours = lm.generate_ids([prompt], max_new_tokens=300, min_new_tokens=300)[0]
    assert len(ours) == 300
    assert ours == hf_generate(hf, prompt, max_new_tokens=300, min_new_tokens=300)


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25", "neox-sequential-pct100"])
def test_greedy_matches_transformers_tiny(tiny_checkpoints, name):
    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    prompt = [11, 22, 33, 44, 55, 66, 77]
    ours = lm.generate_ids([prompt], max_new_tokens=40, min_new_tokens=40)[0]
    assert ours == hf_generate(hf, prompt, max_new_tokens=40, min_new_tokens=40)


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_batched_equals_unbatched(tiny_checkpoints, name):
    lm = neolm.load(tiny_checkpoints[name][1])
    prompts = [[5, 6, 7], list(range(100, 117)), [9] * 9, [42]]
    batched = lm.generate_ids(prompts, max_new_tokens=24, min_new_tokens=24)
    alone = [lm.generate_ids([p], max_new_tokens=24, min_new_tokens=24)[0] for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_step_logprobs_are_transformers_raw_log_softmax(tiny_checkpoints, name):
    """iter_generate(logprobs=k, on_prompt=...) changes no token (sampling with a penalty, left-padded batch) and
    reports the log-softmax of the raw logits, of the prompts' tokens and the new ones, as transformers' forward
    over the whole sequence gives it."""
    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    prompts = [[5, 6, 7], list(range(100, 113))]
    gc = lm.generation_config(max_new_tokens=10, do_sample=True, seed=3, temperature=0.7, repetition_penalty=1.3)
    plain = list(iter_generate(lm.model, prompts, gc))
    prompt_scores = {}
    scored = list(iter_generate(lm.model, prompts, gc, logprobs=3, on_prompt=prompt_scores.__setitem__))
    assert [tokens for tokens, _ in scored] == plain
    for row, prompt in enumerate(prompts):
        new = [step[row] for step in plain]
        with torch.no_grad():
            reference = torch.log_softmax(hf(torch.tensor([prompt + new])).logits[0].float(), dim=-1)[:-1]
        chosen = prompt_scores[row].chosen + [lp.chosen[row] for _, lp in scored]
        assert chosen == pytest.approx(reference.gather(1, torch.tensor(prompt[1:] + new)[:, None])[:, 0].tolist(), abs=1e-4)
        top = prompt_scores[row].top_ids + [lp.top_ids[row] for _, lp in scored]
        assert top == reference.topk(3).indices.tolist()
    with pytest.raises(NeolmError, match="logprobs must be"):
        iter_generate(lm.model, prompts, gc, logprobs=-1)


def test_batched_text_api(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1])
    texts = lm.generate(["Hello", "A much longer prompt than the first one"], max_new_tokens=5)
    assert isinstance(texts, list) and len(texts) == 2
    assert texts[0] == lm.generate("Hello", max_new_tokens=5)


def test_seeded_sampling_is_reproducible(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neo"][1])
    kw = dict(do_sample=True, max_new_tokens=30, temperature=1.5, top_k=0)
    a = lm.generate_ids([[1, 2, 3]], seed=7, **kw)
    assert a == lm.generate_ids([[1, 2, 3]], seed=7, **kw)
    assert a != lm.generate_ids([[1, 2, 3]], seed=8, **kw)
    three = lm.generate_ids([[1, 2, 3]], seed=7, num_return_sequences=3, **kw)
    assert len(three) == 3 and len({tuple(s) for s in three}) == 3


def test_repetition_penalty_matches_transformers(tiny_checkpoints):
    hf, folder = tiny_checkpoints["neox-parallel-pct25"]
    lm = neolm.load(folder)
    prompt = [3, 3, 4, 5, 3, 9]
    kw = dict(max_new_tokens=40, min_new_tokens=40, repetition_penalty=1.8)
    ours = lm.generate_ids([prompt], **kw)[0]
    assert ours == hf_generate(hf, prompt, **kw)
    assert ours != lm.generate_ids([prompt], max_new_tokens=40, min_new_tokens=40)[0]


@pytest.mark.parametrize("knob", ["min_new_tokens", "min_length"])
def test_min_length_and_eos_match_transformers(tiny_checkpoints, knob):
    hf, folder = tiny_checkpoints["neo"]
    lm = neolm.load(folder)
    prompt = [10, 20, 30]
    free = lm.generate_ids([prompt], max_new_tokens=12, min_new_tokens=12)[0]
    eos = free[3]  # pretend the 4th greedy token is eos: generation stops there...
    stopped = lm.generate_ids([prompt], max_new_tokens=12, eos_token_id=eos)[0]
    assert stopped == free[:4] == hf_generate(hf, prompt, max_new_tokens=12, eos_token_id=eos)
    value = 8 if knob == "min_new_tokens" else 8 + len(prompt)  # ...unless a minimum length forbids it
    ours = lm.generate_ids([prompt], max_new_tokens=12, eos_token_id=eos, **{knob: value})[0]
    assert len(ours) >= 8 and eos not in ours[:8]
    assert ours == hf_generate(hf, prompt, max_new_tokens=12, eos_token_id=eos, **{knob: value})


def test_stop_strings_match_transformers(tiny_checkpoints):
    hf, folder = tiny_checkpoints["neox-parallel-pct25"]
    lm = neolm.load(folder)
    prompt = lm.encode("The quick brown fox")
    free = lm.generate_ids([prompt], max_new_tokens=30, min_new_tokens=30)[0]
    one_token = lm.decode(free[12:13]).strip() or lm.decode(free[12:13])
    two_tokens = lm.decode(free[12:14])[1:]  # starts inside token 12, ends with token 13
    for stop in (one_token, two_tokens):
        ours = lm.generate_ids([prompt], max_new_tokens=30, stop_strings=[stop])[0]
        ref = hf_generate(hf, prompt, max_new_tokens=30, stop_strings=[stop], tokenizer=hf_tokenizer())
        assert ours == ref
        assert len(ours) <= 14 and stop in lm.decode(prompt + ours)


def test_warpers_match_transformers():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 3
    gc = GenerationConfig(do_sample=True, temperature=0.7, top_k=40, top_p=0.8)
    ref = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.8)])(
        None, logits.clone()
    )
    ours = Processors(gc.validated(), [], 1000, "cpu")(logits.clone(), RowState())
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.allclose(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_stream_pieces_join_to_the_generated_text(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1])
    pieces = list(lm.stream("Once upon", max_new_tokens=25))
    assert "".join(pieces) == lm.generate("Once upon", max_new_tokens=25)
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in lm.generate("Once upon", max_new_tokens=25)


def test_pipeline_call_shape(tiny_checkpoints):
    generator = neolm.pipeline("text-generation", model=tiny_checkpoints["neo"][1])
    out = generator("EleutherAI has", do_sample=True, min_length=10, max_new_tokens=12, seed=0)
    assert isinstance(out, list) and list(out[0]) == ["generated_text"]
    assert out[0]["generated_text"].startswith("EleutherAI has")
    two = generator(["a", "b"], max_new_tokens=3)
    assert len(two) == 2 and all(len(x) == 1 for x in two)


def test_context_overflow_is_an_error_or_truncated_on_request(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neo"][1])  # context 512
    prompt = list(range(1, 501))
    with pytest.raises(NeolmError, match="more than the model's context of 512"):
        lm.generate_ids([prompt], max_new_tokens=20)
    out = lm.generate_ids([prompt], max_new_tokens=20, min_new_tokens=20, truncate_prompt=True)[0]
    assert out == lm.generate_ids([prompt[-492:]], max_new_tokens=20, min_new_tokens=20)[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (dict(temperature=0), "temperature must be > 0"),
        (dict(top_p=1.5), "top_p"),
        (dict(num_return_sequences=2), "needs do_sample"),
        (dict(min_new_tokens=5, max_new_tokens=2), "exceeds max_new_tokens"),
        (dict(bogus=1), "unknown generation argument"),
        (dict(compile_config={"fullgraph": True}), r"compile_config is not taken: .*neolm.load\(\.\.\., compile=True\)"),
        (dict(cache_config={"backend": "quanto"}), r"cache_config is not taken: .*kv_cache_dtype="),
        (dict(decoder_start_token_id=0), "decoder_start_token_id is not taken: .*decoder-only"),
    ],
)
def test_bad_generation_arguments(tiny_checkpoints, kwargs, message):
    lm = neolm.load(tiny_checkpoints["neo"][1])
    with pytest.raises(NeolmError, match=message):
        lm.generate("hi", **kwargs)


def test_an_empty_prompt_starts_from_bos(tiny_checkpoints):
    """As transformers' generate() without inputs: an empty prompt is the bos token (the model's: <|endoftext|>,
    a document's start; or bos_token_id); with no bos token known it is an error."""
    hf, folder = tiny_checkpoints["neo"]
    lm = neolm.load(folder)
    ref = hf.generate(max_new_tokens=6, do_sample=False, pad_token_id=hf.config.eos_token_id)[0].tolist()
    assert ref[0] == lm.config.bos_token_id and lm.generate_ids([[]], max_new_tokens=6, do_sample=False)[0] == ref[1:]
    assert lm.generate("", max_new_tokens=6, do_sample=False) == lm.decode(ref[1:])
    greedy = dict(max_new_tokens=4, do_sample=False)
    assert lm.generate_ids([[]], bos_token_id=7, **greedy) == lm.generate_ids([[7]], **greedy)
    with pytest.raises(NeolmError, match="empty prompt: give at least one token, or bos_token_id"):
        iter_generate(lm.model, [[]], GenerationConfig(**greedy))
    with pytest.raises(NeolmError, match="bos_token_id must be a token id"):
        lm.generate("", bos_token_id=-1)


def run_plan(batch: DecodeBatch, plan: dict) -> tuple[dict, dict]:
    """Step a batch that sequences join: plan {step: (prompt, settings)}. Returns {id: its tokens} and
    {id: (prompt, settings)}."""
    got, settings, step = {}, {}, 0
    while step in plan or not batch.finished:
        if step in plan:
            prompt, gc = plan[step]
            (i,) = batch.add([prompt], gc)
            got[i], settings[i] = [], (prompt, gc)
        out = batch.step()
        for i, token in zip(out.ids, out.tokens):
            if token is not None:
                got[i].append(token)
        step += 1
    return got, settings


@pytest.mark.parametrize("name, kv", [("neo", None), ("neox-parallel-pct25", None), ("neo", "int8")])
def test_sequences_joining_a_running_batch_get_their_solo_tokens(tiny_checkpoints, name, kv):
    """Continuous batching: sequences added between steps (longer and shorter than the slots in use, with other
    settings), and finished ones dropped, each get what they get alone, across GPT-Neo's local window (8)."""
    lm = neolm.load(tiny_checkpoints[name][1], kv_cache_dtype=kv)
    greedy = GenerationConfig(max_new_tokens=30, do_sample=False)
    short = GenerationConfig(max_new_tokens=6, do_sample=False)
    penalty = GenerationConfig(max_new_tokens=20, do_sample=False, repetition_penalty=1.5)
    plan = {  # step at which it joins -> (prompt, settings)
        0: ([5, 6, 7, 8, 9], greedy),
        3: ([11, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16], short),  # longer than the 7 slots in use: all move right
        4: ([2, 2, 2], penalty),
        12: ([40, 41], greedy),  # after `short` ended (dropped once the finished rows are as many as the live)
    }
    got, settings = run_plan(DecodeBatch(lm.model), plan)
    assert len(got) == 4
    for i, (prompt, gc) in settings.items():
        assert got[i] == lm.generate_ids([prompt], **dataclasses.asdict(gc))[0], (i, prompt)


@pytest.mark.parametrize("name, load", [("neo", {}), ("neox-parallel-pct25", {}), ("neo", {"kv_cache_dtype": "int8"}),
                                        ("neox-sequential-pct100", {"quantize": "int8"})])  # fmt: skip
def test_prompts_read_in_chunks_between_steps_match_one_forward(tiny_checkpoints, name, load):
    """Chunked prefill: prompts of different lengths (left-padded, longer than GPT-Neo's window of 8) read 64
    tokens at a time while another sequence decodes give the numbers of one forward: the same first logits and
    prompt scores, bit for bit, and every sequence its solo tokens."""
    lm = neolm.load(tiny_checkpoints[name][1], **load)
    gc = GenerationConfig(max_new_tokens=12, do_sample=False)
    torch.manual_seed(0)
    prompts = [torch.randint(0, 50000, (n,)).tolist() for n in (150, 97)]
    scored = {}

    def on_prompt(i, scores):
        scored.setdefault(i, []).append(scores.chosen)

    alone = DecodeBatch(lm.model)
    whole = alone.prefill(prompts, gc, 2, on_prompt)
    assert whole.read(lm.model) == 2 * 150
    whole_logits = lm.model.lm_head(torch.cat(whole.hidden, 1)[:, -1]).float()
    alone.join(whole)  # scores the prompts
    batch = DecodeBatch(lm.model)
    (running,) = batch.add([[5, 6, 7]], GenerationConfig(max_new_tokens=40, do_sample=False))
    prefill = batch.prefill(prompts, gc, 2, on_prompt)
    reads, got = [], {}

    def step():
        out = batch.step()
        for i, token in zip(out.ids, out.tokens):
            if token is not None:
                got.setdefault(i, []).append(token)

    while prefill.left:
        reads.append(prefill.read(lm.model, budget=64))
        step()
    assert reads == [64] * 3 + [300 - 192]  # 32 columns a chunk; the last takes the 54 left (< 2 chunks)
    assert torch.equal(lm.model.lm_head(torch.cat(prefill.hidden, 1)[:, -1]).float(), whole_logits)
    new = batch.join(prefill)
    assert [len(v) for v in scored.values()] == [2, 2]  # each prompt scored by both, equally
    assert scored[0][0] == scored[0][1] and scored[1][0] == scored[1][1]
    while not batch.finished:
        step()
    assert got[running] == lm.generate_ids([[5, 6, 7]], max_new_tokens=40, do_sample=False)[0]
    for i, prompt in zip(new, prompts):
        assert got[i] == lm.generate_ids([prompt], max_new_tokens=12, do_sample=False)[0]


@pytest.mark.parametrize("name", ["neo", "neox-sequential-pct100"])
def test_prefill_chunk_size_in_every_mode(tiny_checkpoints, name):
    """prefill_chunk_size (transformers'): every mode reads its prompts (and guidance's context, and an assistant
    its copy) at most 2 x chunk - 1 columns per forward (model.chunk_end) and gives the tokens of one forward of
    the whole; use_cache is taken and changes nothing (neolm always decodes with its cache)."""
    lm = neolm.load(tiny_checkpoints[name][1])
    torch.manual_seed(0)
    prompts = [torch.randint(0, 50000, (n,)).tolist() for n in (150, 61)]
    widths = []
    hook = lm.model.blocks[0].register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    modes = [{}, dict(use_cache=False), dict(num_beams=3), dict(num_beams=2, force_words_ids=[[9]]),
             dict(penalty_alpha=0.6, top_k=4), dict(dola_layers="low"), dict(prompt_lookup_num_tokens=3),
             dict(assistant_model=lm), dict(guidance_scale=1.5, negative_prompt_ids=prompts[0][:90]),
             dict(do_sample=True, seed=3, num_return_sequences=2)]  # fmt: skip
    try:
        for mode in modes:
            batch = prompts[:1] if "negative_prompt_ids" in mode else prompts
            widths.clear()
            mode = {"do_sample": False} | mode
            whole = lm.generate_ids(batch, max_new_tokens=6, **mode)
            assert max(widths) >= 61, mode
            widths.clear()
            chunked = lm.generate_ids(batch, max_new_tokens=6, prefill_chunk_size=16, **mode)
            assert max(widths) <= 31 and chunked == whole, mode
    finally:
        hook.remove()
    for bad in (dict(prefill_chunk_size=0), dict(prefill_chunk_size=2.5), dict(use_cache="no")):
        with pytest.raises(NeolmError, match=next(iter(bad))):
            lm.generate_ids(prompts, max_new_tokens=2, **bad)


def test_transformers_cache_and_compile_settings_change_nothing(tiny_checkpoints):
    """cache_implementation "static" or "dynamic", max_cache_len and disable_compile (transformers') are taken and
    give the same tokens (neolm's cache is static, made per call; it compiles nothing per call); a quantized or
    offloaded cache is refused with where neolm offers one."""
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1])
    prompts, greedy = [[5, 6, 7, 8], [9, 10]], dict(max_new_tokens=8, do_sample=False)
    plain = lm.generate_ids(prompts, **greedy)
    for knobs in (dict(cache_implementation="static", max_cache_len=256), dict(cache_implementation="dynamic"),
                  dict(disable_compile=True), dict(cache_implementation="static", num_beams=2)):  # fmt: skip
        expected = plain if "num_beams" not in knobs else lm.generate_ids(prompts, num_beams=2, **greedy)
        assert lm.generate_ids(prompts, **greedy, **knobs) == expected, knobs
    bad = [(dict(cache_implementation="quantized"), 'kv_cache_dtype="int8"'),
           (dict(cache_implementation="offloaded"), "is not offered"),
           (dict(cache_implementation="sliding_window"), 'must be "dynamic" or "static"'),
           (dict(max_cache_len=0), "max_cache_len must be"), (dict(disable_compile="no"), "disable_compile must be")]  # fmt: skip
    for knobs, message in bad:
        with pytest.raises(NeolmError, match=message):
            lm.generate_ids(prompts, **greedy, **knobs)


def test_prompts_join_a_batch_whose_rows_have_all_finished(tiny_checkpoints):
    """A prefill begun while a sequence ran (so without room of its own) joins after that one ended: the new
    sequence gets its solo tokens, in a cache of its own slots only."""
    lm = neolm.load(tiny_checkpoints["neo"][1])
    batch = DecodeBatch(lm.model)
    batch.add([[1, 2, 3]], GenerationConfig(max_new_tokens=2, do_sample=False))
    gc = GenerationConfig(max_new_tokens=5, do_sample=False)
    prefill = batch.prefill([[4, 5, 6, 7]], gc)
    batch.step()
    batch.step()
    assert batch.finished
    prefill.read(lm.model)
    (i,) = batch.join(prefill)
    got = []
    while not batch.finished:
        out = batch.step()
        got += [t for j, t in zip(out.ids, out.tokens) if j == i and t is not None]
    assert got == lm.generate_ids([[4, 5, 6, 7]], max_new_tokens=5, do_sample=False)[0]
    assert batch.cache.k.shape[1] == 1 and batch.cache.max_len == 4 + 5  # its prompt, its 5 tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_aligned_caches_take_a_spare_cache_s_memory(tiny_checkpoints, dtype):
    """KVCache.aligned writes into a spare cache's memory where it is large enough (rebuilds swap two buffers
    instead of faulting in fresh memory), with the same contents as in fresh memory."""
    config = neolm.load(tiny_checkpoints["neo"][1]).config
    torch.manual_seed(0)
    caches = []
    for rows, length in ((3, 10), (2, 6)):
        cache = KVCache(config, rows, length + 4, dtype)
        for t in (cache.k, cache.v, cache.k_scale, cache.v_scale):
            if t is not None:
                t.copy_(torch.randint(-100, 100, t.shape).to(t.dtype))
        cache.length = length
        cache.valid = torch.arange(length + 4) >= torch.tensor([[0], [3], [5]][:rows])
        caches.append(cache)
    parts = [(caches[0], torch.tensor([0, 2])), (caches[1], torch.tensor([1]))]
    fresh = KVCache.aligned(parts, room=3)
    spare = KVCache(config, 4, 20, dtype)
    reused = KVCache.aligned(parts, room=3, spare=spare)
    assert reused.k.untyped_storage().data_ptr() == spare.k.untyped_storage().data_ptr()
    assert reused.k.shape == fresh.k.shape == (config.n_layer, 3, config.n_head, 10 + 3, config.head_dim)
    slots = slice(0, reused.length)  # the rest is written before it is read
    for a, b in ((reused.k, fresh.k), (reused.v, fresh.v), (reused.k_scale, fresh.k_scale)):
        if a is not None:
            assert torch.equal(a[:, :, :, slots], b[:, :, :, slots])
    assert torch.equal(reused.valid, fresh.valid) and reused.length == fresh.length == 10
    small = KVCache(config, 1, 4, dtype)  # too small: fresh memory
    too_small = KVCache.aligned(parts, room=3, spare=small)
    assert too_small.k.untyped_storage().data_ptr() != small.k.untyped_storage().data_ptr()


def test_decode_batch_ends_and_cancels(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1])
    batch = DecodeBatch(lm.model)
    a, b = batch.add([[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=4, do_sample=False))
    assert batch.add([[7]], GenerationConfig(max_new_tokens=0)) == [2]  # nothing to generate: no row
    ends = {}
    batch.step()
    batch.cancel([b])
    while not batch.finished:
        out = batch.step()
        assert b not in [i for i, t in zip(out.ids, out.tokens) if t is not None]
        ends.update({i: e for i, e in zip(out.ids, out.ends) if e})
    assert ends == {a: "length"}
    with pytest.raises(NeolmError, match="seeded"):
        batch.add([[1]], GenerationConfig(do_sample=True, seed=3))


def test_a_checkpoints_generation_config_gives_defaults_but_not_its_cache_or_tokens(tiny_checkpoints, tmp_path):
    """generation_config.json's fields are the defaults, but for the special tokens (config.json's) and
    transformers' cache settings, which may name other models' caches ("hybrid") and change nothing here."""
    import json
    import shutil

    folder = shutil.copytree(tiny_checkpoints["neo"][1], tmp_path / "neo")
    (folder / "generation_config.json").write_text(json.dumps({
        "cache_implementation": "hybrid", "max_cache_len": 0, "bos_token_id": 5, "eos_token_id": 6,
        "assistant_lookbehind": 4, "repetition_penalty": 1.2}))  # fmt: skip
    lm = neolm.load(folder)
    assert lm.generation_defaults == {"assistant_lookbehind": 4, "repetition_penalty": 1.2}
    gc = lm.generation_config()
    assert (gc.bos_token_id, gc.eos_token_id) == (lm.config.bos_token_id, lm.config.eos_token_id) == (50256, 50256)
    assert lm.generate("", max_new_tokens=3, do_sample=False) == lm.decode(
        lm.generate_ids([[50256]], max_new_tokens=3, do_sample=False)[0])  # fmt: skip
