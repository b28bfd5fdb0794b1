"""Assisted generation (neolm.speculative): prompt lookup and an assistant model give the model's own greedy
tokens (and transformers' assisted ones) in fewer forwards; sampled, the model's distribution."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from test_generate import hf_generate

import neolm
from neolm.errors import NeolmError
from neolm.generate import generate
from neolm.generation_config import GenerationConfig
from neolm.sampling import Processors
from neolm.speculative import PromptLookup, Picker, assisted_tokens

LOOP = [3, 3, 4, 5, 3, 4, 9, 3, 4] * 3  # a prompt that repeats itself


@contextmanager
def count_forwards(model) -> Iterator[list[int]]:
    """The tokens of each of the model's forwards inside the block (a list filled as they run)."""
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    try:
        yield calls
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {name: (hf, neolm.load(folder)) for name, (hf, folder) in tiny_checkpoints.items()}


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_prompt_lookup_gives_greedy_tokens_in_fewer_forwards(models, name):
    """The tokens of plain greedy decoding and of transformers' prompt lookup, with and without processors
    that read each position's history; the guesses are used (fewer forwards than tokens, on a text that
    repeats its prompt)."""
    hf, lm = models[name]
    n = 40
    free = lm.generate_ids([LOOP], max_new_tokens=n, do_sample=False)[0]
    cases = [dict(), dict(max_matching_ngram_size=1), dict(repetition_penalty=1.3, min_new_tokens=5),
             dict(no_repeat_ngram_size=4, presence_penalty=0.5, frequency_penalty=0.3),
             dict(eos_token_id=free[7], min_new_tokens=3)]  # fmt: skip
    saved = []
    for knobs in cases:
        plain = lm.generate_ids([LOOP], max_new_tokens=n, do_sample=False, **knobs)[0]
        with count_forwards(lm.model) as calls:
            ours = lm.generate_ids([LOOP], max_new_tokens=n, do_sample=False, prompt_lookup_num_tokens=6, **knobs)[0]
        assert ours == plain, knobs
        if "presence_penalty" not in knobs:  # (not a transformers processor)
            hf_knobs = {k: v for k, v in knobs.items() if k != "max_matching_ngram_size"}
            ref = hf_generate(hf, LOOP, max_new_tokens=n, prompt_lookup_num_tokens=6, **hf_knobs)
            eos = knobs.get("eos_token_id")
            ref = ref[: ref.index(eos) + 1] if eos in ref else ref
            assert ours == ref, knobs
        k, ngram = 6, knobs.get("max_matching_ngram_size", 2)
        assert len(calls) - 1 == lookup_rounds(LOOP, ours, n, k, ngram), knobs  # (the prompt's forward, the rounds)
        saved.append(len(ours) - (len(calls) - 1))
    if name == "neox-parallel-pct25":  # these random weights' text repeats itself: guesses saved forwards
        assert max(saved) >= 3, saved


def lookup_rounds(prompt: list[int], out: list[int], budget: int, k: int, ngram: int) -> int:
    """How many forwards prompt lookup takes to make `out`: a round keeps the guesses that equal it, then one more."""
    lookup = PromptLookup.of(GenerationConfig(prompt_lookup_num_tokens=k, max_matching_ngram_size=ngram))
    seq, done, rounds = list(prompt), 0, 0
    while done < len(out):
        guesses, _ = lookup.guess(seq, budget - done - 1)
        kept = next((j for j in range(len(guesses)) if guesses[j] != out[done + j]), len(guesses))
        seq += out[done : done + kept + 1]
        done, rounds = done + kept + 1, rounds + 1
    return rounds


def test_an_assistant_model_gives_the_models_greedy_tokens(models):
    """Another model (here of another shape and vocabulary size) guesses: the tokens stay the model's greedy ones,
    and transformers' with that assistant; the model itself as its own assistant has every guess right."""
    hf, lm = models["neox-parallel-pct25"]
    hf_small, small = models["neox-sequential-pct100"]
    _, neo = models["neo"]
    prompt = [5, 17, 99, 1000, 7, 7, 42]
    n = 30
    plain = lm.generate_ids([prompt], max_new_tokens=n, do_sample=False)[0]
    for assistant in (small, neo):
        for knobs in (dict(), dict(num_assistant_tokens=3, assistant_confidence_threshold=0.0),
                      dict(num_assistant_tokens_schedule="heuristic", repetition_penalty=1.2)):  # fmt: skip
            expected = plain if not knobs.get("repetition_penalty") else lm.generate_ids(
                [prompt], max_new_tokens=n, do_sample=False, repetition_penalty=1.2)[0]  # fmt: skip
            cfg = lm.generation_config(max_new_tokens=n, do_sample=False, **knobs)
            assert generate(lm.model, [prompt], cfg, lm.tokenizer.decode, assistant.model)[0] == expected, knobs
    # a token outside the assistant's (smaller) vocabulary: no more guesses, the model's tokens still
    forced = dict(max_new_tokens=12, do_sample=False, sequence_bias={(50300,): 30.0})
    expected = lm.generate_ids([prompt], **forced)[0]
    assert 50300 in expected and lm.generate_ids([prompt], assistant_model=neo.model, **forced)[0] == expected
    hf_small.generation_config.num_assistant_tokens = 5
    ref = hf_generate(hf, prompt, max_new_tokens=n, assistant_model=hf_small)
    assert ref == plain
    with count_forwards(lm.model) as calls:
        ours = lm.generate_ids([prompt], max_new_tokens=n, do_sample=False, assistant_model=lm,
                               num_assistant_tokens=4, assistant_confidence_threshold=0.0)  # fmt: skip
    assert ours[0] == plain
    # its forwards as the model (the prompt but its last token; then each round its newest token and 4 right
    # guesses) and as the assistant (the prompt and 3 of its guesses; then the 2 tokens it has not seen and 3)
    assert calls == [len(prompt) - 1, len(prompt), 1, 1, 1, 5] + [2, 1, 1, 1, 5] * (n // 5 - 1), calls


def test_stop_strings_eos_budgets_and_streaming(models):
    """Sequences end where plain decoding ends them (eos among the guesses, a stop string, the budget), for
    several prompts and return sequences; lm.stream gives generate's text."""
    _, lm = models["neo"]
    prompts = [LOOP, [7, 8, 9], LOOP[:10]]
    free = lm.generate_ids(prompts, max_new_tokens=25, do_sample=False)
    text = lm.decode(free[0])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    for knobs in (dict(max_new_tokens=25), dict(max_new_tokens=25, eos_token_id=free[0][11]),
                  dict(max_new_tokens=25, stop_strings=[stop]), dict(max_length=31)):  # fmt: skip
        plain = lm.generate_ids(prompts, do_sample=False, **knobs)
        assert lm.generate_ids(prompts, do_sample=False, prompt_lookup_num_tokens=4, **knobs) == plain, knobs
    prompt = lm.decode(LOOP)
    pieces = list(lm.stream(prompt, max_new_tokens=25, do_sample=False, prompt_lookup_num_tokens=4))
    assert "".join(pieces) == lm.generate(prompt, max_new_tokens=25, do_sample=False)
    assert len(pieces) > 1


def test_sampled_assisted_generation_is_seeded_and_keeps_the_budget(models):
    _, lm = models["neox-parallel-pct25"]
    _, small = models["neox-sequential-pct100"]
    for assist in (dict(prompt_lookup_num_tokens=5), dict(assistant_model=small)):
        runs = [lm.generate_ids([LOOP, [1, 2]], max_new_tokens=20, do_sample=True, seed=s, num_return_sequences=2,
                                **assist) for s in (1, 1, 2)]  # fmt: skip
        assert runs[0] == runs[1] and runs[0] != runs[2]
        assert all(len(seq) == 20 for seq in runs[0])


@pytest.mark.parametrize("assistant, weight", [(True, None), (False, None), (True, 0.3)])
def test_the_kept_tokens_follow_the_models_distribution(assistant, weight):
    """Picker.keep over many draws: the round's first token is distributed as the model's processed
    distribution p, whatever the guesses' distribution q (speculative sampling's rejection rule; with prompt
    lookup, guesses kept where the model's own samples equal them); with assistant_ensemble_weight w, as
    w p + (1 - w) q."""
    V, c, draws = 6, 2, 20000
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(c + 1, V, generator=gen) * 1.5
    q = torch.softmax(torch.randn(c, V, generator=gen) * 1.5, dim=-1)
    gc = GenerationConfig(do_sample=True, top_k=None, assistant_ensemble_weight=weight)
    picker = Picker(gc, Processors(gc, [], V, "cpu"), 4, 10, V, "cpu", torch.Generator().manual_seed(1))
    counts = torch.zeros(V)
    for _ in range(draws):
        guesses = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(c)]
        first = picker.keep(logits.clone(), guesses, q if assistant else None)[0]
        counts[first] += 1
    p = torch.softmax(logits[0], dim=-1)
    if weight is not None:
        p = weight * p + (1 - weight) * q[0]
    assert (counts / draws - p).abs().max() < 0.012, (counts / draws, p)


def test_prompt_lookup_guesses():
    def guess(seq: list[int], limit: int, **knobs) -> list[int]:
        lookup = PromptLookup.of(GenerationConfig(prompt_lookup_num_tokens=3, **knobs))
        return lookup.guess(seq, limit)[0]

    assert guess([1, 2, 3, 4, 5, 1, 2], 10) == [3, 4, 5]  # the last 2 tokens' first occurrence
    assert guess([1, 2, 3, 4, 5, 1, 2], 2) == [3, 4]  # at most the room left
    assert guess([9, 2, 3, 4, 5, 1, 2], 10) == [3, 4, 5]  # else the last token's
    assert guess([9, 2, 3, 4, 5, 1, 2], 10, max_matching_ngram_size=1) == [3, 4, 5]
    assert guess([1, 2, 3], 10) == []  # nothing repeats: no guess (a plain step)
    assert guess([7, 8, 7, 8], 10) == [7, 8]  # up to the end of the sequence
    lookup = PromptLookup.of(GenerationConfig(prompt_lookup_num_tokens=3, max_matching_ngram_size=3))
    seq = [5, 6, 7, 8]
    assert lookup.guess(seq, 10) == ([], None)
    for token, expected in [(5, [6, 7, 8]), (6, [7, 8, 5]), (9, []), (5, [6, 7, 8]), (6, [7, 8, 5]), (9, [5, 6, 9])]:
        seq.append(token)  # the index follows a growing sequence: as a fresh lookup would guess
        assert lookup.guess(seq, 10)[0] == expected == guess(seq, 10, max_matching_ngram_size=3), seq


@pytest.mark.parametrize("name", ["neo", "neox-sequential-pct100"])
def test_an_early_exit_of_the_model_is_its_assistant(models, name):
    """assistant_early_exit=k: the model's first k layers, its final LayerNorm and head guess (their logits are those
    of transformers' model cut to k layers), and the tokens stay the model's greedy ones, plain and with
    processors, streamed too; the guesses run the first k blocks only. (transformers' own assistant_early_exit
    cuts only models whose layers loop reads config.num_hidden_layers: neither GPT-Neo's nor GPT-NeoX's.)"""
    hf, lm = models[name]
    k = lm.config.n_layer // 2
    kinds = ["global" if w is None else "local" for w in lm.config.layer_windows[:k]]
    layers = {"num_layers": k, "attention_types": [[kinds, 1]], "attention_layers": kinds} if name == "neo" else {
        "num_hidden_layers": k}  # fmt: skip
    cut = type(hf)(type(hf.config)(**{**hf.config.to_dict(), **layers}))
    cut.load_state_dict(hf.state_dict(), strict=False)  # (the layers past k are left out)
    ids = torch.tensor([LOOP])
    with torch.no_grad():
        ref = cut.eval()(ids).logits[0]
    from neolm.speculative import EarlyExit

    ours = EarlyExit(lm.model, k)(ids)[0]
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    assert not torch.allclose(lm.model(ids)[0], ours, atol=1e-2)  # (not the whole model)
    n, widths = 24, []
    for knobs in (dict(), dict(repetition_penalty=1.3, no_repeat_ngram_size=3)):
        plain = lm.generate_ids([LOOP], max_new_tokens=n, do_sample=False, **knobs)[0]
        widths.clear()
        hooks = [block.register_forward_pre_hook(lambda m, a, i=i: widths.append(i))
                 for i, block in enumerate(lm.model.blocks)]  # fmt: skip
        try:
            early = lm.generate_ids([LOOP], max_new_tokens=n, do_sample=False, assistant_early_exit=k, **knobs)[0]
        finally:
            for hook in hooks:
                hook.remove()
        assert early == plain, knobs
        assert widths.count(0) > widths.count(lm.config.n_layer - 1)  # block 0 ran for the guesses too
    streamed = "".join(lm.stream("a b a b a b", max_new_tokens=10, do_sample=False, assistant_early_exit=k))
    assert streamed == lm.generate("a b a b a b", max_new_tokens=10, do_sample=False)


def test_assisted_generation_errors(models):
    _, lm = models["neox-parallel-pct25"]
    bad = [
        (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens must be >= 1"),
        (dict(prompt_lookup_num_tokens=3, num_beams=2), "do not go together"),
        (dict(num_assistant_tokens=0), "num_assistant_tokens must be >= 1"),
        (dict(num_assistant_tokens_schedule="fast"), "num_assistant_tokens_schedule must be one of"),
        (dict(assistant_confidence_threshold=1.5), "assistant_confidence_threshold must be in"),
        (dict(prompt_lookup_num_tokens=3, assistant_model=lm), "one of prompt_lookup_num_tokens, assistant_early_exit"),
        (dict(assistant_early_exit=1, assistant_model=lm), "one of prompt_lookup_num_tokens, assistant_early_exit"),
        (dict(assistant_early_exit=1, prompt_lookup_num_tokens=3), "two ways of guessing"),
        (dict(assistant_early_exit=0), "assistant_early_exit must be a number of layers >= 1"),
        (dict(assistant_early_exit=lm.config.n_layer), "must be fewer layers than the model's"),
        (dict(assistant_model=lm, num_beams=2), "runs without beam search"),
        (dict(assistant_model="EleutherAI/pythia-70m"), "assistant_model must be a model from neolm.load"),
    ]
    for knobs, message in bad:
        with pytest.raises(NeolmError, match=message):
            lm.generate_ids([LOOP], max_new_tokens=5, **knobs)
    short = neolm.load(lm.source)  # an assistant whose context is too short
    short.model.config = type(short.config)(**{**vars(short.config), "n_positions": 20})
    with pytest.raises(NeolmError, match="assistant model's context of 20 tokens is shorter"):
        lm.generate_ids([LOOP], max_new_tokens=5, assistant_model=short)
    with pytest.raises(NeolmError, match="stop_strings need a tokenizer"):
        assisted_tokens(lm.model, LOOP, GenerationConfig(stop_strings=["x"], prompt_lookup_num_tokens=2))
