"""Beam search (neolm.beam) against transformers' generate(num_beams=...), and its own guarantees."""

from __future__ import annotations

import json
from pathlib import Path

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


def diverse_reference(hf, prompt: list[int], num_beams: int, groups: int, penalty: float, n: int,
                      eos: list[int] = (), length_penalty: float = 1.0, repetition_penalty: float = 1.0,
                      pad: int = 0) -> list[tuple[float, list[int]]]:  # fmt: skip
    """Diverse beam search (Vijayakumar et al. 2016) as transformers 4 ran it (_group_beam_search, now on the hub),
    written plainly on transformers' model without a cache: each step the groups choose in turn; a group's
    log-probabilities lose `penalty` per time a group before it chose the token this step; each group is a beam
    search of its own (num_beams / groups beams, its own finished hypotheses, early_stopping False), and one that
    is done chooses `pad`. All the groups' hypotheses as (score, new tokens), best first."""
    size, vocab = num_beams // groups, hf.config.vocab_size
    beams = [([], 0.0 if b % size == 0 else -1.0e9) for b in range(num_beams)]  # (new tokens, score), group-major
    hypotheses: list[list[tuple[float, list[int]]]] = [[] for _ in range(groups)]
    done = [False] * groups
    for t in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + seq for seq, _ in beams])).logits[:, -1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        chosen: list[int] = []
        following = []
        for g in range(groups):
            group = beams[g * size : (g + 1) * size]
            if done[g]:
                following += [(group[0][0] + [pad], 0.0)] * size
                chosen += [pad] * size
                continue
            scores = log_probs[g * size : (g + 1) * size].clone()
            for token in chosen:
                scores[:, token] -= penalty
            for row, (seq, _) in enumerate(group):
                seen = torch.tensor(sorted(set(prompt + seq)))
                scores[row, seen] = torch.where(scores[row, seen] < 0, scores[row, seen] * repetition_penalty,
                                                scores[row, seen] / repetition_penalty)  # fmt: skip
            total = (scores + torch.tensor([score for _, score in group])[:, None]).view(-1)
            top, index = total.topk(max(2, 1 + len(eos)) * size)
            kept = []
            for rank, (score, i) in enumerate(zip(top.tolist(), index.tolist())):
                seq = group[i // vocab][0] + [i % vocab]
                if i % vocab in eos:
                    if rank < size:
                        hypotheses[g] = sorted(hypotheses[g] + [(score / (t + 1) ** length_penalty, seq)],
                                               key=lambda h: -h[0])[:size]  # fmt: skip
                else:
                    kept.append((seq, score))
                if len(kept) == size:
                    break
            full = len(hypotheses[g]) == size
            done[g] = full and hypotheses[g][-1][0] >= top.max().item() / (t + 1) ** length_penalty
            following += kept
            chosen += [seq[-1] for seq, _ in kept]
        beams = following
        if all(done):
            break
    for g in range(groups):  # the groups still searching at the end keep their beams as they are
        if not done[g]:
            for seq, score in beams[g * size : (g + 1) * size]:
                hypotheses[g] = sorted(hypotheses[g] + [(score / len(seq) ** length_penalty, seq)],
                                       key=lambda h: -h[0])[:size]  # fmt: skip
    return sorted((h for group in hypotheses for h in group), key=lambda h: -h[0])


DIVERSE = [
    dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=4),
    dict(num_beams=6, num_beam_groups=3, diversity_penalty=0.5, num_return_sequences=3, length_penalty=0.7),
    dict(num_beams=3, num_beam_groups=3, diversity_penalty=2.0, num_return_sequences=2, repetition_penalty=1.3),
]


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_diverse_beam_search_follows_its_rule(tiny_checkpoints, name):
    """num_beam_groups and diversity_penalty: the hypotheses and their scores are the rule's (run on
    transformers' model), where beams run to the length limit and where groups end early at eos; a batch gives
    each prompt what it gets alone; with a penalty the groups' best hypotheses differ, without one each group is
    plain beam search with its share of the beams."""
    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    prompts = [[11, 22, 33, 44, 55, 66, 77], [5, 6, 7, 5, 6, 7, 5, 6]]
    early = 0
    for prompt in prompts:
        greedy = hf_generate(hf, prompt, max_new_tokens=8, min_new_tokens=8)
        for settings in DIVERSE:
            for eos in ([], [greedy[1], greedy[2], greedy[5]]):
                kw = dict(settings, max_new_tokens=10, do_sample=False, eos_token_id=eos)
                out = lm.generate_ids([prompt], return_dict_in_generate=True, **kw)
                rule = diverse_reference(hf, prompt, kw["num_beams"], kw["num_beam_groups"], kw["diversity_penalty"],
                                         10, eos, kw.get("length_penalty", 1.0), kw.get("repetition_penalty", 1.0),
                                         pad=eos[0] if eos else 0)[: kw["num_return_sequences"]]  # fmt: skip
                assert out.sequences == [seq for _, seq in rule], (prompt, kw)
                assert out.sequences_scores == pytest.approx([score for score, _ in rule], abs=1e-4)
                early += sum(len(h) < 10 for h in out.sequences)
    assert early >= 3  # hypotheses that ended at eos were compared too
    kw = dict(DIVERSE[1], max_new_tokens=10, do_sample=False, eos_token_id=[13, 11, 198])
    assert lm.generate_ids(prompts, **kw) == [h for p in prompts for h in lm.generate_ids([p], **kw)]
    both = dict(num_beams=4, num_beam_groups=2, num_return_sequences=4, max_new_tokens=10, do_sample=False)
    plain = lm.generate_ids([prompts[0]], num_beams=2, num_return_sequences=2, max_new_tokens=10, do_sample=False)
    assert lm.generate_ids([prompts[0]], **both) == [plain[0], plain[0], plain[1], plain[1]]
    diverse = lm.generate_ids([prompts[0]], **both, diversity_penalty=3.0)
    assert diverse[0] == plain[0] and len({tuple(h[:1]) for h in diverse}) > 1


def test_diverse_beam_search_scores_and_refusals(tiny_checkpoints):
    """output_scores give each token's row as the group chose it (its penalty included); the text API turns the
    checkpoint's sampling default off for it; settings that do not fit are refused."""
    hf, folder = tiny_checkpoints["neox-parallel-pct25"]
    lm = neolm.load(folder)
    prompt = [11, 22, 33, 44, 55, 66, 77]
    kw = dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=4, max_new_tokens=6,
              do_sample=False, eos_token_id=None, length_penalty=0.0)  # fmt: skip
    out = lm.generate_ids([prompt], return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    for seq, score, scores, logits in zip(out.sequences, out.sequences_scores, out.scores, out.logits):
        picked = scores[torch.arange(len(seq)), seq]
        assert picked.sum().item() == pytest.approx(score, abs=1e-4)  # length_penalty 0: the summed scores
        with torch.no_grad():
            full = hf(torch.tensor([prompt + seq])).logits[0, len(prompt) - 1 : -1]
        assert (logits - full).abs().max().item() <= 1e-4
    lm.generation_defaults = {"do_sample": True, "top_k": 5}
    assert lm.generate("The quick brown fox", num_beams=2, num_beam_groups=2, diversity_penalty=1.0, max_new_tokens=4)
    for bad, match in [
        (dict(num_beams=4, num_beam_groups=3), "multiple of 3"),
        (dict(num_beams=1, num_beam_groups=2), "multiple of 2"),
        (dict(num_beams=4, num_beam_groups=2, do_sample=True), "without sampling"),
        (dict(num_beams=4, diversity_penalty=1.0), "set num_beam_groups > 1"),
        (dict(num_beams=4, num_beam_groups=2, diversity_penalty=-1.0), "diversity_penalty must be a number >= 0"),
        (dict(num_beams=4, num_beam_groups=0), "num_beam_groups must be an integer >= 1"),
    ]:
        with pytest.raises(NeolmError, match=match):
            lm.generate("hi", **bad)


GOLDEN = Path(__file__).parent / "golden" / "transformers4_beams.json"  # made by bench/transformers4.py


@pytest.mark.parametrize("kind", ["diverse", "constrained", "likely"])
def test_diverse_and_constrained_beam_search_match_transformers_4(tiny_checkpoints, kind):
    """The hypotheses and scores of transformers 4.46's own _group_beam_search and _constrained_beam_search
    (stored: transformers 5 runs them only from the hub) on the same tiny checkpoints: phrases and choices of
    phrases forced, met late, early (so that hypotheses end at eos) or by the prompt already, with length
    penalties and early_stopping. (Its hypotheses that ended at eos show eos_token_id[0] whichever eos ended
    them: trailing eos tokens are left out of both.)"""
    golden = json.loads(GOLDEN.read_text())
    lms = {name: neolm.load(tiny_checkpoints[name][1]) for name in ("neo", "neox-sequential-pct100")}
    cases = [case for case in golden["cases"] if case["kind"] == kind]
    ended = 0
    for case in cases:
        eos = case["eos"]
        out = lms[case["model"]].generate_ids([case["prompt"]], do_sample=False, max_new_tokens=golden["new_tokens"],
                                               eos_token_id=eos, pad_token_id=eos[0], return_dict_in_generate=True,
                                               **case["settings"])  # fmt: skip
        hypotheses = [h[: max([i + 1 for i, t in enumerate(h) if t not in eos] + [0])] for h in out.sequences]
        assert hypotheses == case["hypotheses"], case
        if case["scores"] is not None:
            assert out.sequences_scores == pytest.approx(case["scores"], abs=1e-4), case
        ended += sum(len(h) < golden["new_tokens"] for h in out.sequences)
    assert len(cases) >= 48 and ended >= {"diverse": 20, "constrained": 1, "likely": 5}[kind]  # (eos-ended too)


def test_constrained_beam_search_guarantees_and_refusals(tiny_checkpoints):
    """The best hypothesis holds the forced phrase and one of a choice's; constraints given as objects with token_ids
    (transformers 4's PhrasalConstraint, neolm.constrained.Phrase/Choice) or as text (force_words) are the same;
    a batch gives each prompt what it gets alone; output_scores sum to each hypothesis's score (length_penalty
    0); a constraint the prompt meets already leaves plain beam search; bad settings are refused."""
    from types import SimpleNamespace

    from neolm.constrained import Choice, Phrase

    hf, folder = tiny_checkpoints["neox-parallel-pct25"]
    lm = neolm.load(folder)
    prompt = lm.encode("The quick brown fox")
    phrase, choice = lm.encode(" jumps over"), [lm.encode(" dog"), lm.encode(" lazy cat")]
    kw = dict(num_beams=4, num_return_sequences=3, max_new_tokens=12, do_sample=False, eos_token_id=[])
    forced = lm.generate_ids([prompt], force_words_ids=[phrase, choice], **kw)

    def holds(seq, ids):
        return any(seq[i : i + len(ids)] == ids for i in range(len(seq)))

    for n in (4, 8, 12):  # (the best hypothesis that meets them all: a random model meets them late, and with
        # num_return_sequences above the beams that meet them, the likeliest others are returned, as transformers')
        one = kw | {"num_return_sequences": 1, "max_new_tokens": n}
        (best,) = lm.generate_ids([prompt], force_words_ids=[phrase, choice], **one)
        assert holds(best, phrase) and any(holds(best, c) for c in choice), n
    assert lm.generate_ids([prompt], constraints=[SimpleNamespace(token_ids=phrase), Choice(choice)], **kw) == forced
    assert lm.generate_ids([prompt], constraints=[Phrase(phrase)], force_words_ids=[choice], **kw) == forced
    texts = lm.generate("The quick brown fox", force_words=[" jumps over", [" dog", " lazy cat"]], **kw)
    assert texts == [lm.decode(h) for h in forced]
    other = lm.encode("Hello world, said")
    alone = [h for p in (prompt, other) for h in lm.generate_ids([p], force_words_ids=[phrase], **kw)]
    assert lm.generate_ids([prompt, other], force_words_ids=[phrase], **kw) == alone
    out = lm.generate_ids([prompt], force_words_ids=[phrase], return_dict_in_generate=True, output_scores=True,
                          output_logits=True, length_penalty=0.0, **kw)  # fmt: skip
    for seq, score, scores, logits in zip(out.sequences, out.sequences_scores, out.scores, out.logits):
        assert scores[torch.arange(len(seq)), seq].sum().item() == pytest.approx(score, abs=1e-3)
        with torch.no_grad():
            full = hf(torch.tensor([prompt + seq])).logits[0, len(prompt) - 1 : -1]
        assert (logits - full).abs().max().item() <= 1e-4
    met = prompt[1:3]  # in the prompt already
    assert lm.generate_ids([prompt], force_words_ids=[met], **kw) == lm.generate_ids([prompt], **kw)
    for bad, match in [
        (dict(num_beams=1, force_words_ids=[[5]]), "needs num_beams > 1"),
        (dict(num_beams=2, do_sample=True, force_words_ids=[[5]]), "without sampling"),
        (dict(num_beams=4, num_beam_groups=2, force_words_ids=[[5]]), "do not go together"),
        (dict(num_beams=2, force_words_ids=[[5]], stop_strings=["."]), "stop_strings"),
        (dict(num_beams=2, force_words_ids=[[[5, 6], [5]]]), "begins another"),
        (dict(num_beams=2, force_words_ids=[[]]), "non-empty list"),
        (dict(num_beams=2, force_words_ids=[[10**6]]), "is outside the model's vocabulary"),
        (dict(num_beams=2, force_words=["", "x"]), "non-empty string"),
    ]:
        with pytest.raises(NeolmError, match=match):
            lm.generate("hi", max_new_tokens=4, **bad)


def test_neolm_generate_takes_diverse_and_constrained_beam_search(capsys, tiny_checkpoints):
    """--num-beam-groups/--diversity-penalty and --force-words (a phrase, or |-separated alternatives) give what the
    library gives; a bad combination is one line on stderr before the model loads."""
    from test_cli import assert_one_line_error, cli

    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1])
    base = ("generate", "The quick brown fox", "--model", str(tiny_checkpoints["neox-parallel-pct25"][1]),
            "--max-new-tokens", "8", "--no-echo", "--no-stream")  # fmt: skip
    code, out, _ = cli(capsys, *base, "--num-beams", "4", "--num-beam-groups", "2", "--diversity-penalty", "1.5")
    expected = lm.generate("The quick brown fox", max_new_tokens=8, num_beams=4, num_beam_groups=2,
                           diversity_penalty=1.5)
    assert code == 0 and out == expected + "\n"
    code, out, _ = cli(capsys, *base, "--num-beams", "3", "--force-words", " jumps", "--force-words", " dog| cat")
    expected = lm.generate("The quick brown fox", max_new_tokens=8, num_beams=3,
                           force_words=[" jumps", [" dog", " cat"]])
    assert code == 0 and out == expected + "\n" and " jumps" in out
    code, _, err = cli(capsys, *base, "--force-words", " jumps")
    assert_one_line_error(code, err, "needs num_beams > 1")
    code, _, err = cli(capsys, *base, "--num-beams", "2", "--force-words", " jumps|")
    assert_one_line_error(code, err, "--force-words", "empty")
