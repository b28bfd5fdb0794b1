"""return_dict_in_generate (neolm.outputs): scores, logits, transition scores and beams' sequences_scores against
transformers' generate(return_dict_in_generate=True, ...), and each sequence's own rows in a batch."""

from __future__ import annotations

import pytest
import torch

import neolm
from neolm.errors import NeolmError
from neolm.outputs import GenerateOutput

TOL = 1e-4  # as tests/test_parity.py
PROMPT = [11, 22, 33, 44, 55, 66, 77]


def hf_output(hf, prompt: list[int], **kwargs):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True,
                           pad_token_id=hf.config.vocab_size, **kwargs)  # fmt: skip


def hf_transition_scores(hf, out, normalize_logits: bool = False) -> torch.Tensor:
    return hf.compute_transition_scores(out.sequences, out.scores, normalize_logits=normalize_logits)[0]


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5),
        dict(suppress_tokens=[1, 2, 3], sequence_bias=[[[5], -2.0]]),
        dict(renormalize_logits=True, repetition_penalty=1.3),
    ],
    ids=["plain", "penalties", "biases", "renormalized"],
)
@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_greedy_scores_and_logits_match_transformers(tiny_checkpoints, name, settings):
    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    kw = dict(max_new_tokens=10, do_sample=False, **settings)
    ours = lm.generate_ids([PROMPT], return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    ref = hf_output(hf, PROMPT, output_scores=True, output_logits=True, **kw)
    assert isinstance(ours, GenerateOutput)
    assert ours.sequences == [ref.sequences[0, len(PROMPT) :].tolist()]
    assert ours.scores[0].shape == ours.logits[0].shape == (10, hf.config.vocab_size)
    finite = torch.isfinite(torch.stack(ref.scores)[:, 0])
    assert torch.equal(torch.isfinite(ours.scores[0]), finite)  # the same tokens banned
    assert (ours.scores[0][finite] - torch.stack(ref.scores)[:, 0][finite]).abs().max().item() <= TOL
    assert (ours.logits[0] - torch.stack(ref.logits)[:, 0]).abs().max().item() <= TOL
    for normalize in (False, True):
        expected = hf_transition_scores(hf, ref, normalize)
        assert (ours.transition_scores(normalize)[0] - expected).abs().max().item() <= TOL


def test_sampled_scores_are_the_warped_distribution(tiny_checkpoints):
    """With sampling, the scores are what the token was drawn from: logits / temperature, top-k of them kept
    (as transformers' scores with its warpers); transformers' own draws differ, so the rule is checked."""
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1])
    out = lm.generate_ids([PROMPT, PROMPT[:3]], do_sample=True, temperature=0.7, top_k=5, seed=3, max_new_tokens=12,
                          return_dict_in_generate=True, output_scores=True, output_logits=True)  # fmt: skip
    for seq, scores, logits in zip(out.sequences, out.scores, out.logits):
        assert len(seq) == len(scores) == len(logits) == 12
        kept = torch.isfinite(scores)
        assert (kept.sum(1) == 5).all()
        assert torch.equal(kept, torch.zeros_like(kept).scatter(1, logits.topk(5).indices, True))
        assert torch.allclose(scores[kept], (logits / 0.7)[kept])
        assert kept.gather(1, torch.tensor(seq)[:, None]).all()  # each token was one that could be drawn
    again = lm.generate_ids([PROMPT, PROMPT[:3]], do_sample=True, temperature=0.7, top_k=5, seed=3, max_new_tokens=12)
    assert again == out.sequences


def test_each_sequence_gets_its_own_rows_in_a_batch(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neo"][1])
    prompts = [PROMPT, [5, 6, 7, 5, 6, 7, 5, 6, 9, 9, 9], [3]]
    alone = [lm.generate_ids([p], do_sample=False, max_new_tokens=9)[0] for p in prompts]
    eos = alone[1][3]  # the second prompt ends early at this token
    kw = dict(do_sample=False, max_new_tokens=9, eos_token_id=eos)
    batch = lm.generate_ids(prompts, return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    assert batch.sequences == lm.generate_ids(prompts, **kw)
    assert len(batch.sequences[1]) < 9
    for i, p in enumerate(prompts):
        solo = lm.generate_ids([p], return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
        assert solo.sequences[0] == batch.sequences[i]
        assert len(batch.scores[i]) == len(batch.logits[i]) == len(batch.sequences[i])
        assert (batch.logits[i] - solo.logits[0]).abs().max().item() <= TOL
    assert torch.equal(batch.transition_scores()[1][-1], batch.scores[1][-1, eos])


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_beam_scores_match_transformers(tiny_checkpoints, name):
    """Each hypothesis's sequences_scores, and its tokens' scores and logits: the rows transformers' beam_indices
    point to in its per-step scores and logits; transition_scores are its compute_transition_scores with them, and
    their sum, length-penalised, is the hypothesis's score."""
    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    free = lm.generate_ids([PROMPT], num_beams=3, num_return_sequences=3, max_new_tokens=8, do_sample=False)
    for kw in (
        dict(num_beams=3, num_return_sequences=2),
        dict(num_beams=4, num_return_sequences=3, length_penalty=0.5),
        dict(num_beams=3, num_return_sequences=3, renormalize_logits=True, repetition_penalty=1.5),
        dict(num_beams=3, num_return_sequences=3, eos_token_id=free[1][3], length_penalty=0.5),  # of other lengths
    ):
        kw = dict(kw, max_new_tokens=8, do_sample=False)
        ours = lm.generate_ids([PROMPT], return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
        ref = hf_output(hf, PROMPT, output_scores=True, output_logits=True, **kw)
        assert ours.sequences == [
            [t for t in row if t != hf.config.vocab_size] for row in ref.sequences[:, len(PROMPT) :].tolist()
        ]
        assert ours.sequences_scores == pytest.approx(ref.sequences_scores.tolist(), abs=TOL)
        transitions = hf.compute_transition_scores(ref.sequences, ref.scores, ref.beam_indices)
        for h, seq in enumerate(ours.sequences):
            steps = range(len(seq))
            scores = torch.stack([ref.scores[t][ref.beam_indices[h, t]] for t in steps])
            finite = torch.isfinite(scores)
            assert torch.equal(torch.isfinite(ours.scores[h]), finite)
            assert (ours.scores[h][finite] - scores[finite]).abs().max().item() <= TOL
            logits = torch.stack([ref.logits[t][ref.beam_indices[h, t]] for t in steps])
            assert (ours.logits[h] - logits).abs().max().item() <= TOL
            transition = ours.transition_scores()[h]
            assert (transition - transitions[h, : len(seq)]).abs().max().item() <= TOL
            penalised = transition.sum().item() / len(seq) ** kw.get("length_penalty", 1.0)
            assert penalised == pytest.approx(ours.sequences_scores[h], abs=TOL)
        assert len({len(seq) for seq in ours.sequences}) > 1 or "eos_token_id" not in kw


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_assisted_generation_scores_match_transformers(tiny_checkpoints, name):
    """Prompt lookup on a repeating prompt (guesses kept), greedy: each token's scores and logits are the model's at
    the position that checked it, as transformers' prompt-lookup run gives them; an assistant gives the same."""
    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    prompt = [5, 6, 7, 8] * 4
    kw = dict(max_new_tokens=12, do_sample=False, repetition_penalty=1.2)
    ours = lm.generate_ids([prompt], prompt_lookup_num_tokens=4, return_dict_in_generate=True, output_scores=True,
                           output_logits=True, **kw)  # fmt: skip
    ref = hf_output(hf, prompt, prompt_lookup_num_tokens=4, output_scores=True, output_logits=True, **kw)
    assert ours.sequences == [ref.sequences[0, len(prompt) :].tolist()]
    assert (ours.scores[0] - torch.stack(ref.scores)[:, 0]).abs().max().item() <= TOL
    assert (ours.logits[0] - torch.stack(ref.logits)[:, 0]).abs().max().item() <= TOL
    plain = lm.generate_ids([prompt], return_dict_in_generate=True, output_scores=True, **kw)
    assert ours.sequences == plain.sequences
    assert (ours.scores[0] - plain.scores[0]).abs().max().item() <= TOL
    helped = lm.generate_ids([prompt, prompt[:9]], assistant_model=lm.model, return_dict_in_generate=True,
                             output_scores=True, **kw)  # fmt: skip
    assert helped.sequences == lm.generate_ids([prompt, prompt[:9]], **kw)
    assert (helped.scores[0] - plain.scores[0]).abs().max().item() <= TOL
    assert [len(s) for s in helped.scores] == [len(s) for s in helped.sequences]


def test_texts_plain_dicts_and_errors(tiny_checkpoints):
    hf, folder = tiny_checkpoints["neo"]
    lm = neolm.load(folder)
    out = lm.generate("The quick brown fox", max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert out.scores is None and out.logits is None and out.sequences_scores is None
    assert out.texts == [lm.generate("The quick brown fox", max_new_tokens=6, do_sample=False)]
    assert out.sequences == lm.generate_ids([lm.encode("The quick brown fox")], max_new_tokens=6, do_sample=False)
    with pytest.raises(NeolmError, match="output_scores"):
        out.transition_scores()
    with pytest.raises(NeolmError, match="return_dict_in_generate=True"):
        lm.generate("hi", output_scores=True)
    with pytest.raises(NeolmError, match="pipeline"):
        neolm.pipeline("text-generation", model=folder)("hi", return_dict_in_generate=True)
    empty = lm.generate_ids([PROMPT], max_new_tokens=0, return_dict_in_generate=True, output_scores=True)
    assert empty.sequences == [[]] and empty.scores[0].shape == (0, hf.config.vocab_size)


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_hidden_states_and_attentions_match_transformers(tiny_checkpoints, name):
    """output_hidden_states / output_attentions: transformers' per-step pieces (the prompt's at the first step,
    then one position a step) put together are each sequence's (T, C) and (H, T, T) over its prompt and new
    tokens but the last; beams' are their hypotheses' own; a batch's rows each their own sequence's; and they
    need return_dict_in_generate."""
    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    kw = dict(max_new_tokens=12, do_sample=False, output_hidden_states=True, output_attentions=True)
    ref = hf_output(hf, PROMPT, **kw)
    ours = lm.generate_ids([PROMPT, PROMPT[:3]], return_dict_in_generate=True, **kw)
    T = len(PROMPT) + len(ours.sequences[0]) - 1
    assert ref.sequences[0, len(PROMPT) :].tolist() == ours.sequences[0]
    hidden = [torch.cat([step[i][0] for step in ref.hidden_states], 0) for i in range(lm.config.n_layer + 1)]
    assert len(ours.hidden_states[0]) == len(hidden) and ours.hidden_states[0][0].shape == (T, lm.config.d_model)
    for a, b in zip(ours.hidden_states[0], hidden):
        assert torch.allclose(a, b, atol=TOL), (a - b).abs().max()
    for layer, weights in enumerate(ours.attentions[0]):
        full = torch.zeros(weights.shape)
        for step in ref.attentions:  # (1, H, rows, keys so far)
            rows, keys = step[layer].shape[-2:]
            full[:, keys - rows : keys, :keys] = step[layer][0]
        assert weights.shape == (lm.config.n_head, T, T) and torch.allclose(weights, full, atol=TOL)
    short = lm.trace_ids([PROMPT[:3] + ours.sequences[1][:-1]], True, True)[0]
    assert all(torch.allclose(a, b, atol=TOL) for a, b in zip(ours.hidden_states[1], short.hidden_states))
    assert all(torch.allclose(a, b, atol=TOL) for a, b in zip(ours.attentions[1], short.attentions))
    beams = lm.generate_ids([PROMPT], num_beams=3, num_return_sequences=2, return_dict_in_generate=True, **kw)
    for seq, states in zip(beams.sequences, beams.hidden_states):
        own = lm.trace_ids([PROMPT + seq[:-1]], True)[0]
        assert all(torch.equal(a, b) for a, b in zip(states, own.hidden_states))
    with pytest.raises(NeolmError, match="output_hidden_states need return_dict_in_generate"):
        lm.generate_ids([PROMPT], output_hidden_states=True)
