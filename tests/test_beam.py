"""Beam search (neolm.beam) against transformers' generate(num_beams=...), and its own guarantees."""

from __future__ import annotations

import pytest
import torch
from test_generate import hf_generate, hf_tokenizer

import neolm
from neolm.errors import NeolmError


def hf_beams(hf, prompt: list[int], **kwargs) -> list[list[int]]:
    """transformers' hypotheses, new tokens only, without the padding after a shorter one (an id past the
    vocabulary: it is only written to the output)."""
    ids, pad = torch.tensor([prompt]), hf.config.vocab_size
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=pad, **kwargs)
    return [[t for t in row if t != pad] for row in out[:, len(prompt) :].tolist()]


SETTINGS = [
    dict(num_beams=4),
    dict(num_beams=3, num_return_sequences=3, length_penalty=0.5),
    dict(num_beams=4, num_return_sequences=2, early_stopping=True),
    dict(num_beams=4, num_return_sequences=4, early_stopping="never", length_penalty=2.0),
    dict(num_beams=2, no_repeat_ngram_size=2, repetition_penalty=1.3),
]


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25", "neox-sequential-pct100"])
def test_beam_search_matches_transformers(tiny_checkpoints, name):
    """The same hypotheses in the same order, where beams end early at eos (three likely tokens made eos) and
    where they run to the length limit, for each early_stopping and some length penalties and processors."""
    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    early = 0
    for prompt in ([11, 22, 33, 44, 55, 66, 77], [5, 6, 7, 5, 6, 7, 5, 6]):
        greedy = hf_generate(hf, prompt, max_new_tokens=8, min_new_tokens=8)
        for settings in SETTINGS:
            for eos in (None, [greedy[1], greedy[2], greedy[5]]):
                kw = dict(settings, max_new_tokens=14) | ({"eos_token_id": eos} if eos else {})
                ours = lm.generate_ids([prompt], do_sample=False, **kw)
                assert ours == hf_beams(hf, prompt, **kw), (prompt, kw)
                early += sum(len(h) < 14 for h in ours)
    assert early >= 5  # hypotheses that ended at eos were compared too


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_batched_beam_search_equals_each_prompt_alone(tiny_checkpoints, name):
    """Prompts of different lengths, batched (left-padded), get their own hypotheses, with budgets of their own
    (max_length) and a stop of their own (eos)."""
    lm = neolm.load(tiny_checkpoints[name][1])
    prompts = [[5, 6, 7], list(range(100, 117)), [9] * 9]
    for kw in (dict(max_new_tokens=12), dict(max_length=24, eos_token_id=[13, 11, 198, 262])):
        kw |= dict(num_beams=3, num_return_sequences=2, do_sample=False)
        batched = lm.generate_ids(prompts, **kw)
        alone = [h for p in prompts for h in lm.generate_ids([p], **kw)]
        assert batched == alone
    assert [len(h) for h in lm.generate_ids(prompts, max_length=24, num_beams=3, do_sample=False,
                                            eos_token_id=-1 % 50257)] == [21, 7, 15]  # fmt: skip


def test_beam_search_text_api_and_errors(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1])
    texts = lm.generate("The quick brown fox", num_beams=3, num_return_sequences=3, max_new_tokens=8, do_sample=False)
    assert isinstance(texts, list) and len(texts) == 3
    ids = lm.generate_ids([lm.encode("The quick brown fox")], num_beams=3, num_return_sequences=3,
                          max_new_tokens=8, do_sample=False)  # fmt: skip
    assert texts == [lm.decode(h) for h in ids]
    with pytest.raises(NeolmError, match="cannot be streamed"):
        lm.stream("hi", num_beams=2)
    with pytest.raises(NeolmError, match=r"num_return_sequences \(3\) must be <= num_beams \(2\)"):
        lm.generate("hi", num_beams=2, num_return_sequences=3)
    with pytest.raises(NeolmError, match="early_stopping"):
        lm.generate("hi", num_beams=2, early_stopping="sometimes")
    with pytest.raises(NeolmError, match="num_beams must be >= 1"):
        lm.generate("hi", num_beams=0)


def test_beam_sampling_is_seeded(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1])
    prompt = lm.encode("The quick brown fox")
    kw = dict(num_beams=4, num_return_sequences=4, max_new_tokens=12, do_sample=True, top_k=20)
    first = lm.generate_ids([prompt], seed=1, **kw)
    assert len(first) == 4 and first == lm.generate_ids([prompt], seed=1, **kw)
    assert any(lm.generate_ids([prompt], seed=s, **kw) != first for s in (2, 3))


def test_beam_search_stop_strings_match_transformers(tiny_checkpoints):
    hf, folder = tiny_checkpoints["neox-parallel-pct25"]
    lm = neolm.load(folder)
    prompt = lm.encode("The quick brown fox")
    kw = dict(num_beams=4, num_return_sequences=4, max_new_tokens=12)
    ended = 0
    for stop_at in (1, 3, 5):
        stop = lm.decode(hf_generate(hf, prompt, max_new_tokens=8, min_new_tokens=8)[stop_at : stop_at + 1]).strip()
        ours = lm.generate_ids([prompt], do_sample=False, stop_strings=[stop], **kw)
        assert ours == hf_beams(hf, prompt, stop_strings=[stop], tokenizer=hf_tokenizer(), **kw)
        ended += sum(len(h) < 12 and stop in lm.decode(prompt + h)[-len(stop) - 8 :] for h in ours)
    assert ended  # some hypotheses ended at the stop string
