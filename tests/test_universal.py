"""Universal assisted generation (neolm.universal): an assistant with another tokenizer guesses through bytes;
the tokens stay the model's greedy ones, and an assistant that predicts what the model does (the model itself,
its vocabulary permuted) has its guesses kept as often as with one tokenizer. Sampled, it guesses in the tokens
the vocabularies share, with probabilities in the model's vocabulary (universal speculative decoding): the
model's own distribution, and every guess kept from an assistant that predicts it."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from test_speculative import count_forwards

import neolm
import neolm.tokenizer
from neolm.errors import NeolmError
from neolm.generate import generate
from neolm.tokenizer import Tokenizer
from neolm.universal import TextGuesser, Universal, shared_tokens, whole_chars

TEXT = "Café au lait — naïve 日本語 text 😀👍🏽, then plain words:\n\n  spaced    out.  Ωmega"


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {name: neolm.load(folder) for name, (_, folder) in tiny_checkpoints.items()}


@pytest.fixture(scope="module")
def permuted(lm, tmp_path_factory):
    """The bundled model (GPT-2's tokenizer) as an assistant with another vocabulary: its token ids permuted, in
    its tokenizer and in its embeddings (and tied head), so that it predicts what the model does."""
    folder = tmp_path_factory.mktemp("permuted")
    gpt2 = Path(neolm.tokenizer.__file__).with_name("tokenizers") / "gpt2"  # (the bundled model's tokenizer)
    vocab = json.loads((gpt2 / "vocab.json").read_text())
    assert lm.tokenizer.encode(" the cat") == [vocab["Ġthe"], vocab["Ġcat"]]
    perm = torch.randperm(len(vocab), generator=torch.Generator().manual_seed(0))  # old id -> new id
    (folder / "vocab.json").write_text(json.dumps({token: int(perm[i]) for token, i in vocab.items()}))
    (folder / "merges.txt").write_text((gpt2 / "merges.txt").read_text())
    tokenizer = Tokenizer.from_vocab_merges(folder / "vocab.json", folder / "merges.txt")
    model = neolm.load().model
    assert model.lm_head.weight is model.wte.weight  # (a tied head: permuted with the embeddings)
    with torch.no_grad():
        model.wte.weight[: len(vocab)] = lm.model.wte.weight[torch.argsort(perm)]
    model.config = dataclasses.replace(model.config, eos_token_id=int(perm[lm.config.eos_token_id]))
    assert tokenizer.encode(" the cat") == [int(perm[t]) for t in lm.encode(" the cat")]
    return Universal(model, tokenizer, lm.tokenizer)


def test_whole_chars():
    for text in ("", "abc", "é", "日本", "😀", "a😀b"):
        data = text.encode()
        assert whole_chars(data) == len(data)
        for cut in range(1, len(data)):  # every cut inside a character leaves the characters before it
            assert whole_chars(data[:cut]) == len(data[:cut].decode("utf-8", "ignore").encode()), (text, cut)
    assert whole_chars(b"\x80\x80") == 2 and whole_chars(b"a\xff") == 2  # no UTF-8: nothing to wait for


@pytest.mark.parametrize("behind", [0, 1, 10])
def test_the_assistants_tokens_spell_the_models_text(models, behind):
    """As the model's tokens come (one at a time, or several, characters split over tokens), the assistant's
    tokens spell exactly the whole characters of the model's bytes, with any lookbehind."""
    target, assistant = models["neox-parallel-pct25"], models["neo"]
    gc = target.generation_config(assistant_lookbehind=behind)
    ids = target.encode(TEXT)
    for step in (1, 3):
        guesser = TextGuesser(Universal(assistant.model, assistant.tokenizer, target.tokenizer), gc, [0],
                              target.config.vocab_size, 256)  # fmt: skip
        for n in [*range(1, len(ids), step), len(ids)]:
            guesser.read(ids[:n])
            data = b"".join(target.tokenizer.token_bytes(t) for t in ids[:n])
            spelled = b"".join(assistant.tokenizer.token_bytes(t) for t in guesser.a_tokens)
            assert spelled == data[: whole_chars(data)], (n, spelled, data)
            assert guesser.a_ends[-1] == whole_chars(data) and guesser.a_ends == sorted(guesser.a_ends)
        if behind == 10:  # a wide enough lookbehind joins words as the tokenizer does: the whole text's tokens
            assert guesser.a_tokens == assistant.encode(TEXT)


@pytest.mark.parametrize("behind", [0, 10])
def test_the_assistants_bytes_become_the_models_tokens(models, behind):
    """The assistant's tokens for the text after a cut become the model's tokens of that text: the model's own
    tokenization of the whole text where the cut falls between its tokens, its eos where the assistant ended,
    never more than the limit, and nothing where the assistant does not finish the model's character."""
    target, assistant = models["neox-parallel-pct25"], models["neo"]
    gc = target.generation_config(target_lookbehind=behind)
    ids = target.encode(TEXT)
    universal = Universal(assistant.model, assistant.tokenizer, target.tokenizer)
    for n in range(1, len(ids)):
        guesser = TextGuesser(universal, gc, [0], target.config.vocab_size, 256)
        guesser.read(ids[:n])
        data = b"".join(target.tokenizer.token_bytes(t) for t in ids)
        rest = data[guesser.a_ends[-1] :].decode()
        new = assistant.encode(rest)
        guesses = guesser.to_target(ids[:n], new, False, 1000)
        done = b"".join(target.tokenizer.token_bytes(t) for t in ids[:n])
        assert b"".join(target.tokenizer.token_bytes(t) for t in ids[:n] + guesses) == data, n
        if behind and whole_chars(done) == len(done):
            assert guesses == ids[n:], n
        assert guesser.to_target(ids[:n], new, True, 1000) == guesses + [0]
        assert guesser.to_target(ids[:n], new, False, 2) == guesses[:2]
    guesser = TextGuesser(universal, gc, [0], target.config.vocab_size, 256)
    split = next(n for n in range(1, len(ids)) if target.decode(ids[:n]).endswith("\ufffd"))
    guesser.read(ids[:split])
    assert guesser.to_target(ids[:split], assistant.encode("x"), False, 10) == []  # the character left unfinished


def test_an_assistant_that_predicts_the_model_has_its_guesses_kept(lm, permuted):
    """The bundled model's greedy tokens, with the same model as an assistant of another vocabulary: the same
    tokens, in as few forwards as the same assistant with the model's own tokenizer."""
    prompt = lm.encode("Once upon a time, there was a little girl who")
    knobs = dict(max_new_tokens=48, do_sample=False, repetition_penalty=1.0)
    plain = lm.generate_ids([prompt], **knobs)[0]
    guessing = dict(num_assistant_tokens=7, assistant_confidence_threshold=0.0)
    gc = lm.generation_config(**knobs, **guessing)
    with count_forwards(lm.model) as calls:
        assert generate(lm.model, [prompt], gc, lm.decode, permuted)[0] == plain
    assert calls == [len(prompt) - 1] + [8] * 6, calls  # every guess right: 7 and the model's own each forward
    with count_forwards(lm.model) as same:
        assert lm.generate_ids([prompt], assistant_model=neolm.load(), **knobs, **guessing)[0] == plain
    assert same == calls
    sampled = lm.generation_config(max_new_tokens=48, do_sample=True, seed=3, temperature=0.8, **guessing)
    with count_forwards(lm.model) as calls:
        tokens = generate(lm.model, [prompt], sampled, lm.decode, permuted)[0]
    # sampled in the shared tokens (all of them here), through the same processors: q is p, every guess is kept
    assert len(tokens) == 48 and calls == [len(prompt) - 1] + [8] * 6, calls


def test_a_model_of_another_family_and_tokenizer_assists(models, caplog):
    """A GPT-Neo (GPT-2's tokenizer) assists a GPT-NeoX (its own): the model's greedy tokens and text, from the
    text API (which sees the tokenizers differ) and from generate with a Universal, whatever the knobs."""
    target, assistant = models["neox-parallel-pct25"], models["neo"]
    prompt = "The quick brown fox — 日本 — jumps"
    n = 24
    plain = target.generate(prompt, max_new_tokens=n, do_sample=False)
    with caplog.at_level(logging.INFO, logger="neolm.api"):
        assert target.generate(prompt, max_new_tokens=n, do_sample=False, assistant_model=assistant) == plain
    assert "universal assisted generation" in caplog.text
    ids = target.encode(prompt)
    expected = target.generate_ids([ids], max_new_tokens=n, do_sample=False)[0]
    universal = Universal(assistant.model, assistant.tokenizer, target.tokenizer)
    for knobs in (dict(assistant_lookbehind=0, target_lookbehind=0), dict(num_assistant_tokens=3),
                  dict(num_assistant_tokens_schedule="heuristic", assistant_confidence_threshold=0.0)):  # fmt: skip
        gc = target.generation_config(max_new_tokens=n, do_sample=False, **knobs)
        assert generate(target.model, [ids], gc, target.decode, universal)[0] == expected, knobs
    runs = [target.generate_ids([ids, ids[:3]], max_new_tokens=12, do_sample=True, seed=s, assistant_model=assistant)
            for s in (1, 1, 2)]  # fmt: skip
    assert runs[0] == runs[1] and runs[0] != runs[2] and all(len(r) == 12 for r in runs[0])


def test_ensemble_verification(models):
    """assistant_ensemble_weight w checks the guesses against w p + (1 - w) q: with w near 0, the assistant's
    guesses are all kept (greedy and sampled; sampled, from an assistant of another tokenizer too), at w near 1
    the text is the model's greedy text again."""
    lm, small = models["neox-parallel-pct25"], models["neox-sequential-pct100"]
    prompt, n = [5, 17, 99, 1000, 7, 7, 42], 20
    knobs = dict(max_new_tokens=n, assistant_model=small, num_assistant_tokens=4, assistant_confidence_threshold=0.0)
    plain = lm.generate_ids([prompt], max_new_tokens=n, do_sample=False)[0]
    for sample in (False, True):
        with count_forwards(lm.model) as calls:
            lm.generate_ids([prompt], do_sample=sample, seed=0, assistant_ensemble_weight=1e-6, **knobs)
        assert calls[1:] == [5] * (n // 5), calls
    assert lm.generate_ids([prompt], do_sample=False, assistant_ensemble_weight=1 - 1e-9, **knobs)[0] == plain
    knobs["assistant_model"] = models["neo"]  # another tokenizer, sampled: its q is in the model's vocabulary
    with count_forwards(lm.model) as calls:
        lm.generate_ids([prompt], do_sample=True, seed=0, assistant_ensemble_weight=1e-6, **knobs)
    assert calls[1:] == [5] * (n // 5), calls
    bad = [
        (dict(assistant_ensemble_weight=1.0), "assistant_ensemble_weight must be in \\(0, 1\\)"),
        (dict(assistant_ensemble_weight=0.5, prompt_lookup_num_tokens=2), "prompt lookup has none"),
        (dict(assistant_ensemble_weight=0.5, assistant_model=models["neo"]), "another tokenizer, sampled"),
        (dict(assistant_lookbehind=-1, assistant_model=models["neo"]), "assistant_lookbehind must be a number"),
        (dict(target_lookbehind=1.5, assistant_model=models["neo"]), "target_lookbehind must be a number"),
    ]
    for args, message in bad:
        with pytest.raises(NeolmError, match=message):
            lm.generate_ids([prompt], max_new_tokens=3, **args)


def test_the_shared_tokens_of_two_vocabularies(models):
    """GPT-2's and GPT-NeoX's vocabularies share most tokens: each pair spells the same bytes, one to one, and
    special tokens are never shared."""
    neox, neo = models["neox-parallel-pct25"].tokenizer, models["neo"].tokenizer
    to_target, to_assistant = shared_tokens(neo, neox, neo.vocab_size, 50304)
    pairs = [(a, t) for a, t in enumerate(to_target.tolist()) if t >= 0]
    assert 35000 < len(pairs) < neo.vocab_size  # (36,937 of GPT-2's 50,257)
    assert all(neo.token_bytes(a) == neox.token_bytes(t) and to_assistant[t] == a for a, t in pairs)
    assert (to_assistant >= 0).sum() == len(pairs) and to_assistant[neox.vocab_size :].eq(-1).all()
    assert all(to_target[i] < 0 for i in neo.special_ids()) and all(to_assistant[i] < 0 for i in neox.special_ids())
    same = shared_tokens(neo, neo, neo.vocab_size, neo.vocab_size)[0]
    special = neo.special_ids()
    assert all(t == (-1 if a in special else a) for a, t in enumerate(same.tolist()))


def test_sampled_guesses_keep_the_models_distribution(lm, permuted):
    """Universal speculative decoding is lossless: an assistant that only roughly predicts the model (the
    permuted bundled model, its final LayerNorm disturbed) guesses a first token that is sometimes kept and
    sometimes not, and over many seeds that token follows the model's own top-5 distribution."""
    noisy = neolm.load().model
    with torch.no_grad():
        noisy.wte.weight.copy_(permuted.model.wte.weight)
        noise = torch.randn(noisy.ln_f.weight.shape, generator=torch.Generator().manual_seed(1))
        noisy.ln_f.weight.mul_(1 + 0.5 * noise)
    noisy.config = permuted.model.config
    assistant = Universal(noisy, permuted.tokenizer, permuted.target_tokenizer)
    prompt = lm.encode("The king said that")
    knobs = dict(max_new_tokens=2, do_sample=True, top_k=5, temperature=1.0, repetition_penalty=1.0,
                 num_assistant_tokens=1, assistant_confidence_threshold=0.0)  # fmt: skip
    with torch.no_grad():
        logits = lm.model(torch.tensor([prompt]))[0, -1].float()
    top = logits.topk(5)
    p = dict(zip(top.indices.tolist(), top.values.softmax(dim=-1).tolist()))
    runs, counts, kept = 400, dict.fromkeys(p, 0), 0
    for seed in range(runs):
        gc = lm.generation_config(seed=seed, **knobs)
        with count_forwards(lm.model) as calls:
            first = generate(lm.model, [prompt], gc, lm.decode, assistant)[0][0]
        counts[first] += 1
        kept += len(calls) == 2  # the prompt, then one forward that kept the guess and sampled the second token
    assert 0.2 * runs < kept < 0.95 * runs, kept  # both the kept guesses and the residual draws are exercised
    assert max(abs(counts[t] / runs - p[t]) for t in p) < 0.06, (counts, p)
