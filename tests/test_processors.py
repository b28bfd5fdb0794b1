"""transformers' other logits processors and warpers (neolm.sampling.Processors) and OpenAI's presence and
frequency penalties: each against transformers, and mixed in one DecodeBatch."""

from __future__ import annotations

import pytest
import torch
from test_generate import hf_generate, run_plan

import neolm
from neolm.generate import DecodeBatch, prompt_tokens
from neolm.generation_config import GenerationConfig
from neolm.sampling import Processors, RowState

PROMPT = [3, 3, 4, 5, 3, 4, 9, 3, 4]


def _knobs(free: list[int]) -> list[dict]:
    """Settings that each change the greedy continuation `free`, built from its tokens."""
    return [
        dict(no_repeat_ngram_size=2),
        dict(no_repeat_ngram_size=1),
        dict(bad_words_ids=[[free[2]], [free[4], free[5]]]),
        dict(sequence_bias={(free[1],): -4.0, (free[5], free[6]): -20.0, (free[0],): 0.5}),
        dict(sequence_bias=[[[free[3]], -30.0]]),  # transformers' list form
        dict(suppress_tokens=[free[0], free[3]]),
        dict(begin_suppress_tokens=[free[0]]),
        dict(forced_eos_token_id=free[1], eos_token_id=free[1]),
        dict(exponential_decay_length_penalty=(2, 1.6), eos_token_id=free[8]),
        dict(repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids=[[free[1]]], suppress_tokens=[free[2]]),
        dict(encoder_repetition_penalty=4.0),  # the prompt's tokens favoured
        dict(sequence_bias={(4,): 1.0}, encoder_repetition_penalty=3.0),
        dict(encoder_repetition_penalty=4.0, encoder_no_repeat_ngram_size=2),  # prompt favoured, its bigrams banned
    ]


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_processors_match_transformers(tiny_checkpoints, name):
    """Greedy text with each processor is transformers' (which applies them in the same order), and differs
    from the text without it (n-gram bans alone: which these random weights may not need, holds)."""
    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    n = 16
    free = lm.generate_ids([PROMPT], max_new_tokens=n, do_sample=False)[0]
    for knobs in _knobs(free):
        ours = lm.generate_ids([PROMPT], max_new_tokens=n, do_sample=False, **knobs)[0]
        ref = hf_generate(hf, PROMPT, max_new_tokens=n, **knobs)
        eos = knobs.get("eos_token_id", hf.config.eos_token_id)
        if eos in ref:
            ref = ref[: ref.index(eos) + 1]
        assert ours == ref, knobs
        if list(knobs) == ["no_repeat_ngram_size"]:  # no n-gram ending in the new tokens occurred before
            k, held = knobs["no_repeat_ngram_size"], PROMPT + ours
            grams = [tuple(held[i : i + k]) for i in range(len(held) - k + 1)]
            assert all(g not in grams[:i] for i, g in enumerate(grams) if i + k > len(PROMPT)), knobs
        else:
            assert ours != free, knobs


def test_prompt_processors_in_every_mode(tiny_checkpoints):
    """encoder_repetition_penalty, encoder_no_repeat_ngram_size and forced_bos_token_id as transformers gives them
    with beams too; the same tokens in a batch beside rows without them, and in assisted generation;
    forced_bos_token_id acts only on the first new token of a one-token prompt (transformers' rule: the sequence so
    far is one token). transformers' order: sequence_bias, encoder_repetition_penalty, repetition_penalty."""
    hf, folder = tiny_checkpoints["neox-parallel-pct25"]
    lm = neolm.load(folder)
    free = lm.generate_ids([PROMPT], max_new_tokens=16, do_sample=False)[0]
    for knobs in (dict(encoder_repetition_penalty=4.0), dict(encoder_repetition_penalty=4.0, repetition_penalty=1.2)):
        ours = lm.generate_ids([PROMPT], max_new_tokens=16, do_sample=False, num_beams=3, **knobs)[0]
        assert ours == hf_generate(hf, PROMPT, max_new_tokens=16, num_beams=3, **knobs), knobs
        alone = lm.generate_ids([PROMPT], max_new_tokens=16, do_sample=False, **knobs)[0]
        assert alone != free, knobs
        assert lm.generate_ids([PROMPT], max_new_tokens=16, do_sample=False, prompt_lookup_num_tokens=2,
                               **knobs)[0] == alone  # fmt: skip
        batch = DecodeBatch(lm.model)
        ids = batch.add([PROMPT[:5]], GenerationConfig(max_new_tokens=16).validated())
        ids += batch.add([PROMPT], GenerationConfig(max_new_tokens=16, **knobs).validated())
        got = {i: [] for i in ids}
        while not batch.finished:
            step = batch.step()
            for i, token in zip(step.ids, step.tokens):
                if token is not None:
                    got[i].append(token)
        assert got[ids[1]] == alone
        assert got[ids[0]] == lm.generate_ids([PROMPT[:5]], max_new_tokens=16, do_sample=False)[0]
    from transformers.generation.logits_process import (
        EncoderRepetitionPenaltyLogitsProcessor,
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )  # fmt: skip

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))  # (the order matters: signs change)
    held, prompt = [[3, 3, 4, 5, 9, 30], [7, 1, 2, 8, 9, 10]], [[3, 3, 4, 5], [7, 1, 2]]
    knobs = dict(sequence_bias={(4,): 1.0, (9,): -1.5}, encoder_repetition_penalty=2.5, repetition_penalty=1.3)
    gc = GenerationConfig(**knobs).validated()
    state = RowState(seen=prompt_tokens(held, 50, "cpu"), prompted=prompt_tokens(prompt, 50, "cpu"), tokens=held)
    ours = Processors(gc, [], 50, "cpu")(logits.clone(), state)
    ref = LogitsProcessorList([SequenceBiasLogitsProcessor({(4,): 1.0, (9,): -1.5}),
                               EncoderRepetitionPenaltyLogitsProcessor(2.5, torch.tensor([[3, 3, 4, 5], [7, 1, 2, 1]])),
                               RepetitionPenaltyLogitsProcessor(1.3)])(torch.tensor(held), logits.clone())  # fmt: skip
    assert torch.allclose(ours, ref)
    loop = dict(sequence_bias={(4, 9): 100.0, (9, 3): 100.0, (3, 4): 100.0})  # round the prompt's 4 9 3 4
    copying = lm.generate_ids([PROMPT], max_new_tokens=16, do_sample=False, **loop)[0]
    barred = lm.generate_ids([PROMPT], max_new_tokens=16, do_sample=False, encoder_no_repeat_ngram_size=2, **loop)[0]
    assert barred == hf_generate(hf, PROMPT, max_new_tokens=16, encoder_no_repeat_ngram_size=2, **loop)
    bigrams = set(zip(PROMPT, PROMPT[1:]))
    assert set(zip(PROMPT[-1:] + copying, copying)) & bigrams and not set(zip(PROMPT[-1:] + barred, barred)) & bigrams
    knobs = dict(encoder_repetition_penalty=4.0, encoder_no_repeat_ngram_size=1)  # no token of the prompt at all
    unigrams = lm.generate_ids([PROMPT], max_new_tokens=16, do_sample=False, **knobs)[0]
    assert unigrams == hf_generate(hf, PROMPT, max_new_tokens=16, **knobs) and not set(unigrams) & set(PROMPT)
    bos = free[3]
    for prompt in ([7], [7, 8]):
        ours = lm.generate_ids([prompt], max_new_tokens=6, do_sample=False, forced_bos_token_id=bos)[0]
        assert ours == hf_generate(hf, prompt, max_new_tokens=6, forced_bos_token_id=bos)
        plain = lm.generate_ids([prompt], max_new_tokens=6, do_sample=False)[0]
        assert ours == ([bos] + ours[1:] if len(prompt) == 1 else plain) and plain[0] != bos
        beams = lm.generate_ids([prompt], max_new_tokens=6, do_sample=False, num_beams=2, forced_bos_token_id=bos)
        assert beams[0] == hf_generate(hf, prompt, max_new_tokens=6, num_beams=2, forced_bos_token_id=bos)
    for bad in (dict(encoder_repetition_penalty=0), dict(encoder_repetition_penalty=float("nan")),
                dict(forced_bos_token_id=-1), dict(forced_bos_token_id=[3]), dict(forced_bos_token_id=10**9),
                dict(encoder_no_repeat_ngram_size=-1)):
        with pytest.raises(neolm.NeolmError, match=next(iter(bad))):
            lm.generate_ids([PROMPT], max_new_tokens=2, **bad)


@pytest.mark.parametrize("keep", [1, 3])
def test_warpers_match_transformers(keep):
    """min_p, typical_p, epsilon_cutoff, eta_cutoff and top_h with top-k/top-p and temperature, as transformers'
    warpers (in its order), keeping at least `keep` tokens (beam sampling keeps len(eos) + 1); and
    remove_invalid_values."""
    from transformers.generation.logits_process import (
        EpsilonLogitsWarper,
        EtaLogitsWarper,
        InfNanRemoveLogitsProcessor,
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopHLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )  # fmt: skip

    logits = torch.randn(5, 3000, generator=torch.Generator().manual_seed(0)) * 4
    cases = [
        (dict(min_p=0.05), [MinPLogitsWarper(0.05, min_tokens_to_keep=keep)]),
        (dict(min_p=0.9), [MinPLogitsWarper(0.9, min_tokens_to_keep=keep)]),
        (dict(typical_p=0.7), [TypicalLogitsWarper(0.7, min_tokens_to_keep=keep)]),
        (dict(epsilon_cutoff=3e-3), [EpsilonLogitsWarper(3e-3, min_tokens_to_keep=keep)]),
        (dict(eta_cutoff=1e-3), [EtaLogitsWarper(1e-3, min_tokens_to_keep=keep)]),
        (dict(eta_cutoff=0.2), [EtaLogitsWarper(0.2, min_tokens_to_keep=keep)]),
        (dict(top_h=0.4), [TopHLogitsWarper(0.4)]),
        (dict(top_h=0.9, temperature=1.5, top_k=40), [TemperatureLogitsWarper(1.5), TopHLogitsWarper(0.9),
                                                      TopKLogitsWarper(40, min_tokens_to_keep=keep)]),
        (dict(temperature=0.7, top_k=200, top_p=0.9, min_p=0.02, typical_p=0.95),
         [TemperatureLogitsWarper(0.7), TopKLogitsWarper(200, min_tokens_to_keep=keep),
          TopPLogitsWarper(0.9, min_tokens_to_keep=keep), MinPLogitsWarper(0.02, min_tokens_to_keep=keep),
          TypicalLogitsWarper(0.95, min_tokens_to_keep=keep)]),
    ]  # fmt: skip
    spoilt = logits.clone()
    spoilt[0, 5], spoilt[1, 7], spoilt[2, 9] = float("nan"), float("inf"), -float("inf")
    gc = GenerationConfig(remove_invalid_values=True).validated()
    ours = Processors(gc, [], 3000, "cpu")(spoilt.clone(), RowState())
    assert torch.equal(ours, InfNanRemoveLogitsProcessor()(None, spoilt.clone()))  # nan 0, +-inf the largest floats
    for knobs, warpers in cases:
        gc = GenerationConfig(do_sample=True, top_k=knobs.pop("top_k", 0), **knobs).validated()
        ours = Processors(gc, [], 3000, "cpu", min_tokens_to_keep=keep)(logits.clone(), RowState())
        ref = LogitsProcessorList(warpers)(None, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), knobs
        assert torch.allclose(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)]), knobs
        if "top_h" not in knobs:  # (transformers' top-H keeps the likeliest only, whatever min_tokens_to_keep)
            assert (~torch.isinf(ours)).sum(dim=1).min() >= keep
        assert torch.isinf(ours).any(), knobs  # it removed something


def test_max_time_ends_every_kind_of_generation(tiny_checkpoints, monkeypatch):
    """max_time ends each sequence with the first token after it, in plain, batched, beam and assisted
    generation alike (a clock that moves 1 s per reading: the deadline passes after a few tokens)."""
    import itertools
    import time

    lm = neolm.load(tiny_checkpoints["neo"][1])
    clock = itertools.count()
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))
    kw = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False)
    for extra in ({}, {"num_beams": 2}, {"prompt_lookup_num_tokens": 3}):
        full = lm.generate_ids([PROMPT, PROMPT[:4]], **kw, **extra)
        timed = lm.generate_ids([PROMPT, PROMPT[:4]], max_time=4.5, **kw, **extra)
        assert all(len(f) == 30 for f in full), extra
        assert all(1 <= len(t) < 30 and f[: len(t)] == t for f, t in zip(full, timed)), (extra, timed)
    with pytest.raises(neolm.NeolmError, match="max_time"):
        lm.generate_ids([PROMPT], max_time=0)


class EndAt:
    """A stopping criterion in transformers' form: ends a sequence once its last token is `token`."""

    def __init__(self, token: int):
        self.token, self.seen_shapes = token, set()

    def __call__(self, input_ids, scores, **kwargs):
        self.seen_shapes.add(None if scores is None else tuple(scores.shape))  # (transformers: None)
        return input_ids[:, -1] == self.token


class Penalise:
    """A logits processor in transformers' form: lowers the logits of tokens that are 1 mod 3 below the last id."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for row, last in enumerate(input_ids[:, -1].tolist()):
            scores[row, [t for t in range(max(0, last - 30), last) if t % 3 == 1]] -= 5.0
        return scores


def allowed_after(batch_id: int, input_ids) -> list[int]:
    """A prefix_allowed_tokens_fn: the next token comes from a set that depends on the prompt and the last token."""
    last = int(input_ids[-1])
    return [(last * 7 + k * 13 + batch_id * 101) % 1000 for k in range(5)]


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_callers_processors_criteria_and_allowed_tokens_match_transformers(tiny_checkpoints, name):
    """logits_processor, prefix_allowed_tokens_fn and stopping_criteria, as transformers.generate takes them, give
    its greedy text, beam search's hypotheses and prompt lookup's text."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    n = 14
    free = lm.generate_ids([PROMPT], max_new_tokens=n, do_sample=False)[0]
    for extra in ({}, {"num_beams": 3}, {"prompt_lookup_num_tokens": 3}):
        kw = dict(max_new_tokens=n, **extra)
        ours = lm.generate_ids([PROMPT], logits_processor=[Penalise()], prefix_allowed_tokens_fn=allowed_after,
                               do_sample=False, **kw)  # fmt: skip
        ref = hf_generate(hf, PROMPT, logits_processor=LogitsProcessorList([Penalise()]),
                          prefix_allowed_tokens_fn=allowed_after, **kw)  # fmt: skip
        assert ours[0] == ref and ours[0] != free, extra
        assert all(t in allowed_after(0, torch.tensor(PROMPT + ours[0][:i])) for i, t in enumerate(ours[0]))
        plain = lm.generate_ids([PROMPT], do_sample=False, **kw)[0]
        end = EndAt(plain[5])
        stopped = lm.generate_ids([PROMPT], stopping_criteria=[end], do_sample=False, **kw)[0]
        ref = hf_generate(hf, PROMPT, stopping_criteria=StoppingCriteriaList([end]), **kw)
        assert stopped == ref and stopped != plain, extra
        if not extra.get("num_beams"):  # (beams: a candidate that ends is a finished hypothesis, as with eos, and
            assert stopped == plain[: len(stopped)] and stopped[-1] == end.token, extra  # may lose to a longer one)
    assert (1, hf.config.vocab_size) in end.seen_shapes  # neolm gives each sequence's (or candidate's) scores


def test_callers_functions_see_each_sequence_alone_in_a_batch(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1])
    prompts = [PROMPT, [5, 6, 7], [9] * 12]
    kw = dict(max_new_tokens=10, do_sample=False, logits_processor=[Penalise()])
    batched = lm.generate_ids(prompts, prefix_allowed_tokens_fn=allowed_after, **kw)
    for i, p in enumerate(prompts):  # batch_id is the prompt's place in the call
        alone = lm.generate_ids([p], prefix_allowed_tokens_fn=lambda _, ids, i=i: allowed_after(i, ids), **kw)
        assert batched[i] == alone[0]
    ends = [EndAt(seq[3]) for seq in batched]
    stopped = lm.generate_ids(prompts, prefix_allowed_tokens_fn=allowed_after, stopping_criteria=[ends[1]], **kw)
    assert stopped[1] == batched[1][:4]
    assert all(s == b[: len(s)] for s, b in zip(stopped, batched))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(logits_processor=Penalise()), "logits_processor must be a list of callables"),
        (dict(stopping_criteria=[1]), "stopping_criteria must be a list of callables"),
        (dict(prefix_allowed_tokens_fn=[1, 2]), "prefix_allowed_tokens_fn must be a callable"),
        (dict(logits_processor=[lambda ids, scores: scores[0]]), "must return the scores"),
        (dict(prefix_allowed_tokens_fn=lambda b, ids: []), "allowed no token"),
    ],
)
def test_bad_callers_functions(tiny_checkpoints, kwargs, message):
    lm = neolm.load(tiny_checkpoints["neo"][1])
    with pytest.raises(neolm.NeolmError, match=message):
        lm.generate_ids([PROMPT], max_new_tokens=3, do_sample=False, **kwargs)


def test_presence_and_frequency_penalties_are_openai_s(tiny_checkpoints):
    """Greedy with OpenAI's penalties equals a reference loop over transformers' logits of the whole sequence:
    logit - frequency_penalty x count - presence_penalty x (count > 0), counting generated tokens only."""
    hf, folder = tiny_checkpoints["neox-parallel-pct25"]
    lm = neolm.load(folder)
    for presence, frequency in ((1.5, 0.0), (0.0, 1.0), (0.7, 0.4), (-1.0, 0.0)):
        tokens, made = list(PROMPT), torch.zeros(hf.config.vocab_size)
        for _ in range(14):
            with torch.no_grad():
                logits = hf(torch.tensor([tokens])).logits[0, -1].float()
            logits = logits - frequency * made - presence * (made > 0).float()
            tokens.append(int(logits.argmax()))
            made[tokens[-1]] += 1
        ours = lm.generate_ids([PROMPT], max_new_tokens=14, min_new_tokens=14, do_sample=False,
                               presence_penalty=presence, frequency_penalty=frequency)[0]  # fmt: skip
        assert ours == tokens[len(PROMPT) :], (presence, frequency)
    free = lm.generate_ids([PROMPT], max_new_tokens=14, min_new_tokens=14, do_sample=False)[0]
    assert ours != free


def test_settings_that_read_histories_mix_in_one_batch(tiny_checkpoints):
    """Sequences with n-gram bans, token-sequence biases and penalties join a running batch between steps, and
    each gets its tokens alone."""
    lm = neolm.load(tiny_checkpoints["neo"][1])
    plan = {
        0: ([5, 6, 7, 5, 6, 7], GenerationConfig(max_new_tokens=20, do_sample=False, no_repeat_ngram_size=2)),
        2: ([2, 2, 2], GenerationConfig(max_new_tokens=12, do_sample=False, frequency_penalty=1.0)),
        3: ([9, 8], GenerationConfig(max_new_tokens=15, do_sample=False)),
        5: ([1, 2, 3, 4], GenerationConfig(max_new_tokens=10, do_sample=False, sequence_bias={(5, 6): -9.0},
                                           presence_penalty=2.0, repetition_penalty=1.2)),
    }  # fmt: skip
    got, settings = run_plan(DecodeBatch(lm.model), plan)
    assert len(got) == 4
    for i, (prompt, gc) in settings.items():
        assert got[i] == lm.generate_ids([prompt], **{k: getattr(gc, k) for k in gc.field_names()})[0], prompt


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(bad_words_ids=[5, 6]), "bad_words_ids must be a non-empty list of non-empty lists"),
        (dict(bad_words_ids=[[]]), "bad_words_ids"),
        (dict(suppress_tokens=[-1]), "suppress_tokens"),
        (dict(sequence_bias={(1,): "x"}), "biases must be numbers"),
        (dict(sequence_bias={}), "sequence_bias must map"),
        (dict(exponential_decay_length_penalty=(2, 0)), "exponential_decay_length_penalty"),
        (dict(min_p=1.5), "min_p"),
        (dict(typical_p=0), "typical_p"),
        (dict(epsilon_cutoff=1), "epsilon_cutoff"),
        (dict(presence_penalty=3), "presence_penalty must be between -2 and 2"),
    ],
)
def test_bad_processor_arguments(tiny_checkpoints, kwargs, message):
    lm = neolm.load(tiny_checkpoints["neo"][1])
    with pytest.raises(neolm.NeolmError, match=message):
        lm.generate("hi", **kwargs)


def test_neolm_generate_takes_the_prompt_knobs(capsys, tiny_checkpoints):
    """--encoder-repetition-penalty and --prefill-chunk-size give what the library gives; a bad value is one line
    on stderr."""
    from test_cli import assert_one_line_error, cli

    folder = tiny_checkpoints["neox-parallel-pct25"][1]
    lm = neolm.load(folder)
    prompt = "The quick brown fox jumps over the lazy dog, and the quick brown fox"
    base = ("generate", prompt, "--model", str(folder), "--max-new-tokens", "12", "--no-echo", "--no-stream")
    code, out, _ = cli(capsys, *base, "--encoder-repetition-penalty", "4", "--prefill-chunk-size", "4")
    expected = lm.generate(prompt, max_new_tokens=12, encoder_repetition_penalty=4.0)
    assert code == 0 and out == expected + "\n" and expected != lm.generate(prompt, max_new_tokens=12)
    code, _, err = cli(capsys, *base, "--prefill-chunk-size", "0")
    assert_one_line_error(code, err, "--prefill-chunk-size")
