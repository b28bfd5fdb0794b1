"""Classifier-free guidance (guidance_scale, negative_prompt_ids; neolm.guidance) against transformers' generate,
each prompt of a batch as alone, the text form and the command line, and its refusals."""

from __future__ import annotations

import pytest
import torch
from test_cli import PROMPT as TEXT
from test_cli import assert_one_line_error, cli
from test_outputs import TOL, hf_output

import neolm
from neolm.errors import NeolmError
from neolm.generate import DecodeBatch
from neolm.generation_config import GenerationConfig

PROMPT = [3, 3, 4, 5, 3, 4, 9, 3, 4]
NEGATIVE = [7, 8, 9, 10]


def _hf_kwargs(knobs: dict) -> dict:
    if "negative_prompt_ids" in knobs:
        return knobs | {"negative_prompt_ids": torch.tensor([knobs["negative_prompt_ids"]])}
    return knobs


@pytest.mark.parametrize(
    "knobs",
    [
        dict(guidance_scale=1.5),
        dict(guidance_scale=3.0, negative_prompt_ids=NEGATIVE),
        dict(guidance_scale=0.5, repetition_penalty=1.3, no_repeat_ngram_size=3),
    ],
    ids=["last-token", "negative", "weaker-with-processors"],
)
@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_guided_text_and_scores_match_transformers(tiny_checkpoints, name, knobs):
    """Greedy text and the scores each token was picked from are transformers' (its
    UnbatchedClassifierFreeGuidanceLogitsProcessor, first of the processors), and the text is not the unguided one."""
    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    kw = dict(max_new_tokens=16, do_sample=False)
    ours = lm.generate_ids([PROMPT], return_dict_in_generate=True, output_scores=True, **kw, **knobs)
    ref = hf_output(hf, PROMPT, output_scores=True, **kw, **_hf_kwargs(knobs))
    assert ours.sequences[0] == ref.sequences[0, len(PROMPT) :].tolist()
    theirs = torch.stack(ref.scores)[:, 0]
    finite = torch.isfinite(theirs)
    assert torch.equal(torch.isfinite(ours.scores[0]), finite)
    assert (ours.scores[0][finite] - theirs[finite]).abs().max().item() <= TOL
    assert ours.sequences[0] != lm.generate_ids([PROMPT], **kw, **{k: v for k, v in knobs.items() if "guid" not in k
                                                                     and "negative" not in k})[0]  # fmt: skip


def test_each_prompt_of_a_batch_is_guided_as_alone(tiny_checkpoints):
    """Prompts of different lengths with a negative prompt each (of different lengths too), or one shared, give
    what each gives alone; sampling is guided too (reproducible with a seed) and streams the same tokens."""
    lm = neolm.load(tiny_checkpoints["neox-sequential-pct100"][1])
    prompts = [PROMPT, [5, 6, 7, 5, 6], [3]]
    negatives = [NEGATIVE, [12], [40, 41, 42, 43, 44, 45, 46]]
    kw = dict(max_new_tokens=10, do_sample=False, guidance_scale=2.0)
    batch = lm.generate_ids(prompts, negative_prompt_ids=negatives, **kw)
    assert batch == [lm.generate_ids([p], negative_prompt_ids=n, **kw)[0] for p, n in zip(prompts, negatives)]
    shared = lm.generate_ids(prompts, negative_prompt_ids=NEGATIVE, **kw)
    assert shared == [lm.generate_ids([p], negative_prompt_ids=NEGATIVE, **kw)[0] for p in prompts]
    assert shared != batch
    sampled = dict(do_sample=True, seed=4, guidance_scale=1.5, max_new_tokens=12, num_return_sequences=2)
    first = lm.generate_ids([PROMPT], **sampled)
    assert first == lm.generate_ids([PROMPT], **sampled) and first[0] != first[1]
    assert first != lm.generate_ids([PROMPT], **sampled | dict(guidance_scale=1.0))


def test_negative_prompt_text_and_command_line(tiny_checkpoints, capsys):
    """negative_prompt (text) is negative_prompt_ids of its tokens, one per prompt or one for all; the command's
    --guidance-scale and --negative-prompt give the library's text; streaming is guided too."""
    neo_folder = tiny_checkpoints["neo"][1]
    lm = neolm.load(neo_folder)
    kw = dict(max_new_tokens=8, do_sample=False, guidance_scale=2.5)
    text = lm.generate(TEXT, negative_prompt="a dog barked", **kw)
    assert text == lm.decode(lm.generate_ids([lm.encode(TEXT)], negative_prompt_ids=lm.encode("a dog barked"), **kw)[0])
    assert "".join(lm.stream(TEXT, negative_prompt="a dog barked", **kw)) == text
    assert lm.generate([TEXT, "Hello"], negative_prompt=["a dog barked", "x"], **kw)[0] == text
    code, out, err = cli(capsys, "generate", "-m", neo_folder, TEXT, "--max-new-tokens", "8", "--no-do-sample",
                         "--guidance-scale", "2.5", "--negative-prompt", "a dog barked")  # fmt: skip
    assert code == 0 and out == TEXT + text + "\n", err
    code, _, err = cli(capsys, "generate", "-m", neo_folder, TEXT, "--negative-prompt", "a dog")
    assert_one_line_error(code, err, "guidance_scale")
    code, _, err = cli(capsys, "generate", "-m", neo_folder, TEXT, "--guidance-scale", "2", "--num-beams", "2")
    assert_one_line_error(code, err, "beams")


def test_refusals(tiny_checkpoints):
    """Settings guidance cannot run are errors before anything is computed, never silently unguided text."""
    lm = neolm.load(tiny_checkpoints["neo"][1])
    bad = [
        (dict(negative_prompt_ids=NEGATIVE), "set guidance_scale"),
        (dict(guidance_scale=2.0, negative_prompt_ids=[NEGATIVE, NEGATIVE]), "2 prompts for 1"),
        (dict(guidance_scale=2.0, negative_prompt_ids=[[]]), "negative_prompt_ids must be"),
        (dict(guidance_scale=2.0, negative_prompt_ids=[-1]), "negative_prompt_ids must be"),
        (dict(guidance_scale=2.0, negative_prompt_ids=[60000]), "outside the model's vocabulary"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a number"),
        (dict(guidance_scale=2.0, num_beams=2), "beams"),
        (dict(guidance_scale=2.0, prompt_lookup_num_tokens=2), "without guidance_scale"),
        (dict(guidance_scale=2.0, negative_prompt_ids=[1] * 500, max_new_tokens=20), "more than the model's context"),
    ]
    for knobs, needle in bad:
        with pytest.raises(NeolmError, match=needle):
            lm.generate_ids([PROMPT], **{"max_new_tokens": 4} | knobs)
    with pytest.raises(NeolmError, match="not both"):
        lm.generate("Hi", guidance_scale=2.0, negative_prompt="a", negative_prompt_ids=[1])
    server = DecodeBatch(lm.model)  # continuous batching (compact): other requests could join
    with pytest.raises(NeolmError, match="generation of its own"):
        server.add([PROMPT], GenerationConfig.from_kwargs(guidance_scale=2.0, max_new_tokens=4))
