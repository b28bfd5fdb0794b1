"""Task configs for `neolm eval`: the harness's own task definitions, with data from local files when asked.

With a data folder, each task below reads `DIR/<task>_<split>.jsonl` (one document a line, the fields
of the Hugging Face dataset the harness uses) through the `json` dataset builder, keeping the harness's
prompts, answer choices and metrics. A rolling perplexity over plain text files is a task built here
on the harness's wikitext metrics (word perplexity, byte perplexity, bits per byte).

Only the harness backend and the CLI import this module; it imports lm_eval lazily.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from neolm.errors import NeolmError

# task -> (split the harness scores, fields of one line)
LOCAL_TASKS = {
    "lambada_openai": ("test", "text"),
    "hellaswag": ("validation", "activity_label, ctx_a, ctx_b, endings, label"),
    "piqa": ("validation", "goal, sol1, sol2, label"),
    "winogrande": ("validation", "sentence, option1, option2, answer"),
    "arc_easy": ("test", "question, choices {text, label}, answerKey"),
    "arc_challenge": ("test", "question, choices {text, label}, answerKey"),
    "sciq": ("test", "support, question, distractor1-3, correct_answer"),
    "wikitext": ("test", "page"),
}
TEXT_TASK = "text_perplexity"


def data_file(task: str, data_dir: str | Path) -> Path:
    split = LOCAL_TASKS[task][0]
    return Path(data_dir) / f"{task}_{split}.jsonl"


def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _harness_config(manager, task: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[task]
    return load_yaml(entry.yaml_path, resolve_func=True)


def check_names(names: list[str], manager, data_dir) -> None:
    """Unknown names raise, listing the tasks that run offline and the closest harness names."""
    for name in names:
        if data_dir is not None and name not in LOCAL_TASKS:
            raise NeolmError(
                f"unknown offline task {name!r}; tasks that load from --data-dir: {', '.join(LOCAL_TASKS)}"
            )
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5)
            raise NeolmError(
                f"unknown task {name!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f"; known offline (with --data-dir): {', '.join(LOCAL_TASKS)}; all {len(manager.all_tasks)} "
                "harness tasks: lm-eval ls tasks"
            )


def local_config(manager, task: str, data_dir: str | Path) -> dict:
    """The harness's config for `task`, reading its scored split from DIR/<task>_<split>.jsonl."""
    path = data_file(task, data_dir)
    if not path.is_file():
        split, fields = LOCAL_TASKS[task]
        raise NeolmError(f"{task}: data file {path} not found (one JSON object a line with fields {fields})")
    split = LOCAL_TASKS[task][0]
    cfg = _harness_config(manager, task)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(path.resolve())}})
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        cfg.pop(key, None)
    cfg[f"{split}_split"] = split
    return cfg


def text_config(manager, files: list[str | Path], cache_dir: Path) -> dict:
    """A rolling-perplexity task over text files (one document each), with the wikitext task's metrics."""
    docs = []
    for f in map(Path, files):
        if not f.is_file():
            raise NeolmError(f"text file {f} not found")
        try:
            docs.append({"page": f.read_text(encoding="utf-8"), "file": str(f)})
        except UnicodeDecodeError as e:
            raise NeolmError(f"text file {f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    jsonl = cache_dir / "text_perplexity_test.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    cfg = _harness_config(manager, "wikitext")
    cfg.update(task=TEXT_TASK, dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": {"test": str(jsonl)}}, doc_to_target="page")  # fmt: skip
    for key in ("training_split", "validation_split", "fewshot_split"):
        cfg.pop(key, None)
    cfg["test_split"] = "test"
    cfg.pop("doc_to_decontamination_query", None)
    cfg["should_decontaminate"] = False
    return cfg


def build(names: list[str], data_dir=None, text_files=None, cache_dir: Path | None = None, manager=None) -> list:
    """Task specs for lm_eval.simple_evaluate: names (from the hub), or configs reading local files."""
    manager = manager or task_manager()
    check_names(names, manager, data_dir)
    specs: list = [local_config(manager, n, data_dir) if data_dir is not None else n for n in names]
    if text_files:
        specs.append(text_config(manager, text_files, cache_dir or Path(".neolm-eval")))
    return specs
