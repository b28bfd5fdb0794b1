"""SynthID Text watermarking (watermarking_config with keys; neolm.synthid) against transformers'
SynthIDTextWatermarkLogitsProcessor: the same scores and text, sampled text that neolm's detector finds, the
command line, and bad settings."""

from __future__ import annotations

import pytest
import torch
from test_cli import assert_one_line_error, cli
from test_outputs import hf_output

import neolm
from neolm.errors import NeolmError
from neolm.synthid import SynthID, SynthIDConfig, detect

PROMPT = [3, 3, 4, 5, 3, 4, 9, 3, 4]
KEYS = [654, 400, 836, 123, 340, 443, 597, 160, 57]
SETTINGS = [
    {"ngram_len": 5, "keys": KEYS},
    {"ngram_len": 3, "keys": KEYS[:4], "skip_first_ngram_calls": True, "context_history_size": 8},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "skip-first"])
@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_scores_and_text_match_transformers(tiny_checkpoints, name, settings):
    from transformers import SynthIDTextWatermarkingConfig

    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    theirs = SynthIDTextWatermarkingConfig(**settings)
    for extra in ({}, {"no_repeat_ngram_size": 0, "repetition_penalty": 1.3}):
        kw = {"max_new_tokens": 30, "do_sample": False, **extra}
        ours = lm.generate_ids([PROMPT], watermarking_config=settings, return_dict_in_generate=True,
                               output_scores=True, **kw)  # fmt: skip
        ref = hf_output(hf, PROMPT, watermarking_config=theirs, output_scores=True, **kw)
        assert ours.sequences[0] == ref.sequences[0, len(PROMPT) :].tolist(), extra
        theirs_scores = torch.stack(ref.scores)[:, 0]
        finite = torch.isfinite(theirs_scores) & (theirs_scores > -1e30)
        assert torch.equal(finite, torch.isfinite(ours.scores[0]) & (ours.scores[0] > -1e30))
        assert (ours.scores[0][finite] - theirs_scores[finite]).abs().max().item() <= 1e-4
        plain = lm.generate_ids([PROMPT], **kw)[0]
        assert ours.sequences[0] != plain  # (the tournament moved some pick)


def test_sampled_text_carries_the_mark_and_the_keys_matter(tiny_checkpoints):
    """Sampled text (top_k=0: the whole distribution) scores far above chance with its keys and near chance with
    others; transformers' config object, a dict and neolm's config all work."""
    from transformers import SynthIDTextWatermarkingConfig

    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1])
    settings = {"ngram_len": 4, "keys": KEYS}
    marked = lm.generate_ids([PROMPT, [7, 7, 9]], do_sample=True, seed=2, max_new_tokens=120, top_k=0,
                             watermarking_config=SynthIDTextWatermarkingConfig(**settings))  # fmt: skip
    plain = lm.generate_ids([PROMPT], do_sample=True, seed=2, max_new_tokens=120, top_k=0)[0]
    for seq in marked:
        found = lm.detect_watermark(seq, settings)
        assert found.prediction and found.mean_g_value > 0.55, found
    assert not lm.detect_watermark(plain, SynthIDConfig(4, tuple(KEYS))).prediction
    other = lm.detect_watermark(marked[0], {"ngram_len": 4, "keys": [1, 2, 3, 4, 5, 6, 7, 8, 9]})
    assert not other.prediction and abs(other.z_score) < 3
    synthid = SynthID(SynthIDConfig(4, tuple(KEYS)), lm.config.vocab_size)
    repeated = [5, 6, 7, 8] * 6
    assert detect(synthid, repeated).num_tokens_scored == 4  # each context once
    assert lm.detect_watermark(repeated, settings).num_tokens_scored == 4  # (the library's default too, as the CLI's)
    assert detect(synthid, repeated, ignore_repeated_ngrams=False).num_tokens_scored == len(repeated) - 3
    with pytest.raises(NeolmError, match="at least ngram_len"):
        detect(synthid, [5, 6])


def test_the_command_line_and_bad_settings(tiny_checkpoints, capsys):
    folder = tiny_checkpoints["neox-parallel-pct25"][1]
    spec = "ngram_len=4,keys=654:400:836:123:340"
    code, out, err = cli(capsys, "generate", "Hello there", "-m", folder, "--max-new-tokens", "80", "--do-sample",
                         "--top-k", "0", "--seed", "3", "--watermark-config", spec)  # fmt: skip
    assert code == 0, err
    text = out.strip().removeprefix("Hello there")
    code, out, err = cli(capsys, "watermark", text, "-m", folder, "--watermark-config", spec, "--json")
    assert code == 0, err
    assert '"mean_g_value"' in out and '"prediction": true' in out
    for bad, needle in (("ngram_len=1,keys=1:2", "ngram_len must be"), ("keys=1:2", "needs ngram_len and keys"),
                        ("ngram_len=3,keys=a", "keys must be"), ("ngram_len=3,keys=1,depth=2", "key among")):  # fmt: skip
        code, _, err = cli(capsys, "generate", "Hi", "-m", folder, "--watermark-config", bad)
        assert_one_line_error(code, err, needle)
    with pytest.raises(NeolmError, match="sampling_table_size"):
        neolm.GenerationConfig.from_kwargs(watermarking_config={"ngram_len": 3, "keys": [1], "sampling_table_size": 0})
