"""The `neolm` command: output equals the library's, and every bad input is one line on stderr, never a traceback."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import neolm
from neolm.api import DEFAULT_MODEL_DIR
from neolm.cli import main

PROMPT = "Once upon a time"
SEPARATOR = "-" * 40


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `neolm ARGV` in-process: (exit code, stdout, stderr). argparse's SystemExit counts as an exit code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str, exit_code: int | None = None) -> None:
    assert code != 0, err
    if exit_code is not None:
        assert code == exit_code, (code, err)
    assert err.strip(), "no message on stderr"
    assert "\n" not in err.strip(), f"more than one line on stderr: {err!r}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def set_stdin(monkeypatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


@pytest.fixture(scope="module")
def folder(tiny_checkpoints) -> Path:
    return tiny_checkpoints["neox-parallel-pct25"][1]


@pytest.fixture(scope="module")
def neo_folder(tiny_checkpoints) -> Path:
    return tiny_checkpoints["neo"][1]


@pytest.fixture(scope="module")
def lm(folder):
    return neolm.load(folder)


# --- generate: good input ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25", "neox-sequential-pct100"])
def test_generate_echoes_prompt_and_matches_library(tiny_checkpoints, capsys, name):
    folder = tiny_checkpoints[name][1]
    code, out, err = cli(capsys, "generate", "--model", folder, PROMPT, "--max-new-tokens", "5")
    assert code == 0, err
    expected = neolm.load(folder).generate(PROMPT, max_new_tokens=5)
    assert expected  # five new tokens of a random model decode to some text
    assert out == PROMPT + expected + "\n"


def test_generate_no_echo_prints_only_the_continuation(folder, lm, capsys):
    code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--max-new-tokens", "5", "--no-echo")
    assert code == 0, err
    assert out == lm.generate(PROMPT, max_new_tokens=5) + "\n"


def test_generate_mmap_loads_in_place_with_the_same_text(folder, lm, capsys, monkeypatch):
    """--mmap reaches neolm.load (weights left in the file's pages) and changes nothing in the text."""
    seen = []
    real = neolm.load
    monkeypatch.setattr(neolm, "load", lambda *a, **k: seen.append(k["mmap"]) or real(*a, **k))
    code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--max-new-tokens", "5", "--mmap")
    assert code == 0, err
    assert seen == [True] and out == PROMPT + lm.generate(PROMPT, max_new_tokens=5) + "\n"


def test_generate_with_a_bf16_kv_cache(folder, capsys):
    code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--max-new-tokens", "5", "--kv-cache-dtype", "bfloat16")
    assert code == 0, err
    assert out == PROMPT + neolm.load(folder, kv_cache_dtype="bfloat16").generate(PROMPT, max_new_tokens=5) + "\n"
    code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--kv-cache-dtype", "int4")
    assert code == 2 and "--kv-cache-dtype" in err


@pytest.mark.parametrize("dash", [False, True], ids=["omitted", "dash"])
def test_generate_prompt_from_stdin(folder, lm, capsys, monkeypatch, dash):
    text = "The quick brown fox\n"
    set_stdin(monkeypatch, text)
    argv = ["generate", "--model", folder, "--max-new-tokens", "5"] + (["-"] if dash else [])
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert out == text + lm.generate(text, max_new_tokens=5) + "\n"


def test_stream_equals_no_stream_greedy(neo_folder, capsys):
    base = ["generate", "--model", neo_folder, PROMPT, "--max-new-tokens", "12"]
    code, default, err = cli(capsys, *base)  # capsys's stdout is no terminal: not streamed
    assert code == 0, err
    code, streamed, err = cli(capsys, *base, "--stream")
    assert code == 0, err
    code, not_streamed, err = cli(capsys, *base, "--no-stream")
    assert code == 0, err
    assert streamed == not_streamed == default
    code, streamed_bare, err = cli(capsys, *base, "--stream", "--no-echo")
    assert code == 0, err
    assert PROMPT + streamed_bare == streamed


def test_seeded_sampling_is_reproducible(folder, capsys):
    argv = ["generate", "-m", folder, PROMPT, "--max-new-tokens", "10", "--do-sample", "--top-k", "0"]
    code, first, err = cli(capsys, *argv, "--seed", "3")
    assert code == 0, err
    code, second, err = cli(capsys, *argv, "--seed", "3")
    assert code == 0, err
    assert first == second
    assert first.startswith(PROMPT)
    code, other, err = cli(capsys, *argv, "--seed", "4")
    assert code == 0, err
    assert other != first  # 10 tokens from the full 50k vocabulary: equal only by a vanishing chance


def test_num_return_sequences_prints_separated_samples(folder, lm, capsys):
    code, out, err = cli(
        capsys, "generate", "-m", folder, PROMPT, "--max-new-tokens", "6", "--do-sample", "--seed", "1",
        "--top-k", "0", "--num-return-sequences", "2",
    )  # fmt: skip
    assert code == 0, err
    samples = lm.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=1, top_k=0, num_return_sequences=2)
    assert isinstance(samples, list) and len(samples) == 2
    assert out == f"{PROMPT}{samples[0]}\n{SEPARATOR}\n{PROMPT}{samples[1]}\n"
    assert out.count(f"\n{SEPARATOR}\n") == 1


def test_beam_search_and_processor_flags(folder, lm, capsys):
    """--num-beams (not streamed, even with --stream left to default), --length-penalty, --no-repeat-ngram-size,
    the penalties and --min-p reach generate() as its arguments; --stream with beams is an error."""
    code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--max-new-tokens", "8", "--no-do-sample",
                         "--num-beams", "3", "--num-return-sequences", "2", "--length-penalty", "0.5",
                         "--no-repeat-ngram-size", "2", "--presence-penalty", "0.5", "--frequency-penalty", "0.2")  # fmt: skip
    assert code == 0, err
    beams = lm.generate(PROMPT, max_new_tokens=8, do_sample=False, num_beams=3, num_return_sequences=2,
                        length_penalty=0.5, no_repeat_ngram_size=2, presence_penalty=0.5, frequency_penalty=0.2)  # fmt: skip
    assert out == f"{PROMPT}{beams[0]}\n{SEPARATOR}\n{PROMPT}{beams[1]}\n"
    code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--max-new-tokens", "8", "--do-sample", "--seed",
                         "3", "--min-p", "0.2", "--typical-p", "0.9", "--no-stream")  # fmt: skip
    assert code == 0 and out == PROMPT + lm.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=3, min_p=0.2,
                                                     typical_p=0.9) + "\n"  # fmt: skip
    code, _, err = cli(capsys, "generate", "-m", folder, PROMPT, "--num-beams", "2", "--stream", "--no-do-sample")
    assert_one_line_error(code, err, "beam search")


def test_assisted_generation_flags(folder, lm, capsys, tiny_checkpoints):
    """--prompt-lookup-num-tokens, --assistant-model (loaded as the model is; streamed or not) and
    --assistant-early-exit give greedy decoding's text, also with an assistant of another tokenizer (guessing
    through text); two at once is a one-line error."""
    plain = PROMPT + lm.generate(PROMPT, max_new_tokens=12, do_sample=False) + "\n"
    other, neo = tiny_checkpoints["neox-sequential-pct100"][1], tiny_checkpoints["neo"][1]
    for flags in (["--prompt-lookup-num-tokens", "3"], ["--assistant-model", other, "--num-assistant-tokens", "2"],
                  ["--assistant-model", other, "--stream"], ["--assistant-early-exit", "1"],
                  ["--assistant-model", neo, "--num-assistant-tokens", "3"]):  # fmt: skip
        code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--max-new-tokens", "12", "--no-do-sample",
                             *flags)  # fmt: skip
        assert code == 0 and out == plain, (flags, err)
    code, _, err = cli(capsys, "generate", "-m", folder, PROMPT, "--assistant-model", other,
                       "--prompt-lookup-num-tokens", "3")  # fmt: skip
    assert_one_line_error(code, err, "give one of --assistant-model, --prompt-lookup-num-tokens")


def test_stop_string_ends_the_output(neo_folder, capsys):
    lm = neolm.load(neo_folder)
    new_ids = lm.generate_ids([lm.encode(PROMPT)], max_new_tokens=20, min_new_tokens=20)[0]
    full = lm.decode(new_ids)
    # The text of one token in the middle of the greedy continuation: it surely occurs.
    k = next(i for i in range(4, len(new_ids)) if lm.decode(new_ids[i : i + 1]).strip())
    stop = lm.decode(new_ids[k : k + 1]).strip()
    assert stop in full
    code, out, err = cli(
        capsys, "generate", "-m", neo_folder, PROMPT, "--max-new-tokens", "20", "--min-new-tokens", "20",
        "--no-echo", "--stop", stop,
    )  # fmt: skip
    assert code == 0, err
    assert out.endswith("\n")
    stopped = out[:-1]
    assert full.startswith(stopped)  # greedy: the same text, cut short
    assert stop in stopped  # the stop text is kept ...
    # ... and generation ended with the token that completed it: the new tokens before it do not hold it yet.
    m = next(i for i in range(1, len(new_ids) + 1) if lm.decode(new_ids[:i]) == stopped)
    assert m <= k + 1 and stop not in lm.decode(new_ids[: m - 1])
    assert stopped == lm.generate(PROMPT, max_new_tokens=20, min_new_tokens=20, stop_strings=[stop])


def test_truncate_lets_an_overflowing_prompt_through(folder, capsys):
    long_prompt = "hello " * 600  # > 512 tokens, the tiny models' context
    code, out, err = cli(capsys, "generate", "-m", folder, long_prompt, "--max-new-tokens", "4", "--truncate", "--no-echo")
    assert code == 0, err
    assert out.endswith("\n")


# --- info ------------------------------------------------------------------------------------------------


def test_info_lists_the_model(folder, capsys):
    code, out, err = cli(capsys, "info", folder)
    assert code == 0, err
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines()}
    for key in ("family", "parameters", "dtype", "context", "tokenizer"):
        assert key in lines, out
    assert lines["family"] == "gpt_neox"
    assert lines["dtype"] == "float32"
    assert lines["context"] == "512"
    info = neolm.load(folder).info()
    assert lines["parameters"] == f"{info['parameters']:,}"
    assert lines["tokenizer"] == str(info["tokenizer"])


def test_info_json(neo_folder, capsys):
    code, out, err = cli(capsys, "info", neo_folder, "--json")
    assert code == 0, err
    info = json.loads(out)
    for key in ("family", "parameters", "dtype", "context", "tokenizer"):
        assert key in info, info
    assert info["family"] == "gpt_neo"
    assert info["context"] == 512
    assert isinstance(info["parameters"], int) and info["parameters"] > 50257 * 48
    assert info["dtype"] == "float32"
    assert info == json.loads(json.dumps(neolm.load(neo_folder).info()))


# --- bad input: one line on stderr, non-zero exit ----------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "info"])
def test_missing_folder(tmp_path, capsys, command):
    missing = tmp_path / "no-such-model"
    argv = ["generate", "-m", missing, PROMPT] if command == "generate" else ["info", missing]
    code, out, err = cli(capsys, *argv)
    assert_one_line_error(code, err, "no such model folder", str(missing), exit_code=1)
    assert out == ""


def test_folder_without_config(tmp_path, capsys):
    code, out, err = cli(capsys, "generate", "-m", tmp_path, PROMPT, "--max-new-tokens", "2")
    assert_one_line_error(code, err, "config.json", exit_code=1)
    assert out == ""


def test_truncated_safetensors(folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    for argv in (["info", broken], ["generate", "-m", broken, PROMPT, "--max-new-tokens", "2"]):
        code, out, err = cli(capsys, *argv)
        assert_one_line_error(code, err, "truncated", "model.safetensors", exit_code=1)
        assert out == ""


def test_unknown_dtype_is_a_usage_error(folder, capsys):
    code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--dtype", "float8")
    assert_one_line_error(code, err, "float8", "--dtype", exit_code=2)


def test_empty_prompt_argument(folder, capsys):
    code, out, err = cli(capsys, "generate", "-m", folder, "")
    assert_one_line_error(code, err, "prompt is empty", exit_code=1)
    assert out == ""


@pytest.mark.parametrize("dash", [False, True], ids=["omitted", "dash"])
def test_whitespace_only_stdin(folder, capsys, monkeypatch, dash):
    set_stdin(monkeypatch, "  \n\t \n")
    code, out, err = cli(capsys, "generate", "-m", folder, *(["-"] if dash else []))
    assert_one_line_error(code, err, "prompt is empty", exit_code=1)
    assert out == ""


def test_negative_max_new_tokens(folder, capsys):
    code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--max-new-tokens", "-1")
    assert_one_line_error(code, err, "--max-new-tokens", ">= 0", exit_code=2)


def test_zero_temperature(folder, capsys):
    code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--do-sample", "--temperature", "0")
    assert_one_line_error(code, err, "--temperature", "> 0")


def test_top_p_above_one(folder, capsys):
    code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--do-sample", "--top-p", "2")
    assert_one_line_error(code, err, "top_p")
    assert out == ""


def test_overflowing_context(folder, capsys):
    code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--max-new-tokens", "600")
    assert_one_line_error(code, err, "context", "512", exit_code=1)
    assert out == ""


def test_overflowing_context_when_streaming(folder, capsys):
    code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--max-new-tokens", "600", "--stream")
    assert_one_line_error(code, err, "context", "512", exit_code=1)
    assert out == ""


def test_prompt_that_is_not_utf8(folder, capsys):
    code, out, err = cli(capsys, "generate", "-m", folder, "\udcff\udcfe hello", "--max-new-tokens", "2")
    assert_one_line_error(code, err, exit_code=1)
    assert "internal error" not in err


def test_seed_out_of_range(folder, capsys):
    code, out, err = cli(capsys, "generate", "-m", folder, PROMPT, "--do-sample", "--seed", str(2**70))
    assert_one_line_error(code, err, "seed")
    assert "internal error" not in err


def test_default_model_generates_offline(capsys):
    assert (DEFAULT_MODEL_DIR / "config.json").exists()
    code, out, err = cli(capsys, "generate", "KING.", "--max-new-tokens", "12", "--seed", "3", "--no-stream")
    assert code == 0 and err == "" and out.startswith("KING.") and len(out) > len("KING.\n")
    again = cli(capsys, "generate", "KING.", "--max-new-tokens", "12", "--seed", "3", "--no-stream")[1]
    assert again == out  # the bundled generation defaults sample, reproducibly with a seed
    lm = neolm.load()
    assert lm.generation_defaults["do_sample"] is True
    assert out.rstrip("\n") == "KING." + lm.generate("KING.", max_new_tokens=12, seed=3)


def test_no_model_and_no_default_model(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(neolm.api, "DEFAULT_MODEL_DIR", tmp_path / "none")
    code, out, err = cli(capsys, "generate", PROMPT, "--max-new-tokens", "2")
    assert_one_line_error(code, err, "default model", exit_code=1)
    assert "does not ship a default model yet" in err
    assert out == ""


def test_unknown_subcommand(capsys):
    code, out, err = cli(capsys, "frobnicate")
    assert_one_line_error(code, err, "frobnicate", exit_code=2)


def test_no_subcommand_prints_help(capsys):
    code, out, err = cli(capsys)
    assert code == 2
    assert out.startswith("usage: neolm")
    assert "generate" in out and "info" in out
    assert "Traceback" not in err


# --- the installed console script ------------------------------------------------------------------------


def console_script() -> str:
    here = Path(sys.executable).with_name("neolm")
    found = str(here) if here.exists() else shutil.which("neolm")
    if not found:
        pytest.skip("the neolm console script is not installed (pip install -e .)")
    return found


def run_script(*argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run(
        [console_script(), *map(str, argv)], capture_output=True, text=True, encoding="utf-8", env=env,
        stdin=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip


def test_console_script_bad_input(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = run_script("generate", "--model", missing, PROMPT)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("neolm generate: error: no such model folder")
    assert proc.stdout == ""


def test_console_script_good_input(folder, lm):
    proc = run_script("generate", "--model", folder, PROMPT, "--max-new-tokens", "5", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == PROMPT + lm.generate(PROMPT, max_new_tokens=5) + "\n"
