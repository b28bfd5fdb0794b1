"""Green-list watermarks (watermarking_config; neolm.watermark) against transformers' WatermarkLogitsProcessor and
WatermarkDetector, detection of what each library writes, the command line, and bad settings."""

from __future__ import annotations

import pytest
import torch
from test_cli import assert_one_line_error, cli
from test_outputs import hf_output

import neolm
from neolm.errors import NeolmError
from neolm.watermark import Watermark, WatermarkingConfig, detect

PROMPT = [3, 3, 4, 5, 3, 4, 9, 3, 4]
SETTINGS = [
    dict(),
    dict(bias=5.0, context_width=2, seeding_scheme="selfhash"),
    dict(bias=3.0, hashing_key=123, greenlist_ratio=0.5),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "selfhash", "half-green"])
@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_watermarked_text_and_detection_match_transformers(tiny_checkpoints, name, settings):
    """Greedy and beam text under each watermark is transformers' (its processor after the others), with its
    scores; transformers' detector and neolm's give the same z-score, and find the mark in it and not in the
    unmarked text."""
    from transformers import WatermarkDetector
    from transformers import WatermarkingConfig as HFWatermarkingConfig

    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    theirs = HFWatermarkingConfig(**settings)
    detector = WatermarkDetector(hf.config, "cpu", theirs)
    for extra in (dict(repetition_penalty=1.2), dict(num_beams=3)):
        kw = dict(max_new_tokens=24, do_sample=False, **extra)
        ours = lm.generate_ids([PROMPT], watermarking_config=settings, return_dict_in_generate=True,
                               output_scores=True, **kw)  # fmt: skip
        ref = hf_output(hf, PROMPT, watermarking_config=theirs, output_scores=True, **kw)
        marked = ours.sequences[0]
        assert marked == ref.sequences[0, len(PROMPT) :].tolist(), extra
        if not extra.get("num_beams"):
            assert (ours.scores[0] - torch.stack(ref.scores)[:, 0]).abs().max().item() <= 1e-4
        plain = lm.generate_ids([PROMPT], **kw)[0]
        assert marked != plain
        found = lm.detect_watermark(marked, settings)
        expected = detector(torch.tensor([marked]), return_dict=True)
        assert found.z_score == pytest.approx(float(expected.z_score[0]), abs=1e-6)
        assert found.num_green_tokens == int(expected.num_green_tokens[0])
        assert found.p_value == pytest.approx(float(expected.p_value[0]), rel=1e-6, abs=1e-12)
        assert found.prediction and not lm.detect_watermark(plain, settings).prediction
        assert not lm.detect_watermark(marked, settings | {"hashing_key": 99}).prediction  # the key matters


def test_detection_rules_and_batches(tiny_checkpoints):
    """Counting as transformers' detector: repeated n-grams once with ignore_repeated_ngrams, a leading bos
    dropped; sampled text of a batch is marked in each row; the settings take transformers' config too."""
    from transformers import WatermarkDetector
    from transformers import WatermarkingConfig as HFWatermarkingConfig

    hf, folder = tiny_checkpoints["neox-parallel-pct25"]
    lm = neolm.load(folder)
    repeated = [5, 6, 7, 8] * 6
    detector = WatermarkDetector(hf.config, "cpu", HFWatermarkingConfig(), ignore_repeated_ngrams=True)
    once = lm.detect_watermark(repeated, ignore_repeated_ngrams=True)
    assert once.num_tokens_scored == 4  # the distinct bigrams 5-6, 6-7, 7-8, 8-5
    assert once.z_score == pytest.approx(float(detector(torch.tensor([repeated]), return_dict=True).z_score[0]))
    assert lm.detect_watermark([lm.config.bos_token_id, *repeated]) == lm.detect_watermark(repeated)
    sampled = lm.generate_ids([PROMPT, [7, 7]], do_sample=True, seed=1, max_new_tokens=40, top_k=0,
                              watermarking_config=HFWatermarkingConfig(bias=4.0))  # fmt: skip
    for seq in sampled:
        assert lm.detect_watermark(seq, WatermarkingConfig(bias=4.0)).prediction
    watermark = Watermark(WatermarkingConfig(), lm.config.vocab_size)
    assert len(watermark.green([17])) == int(lm.config.vocab_size * 0.25)
    assert torch.equal(watermark.green([3, 17]), watermark.green([17]))  # lefthash: the last token alone
    assert not torch.equal(watermark.green([18]), watermark.green([17]))
    with pytest.raises(NeolmError, match="at least 2 tokens"):
        detect(watermark, [5])


def test_command_line(tiny_checkpoints, capsys, tmp_path):
    """`neolm generate --watermark-config` writes the library's marked text; `neolm watermark` finds it (from the
    tokenizer and config alone: no weights in the folder) and not in plain text; bad settings are one line."""
    import shutil

    folder = tiny_checkpoints["neo"][1]
    lm = neolm.load(folder)
    text = "Once upon a time"
    spec = "bias=4,hashing_key=42"
    code, out, err = cli(capsys, "generate", "-m", folder, text, "--max-new-tokens", "40", "--no-do-sample",
                         "--watermark-config", spec, "--no-echo")  # fmt: skip
    settings = WatermarkingConfig(bias=4.0, hashing_key=42)
    marked = lm.generate(text, max_new_tokens=40, do_sample=False, watermarking_config=settings)
    assert code == 0 and out == marked + "\n", err
    light = tmp_path / "light"
    shutil.copytree(folder, light, ignore=shutil.ignore_patterns("*.safetensors"))
    code, out, err = cli(capsys, "watermark", "-m", light, marked, "--watermark-config", spec)
    assert code == 0 and "watermarked:   yes" in out, err
    found = lm.detect_watermark(marked, settings)
    assert f"z-score:       {found.z_score:.2f}" in out
    plain = lm.generate(text, max_new_tokens=40, do_sample=False)
    code, out, err = cli(capsys, "watermark", "-m", light, plain, "--watermark-config", spec, "--json")
    assert code == 0 and '"prediction": false' in out, err
    code, out, err = cli(capsys, "generate", "-m", folder, text, "--max-new-tokens", "40", "--no-do-sample",
                         "--watermark", "--no-echo")  # fmt: skip
    assert out == lm.generate(text, max_new_tokens=40, do_sample=False, watermarking_config={}) + "\n"
    for bad, needle in (("bias=x", "bias must be a float"), ("colour=2", "key among"),
                        ("seeding_scheme=other", "seeding_scheme"), ("greenlist_ratio=1.5", "greenlist_ratio")):  # fmt: skip
        code, _, err = cli(capsys, "watermark", "-m", light, plain, "--watermark-config", bad)
        assert_one_line_error(code, err, needle)


@pytest.mark.parametrize(
    "value, needle",
    [
        (dict(context_width=0), "context_width"),
        (dict(hashing_key=-3), "hashing_key"),
        (dict(bias=float("inf")), "bias"),
        (dict(strength=2), "unknown watermarking_config field"),
        ("strong", "must be a WatermarkingConfig"),
    ],
)
def test_bad_settings(tiny_checkpoints, value, needle):
    lm = neolm.load(tiny_checkpoints["neo"][1])
    with pytest.raises(NeolmError, match=needle):
        lm.generate_ids([PROMPT], max_new_tokens=2, watermarking_config=value)
