"""`neolm eval` (lm-evaluation-harness tasks on neolm's backend), `neolm perplexity` (rolling perplexity) and
`neolm score` (each token's log-probability in a text, and the forward pass's hidden states and attention) and
`neolm watermark` (whether a text carries a green-list watermark)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

from neolm.cli import MODEL_HELP, WATERMARK_HELP, _add_model_args, _read_prompt, load_model, non_negative, seed_type
from neolm.errors import NeolmError

MODEL_ARG_HELP = MODEL_HELP + ", or 'default' for neolm's bundled model"


def register(sub) -> dict:
    e = sub.add_parser(
        "eval",
        help="score a model on lm-evaluation-harness tasks",
        description="Run lm-evaluation-harness tasks (zero-shot by default, as the model cards report them) on "
        "neolm's harness backend; print a table of task, metric, value and stderr, and write the harness's JSON "
        "results. Tasks load from the Hugging Face hub as the harness does, or with --data-dir from local JSONL "
        "files DIR/<task>_<split>.jsonl (offline: lambada_openai_test, hellaswag_validation, piqa_validation, "
        "winogrande_validation, arc_easy_test, arc_challenge_test, sciq_test, wikitext_test). --text adds a "
        "rolling perplexity over text files (word/byte perplexity, bits per byte). Needs `pip install 'neolm[eval]'`.",
    )
    _add_model_args(e, required=True)
    _model_help(e)
    e.add_argument("--tasks", default="", help="comma-separated task names, e.g. lambada_openai,hellaswag")
    e.add_argument("--data-dir", help="read tasks from DIR/<task>_<split>.jsonl instead of the hub")
    e.add_argument("--text", nargs="+", metavar="FILE", help="also score the rolling perplexity of these text files")
    e.add_argument("--batch-size", type=non_negative, default=8, help="sequences per forward pass (default 8)")
    e.add_argument("--max-length", type=non_negative, help="context the model may read (default: the model's)")
    e.add_argument("--limit", type=float, help="score only the first N documents of each task (or a fraction < 1)")
    e.add_argument("--num-fewshot", type=non_negative, help="few-shot examples (default: the task's, usually 0)")
    e.add_argument("--seed", type=seed_type, default=0, help="seed for few-shot sampling and generation")
    e.add_argument("--bootstrap-iters", type=non_negative, default=100000, help="bootstrap resamples for stderr")
    e.add_argument("--output", default="eval_results.json", help="where to write the JSON results")
    e.add_argument("--no-share-context", action="store_true", help="score each answer with its own context pass")
    e.add_argument("--revisions", metavar="R1,R2,...",
                   help="evaluate each of these hub revisions in turn (Pythia's training checkpoints: "
                   "step1000,step2000,...): one table with a column per revision, and --output holds every "
                   "revision's results (--mmap loads each faster)")  # fmt: skip

    p = sub.add_parser(
        "perplexity",
        help="rolling-window perplexity of text files",
        description="Rolling-window perplexity of each FILE as one document, with lm-evaluation-harness's windows "
        "(the first conditioned on the end-of-text token, later ones predicting disjoint chunks with the most "
        "context that fits). Prints token, word and byte perplexity, bits per byte and tokens/s.",
    )
    _add_model_args(p, required=True)
    _model_help(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files")
    p.add_argument("--batch-size", type=non_negative, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--max-length", type=non_negative, help="window length (default: the model's context)")
    p.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser(
        "score",
        help="each token's log-probability in a text",
        description="Score a text token by token: each token's log-probability under the model, its rank among the "
        "model's predictions and the likeliest alternatives, then the text's total, mean and perplexity. The "
        "text comes from the argument, or from standard input when it is omitted or '-', and must fit the "
        "context (`neolm perplexity` scores longer files). --save writes the forward pass (hidden states of every "
        "layer; with --attentions every head's attention weights) for analysis elsewhere.",
    )
    s.add_argument("prompt", nargs="?", metavar="TEXT", help="the text ('-' or omitted: read standard input)")
    _add_model_args(s, positional=False)
    s.add_argument("--top", type=non_negative, default=3, metavar="K", help="alternatives shown per token (default 3)")
    s.add_argument("--prefix-eos", action="store_true",
                   help="read the text after <|endoftext|>, so that its first token is scored too (as "
                   "lm-evaluation-harness's rolling perplexity does)")  # fmt: skip
    s.add_argument("--json", action="store_true", help="print JSON: a record per token and the summary")
    s.add_argument("--save", metavar="FILE",
                   help="write a safetensors file: tokens, token_logprobs and hidden_states.0 .. hidden_states.L "
                   "(the embeddings, each block's output, the last after the final LayerNorm; (T, C) each)")  # fmt: skip
    s.add_argument("--attentions", action="store_true",
                   help="with --save: attentions.0 .. attentions.L-1 too, each layer's (heads, T, T) weights")  # fmt: skip
    s.add_argument("--revisions", metavar="R1,R2,...",
                   help="score the text under each of these hub revisions (Pythia's training checkpoints: "
                   "step1000,step8000,...): a log-probability column per revision, and each one's summary")  # fmt: skip

    w = sub.add_parser(
        "watermark",
        help="test a text for a green-list or SynthID watermark",
        description="Test a text for the green-list watermark that `neolm generate --watermark` (or transformers' "
        "watermarking_config) writes: count its tokens that fall in the green list of the tokens before them, "
        "and how unlikely that many are by chance (a z-score; above --z-threshold: watermarked). With SynthID's "
        "settings (keys given), the mean of the text's g-values (0.5 by chance) and its z-score. Only the "
        "model's tokenizer and vocabulary size are read (no weights). Give the generated text without its prompt, "
        "and the same --watermark-config it was written with. The text comes from the argument, or from "
        "standard input when it is omitted or '-'.",
    )
    w.add_argument("prompt", nargs="?", metavar="TEXT", help="the text ('-' or omitted: read standard input)")
    w.add_argument("-m", "--model", help=MODEL_HELP + " (default: neolm's bundled model)")
    w.add_argument("--revision", help="hub branch, tag or commit")
    w.add_argument("--watermark-config", default="", metavar="KEY=VALUE,...", help=WATERMARK_HELP)
    w.add_argument("--z-threshold", type=float, default=3.0, metavar="Z",
                   help="the z-score above which the text counts as watermarked (default 3: a 0.13%% chance of "
                   "a false alarm per text)")  # fmt: skip
    w.add_argument("--ignore-repeated-ngrams", action="store_true",
                   help="count each distinct (context, token) once, so that repeated phrases do not sway the test (SynthID: "
                   "always)")  # fmt: skip
    w.add_argument("--json", action="store_true", help="print JSON")
    return {"eval": cmd_eval, "perplexity": cmd_perplexity, "score": cmd_score, "watermark": cmd_watermark}


def _model_help(parser) -> None:
    for action in parser._actions:
        if action.dest == "model":
            action.help = MODEL_ARG_HELP


def _load(args):
    if args.model == "default" and not Path("default").exists():
        args.model = None  # neolm's bundled model
    return load_model(args)


def _max_length(args, lm) -> int:
    n_ctx = lm.config.n_positions
    if args.max_length is not None and not 1 <= args.max_length <= n_ctx:
        raise NeolmError(f"--max-length must be between 1 and the model's context of {n_ctx}, got {args.max_length}")
    return args.max_length or n_ctx


def _read_texts(files) -> list[str]:
    texts = []
    for f in map(Path, files):
        if not f.is_file():
            raise NeolmError(f"text file {f} not found")
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise NeolmError(f"text file {f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return texts


def cmd_perplexity(args) -> int:
    from tqdm import tqdm

    from neolm.eval.perplexity import perplexity

    if args.batch_size < 1:
        raise NeolmError("--batch-size must be at least 1")
    texts = _read_texts(args.files)
    lm = _load(args)
    max_len = _max_length(args, lm)
    total = sum(len(lm.encode(t)) for t in texts)
    if not total:
        raise NeolmError("the files hold no text to score")
    with tqdm(total=total, unit="tok", desc="perplexity", disable=not sys.stderr.isatty() or args.json) as bar:
        result = perplexity(lm.model, lm.encode, texts, lm.tokenizer.eos_token_id, max_len, args.batch_size, bar.update)
    out = {"model": lm.source, "files": [str(f) for f in args.files], "max_length": max_len, **result.as_dict()}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{len(texts)} file(s), {result.tokens:,} tokens, {result.words:,} words, {result.bytes:,} bytes "
          f"(window {max_len} tokens)")  # fmt: skip
    print(f"token perplexity  {result.token_perplexity:.4f}")
    print(f"word perplexity   {result.word_perplexity:.4f}")
    print(f"byte perplexity   {result.byte_perplexity:.4f}")
    print(f"bits per byte     {result.bits_per_byte:.4f}")
    print(f"{out['tokens_per_second']:,.0f} tokens/s ({result.seconds:.1f}s)")
    return 0


def cmd_score(args) -> int:
    text = _read_prompt(args, "text")
    if args.attentions and not args.save:
        raise NeolmError("--attentions is written by --save FILE")
    if args.save and not Path(args.save).resolve().parent.is_dir():
        raise NeolmError(f"cannot write {args.save}: its folder does not exist")
    revisions = _revisions(args)
    if revisions != [None]:
        if args.save:
            raise NeolmError("--save writes one model's forward pass: not with --revisions")
        return _score_revisions(args, text, revisions)
    lm = load_model(args)
    ids = _score_ids(lm, text, args.prefix_eos)
    trace = lm.trace_ids([ids], output_hidden_states=bool(args.save), output_attentions=args.attentions)[0]
    if args.save:
        _save_trace(trace, args.save)
    logprobs, ranks = trace.token_logprobs.tolist(), trace.ranks().tolist()
    top_ids, top_lp = (t.tolist() for t in trace.top(args.top)) if args.top else ([[]] * len(ranks), [[]] * len(ranks))

    def piece(token: int) -> str:
        return lm.decode([token])

    total = sum(logprobs)
    summary = {"model": lm.source, "tokens_scored": len(logprobs), "total_logprob": total,
               "mean_logprob": total / len(logprobs), "perplexity": math.exp(-total / len(logprobs)),
               "bits": -total / math.log(2)}  # fmt: skip
    if args.json:
        records = [{"position": t + 1, "id": ids[t + 1], "token": piece(ids[t + 1]), "logprob": logprobs[t],
                    "rank": ranks[t], "top": [[piece(i), lp] for i, lp in zip(top_ids[t], top_lp[t])]}
                   for t in range(len(logprobs))]  # fmt: skip
        print(json.dumps({"tokens": records, "summary": summary}, indent=2, ensure_ascii=False))
        return 0
    print(f"{'pos':>5}  {'token':<16} {'logprob':>8} {'rank':>6}" + ("  likeliest" if args.top else ""))
    print(
        f"{0:>5}  {json.dumps(piece(ids[0]), ensure_ascii=False):<16} {'-':>8} {'-':>6}  (the first token: no context)"
    )
    for t in range(len(logprobs)):
        alternatives = "  ".join(
            f"{json.dumps(piece(i), ensure_ascii=False)} {lp:.2f}" for i, lp in zip(top_ids[t], top_lp[t])
        )
        token = json.dumps(piece(ids[t + 1]), ensure_ascii=False)
        print(f"{t + 1:>5}  {token:<16} {logprobs[t]:>8.3f} {ranks[t]:>6}  {alternatives}".rstrip())
    print(f"{len(logprobs)} tokens scored: total log-probability {total:.3f} ({summary['bits']:.1f} bits), "
          f"mean {summary['mean_logprob']:.4f}, perplexity {summary['perplexity']:.4f}")  # fmt: skip
    if args.save:
        print(f"saved the forward pass to {args.save}")
    return 0


def cmd_watermark(args) -> int:
    from neolm import checkpoint, hub
    from neolm.api import _default_model
    from neolm.config import Config
    from neolm.tokenizer import load_tokenizer
    from neolm.watermark import SynthIDConfig, detect_tokens, parse_settings

    text = _read_prompt(args, "text")
    settings = parse_settings(args.watermark_config)
    folder = _default_model() if args.model is None else hub.resolve(args.model, args.revision, weights=False)
    config = Config.from_hf(checkpoint.read_hf_config(folder), source=str(folder / "config.json"))
    ids = load_tokenizer(folder, default=config.tokenizer).encode(text)
    synthid = isinstance(settings, SynthIDConfig)
    # (without the flag, the kind's default: each n-gram as often as it comes; SynthID: each context once)
    found = detect_tokens(ids, settings, config, args.z_threshold, args.ignore_repeated_ngrams or None)
    if args.json:
        print(json.dumps(dataclasses.asdict(found) | {"z_threshold": args.z_threshold}, indent=2))
        return 0
    if synthid:
        print(f"n-grams scored: {found.num_tokens_scored} (each context once)")
        print(f"mean g-value:   {found.mean_g_value:.3f} (0.5 expected by chance)")
        print(f"z-score:        {found.z_score:.2f}")
        print(f"p-value:        {found.p_value:.3g}")
        print(f"watermarked:    {'yes' if found.prediction else 'no'} (z {'>' if found.prediction else '<='} "
              f"{args.z_threshold:g})")  # fmt: skip
        return 0
    ratio = settings.greenlist_ratio
    print(f"tokens scored: {found.num_tokens_scored}")
    print(f"green tokens:  {found.num_green_tokens} ({found.green_fraction:.1%}; {ratio:.1%} expected by chance)")
    print(f"z-score:       {found.z_score:.2f}")
    print(f"p-value:       {found.p_value:.3g}")
    print(f"watermarked:   {'yes' if found.prediction else 'no'} (z {'>' if found.prediction else '<='} "
          f"{args.z_threshold:g})")  # fmt: skip
    return 0


def _score_ids(lm, text: str, prefix_eos: bool) -> list[int]:
    """The text's tokens for `neolm score` (after <|endoftext|> with prefix_eos), checked against the model."""
    ids = lm.encode(text)
    if prefix_eos:
        if lm.tokenizer.eos_token_id is None:
            raise NeolmError("--prefix-eos: this tokenizer has no <|endoftext|> token")
        ids = [lm.tokenizer.eos_token_id] + ids
    if len(ids) < 2:
        raise NeolmError("the text is one token: give more text, or --prefix-eos to score its first token")
    if len(ids) > lm.config.n_positions:
        raise NeolmError(f"the text is {len(ids):,} tokens, more than the model's context of {lm.config.n_positions:,}; "
                         "`neolm perplexity FILE` scores long texts in windows")  # fmt: skip
    return ids


def _score_revisions(args, text: str, revisions: list[str]) -> int:
    """`neolm score --revisions`: the text's tokens' log-probabilities under each revision, side by side."""
    columns, summaries, ids, tokenizer = {}, {}, None, None
    for revision in revisions:
        args.revision = revision
        lm = load_model(args)
        mine = _score_ids(lm, text, args.prefix_eos)
        if ids is not None and mine != ids:
            raise NeolmError(f"revision {revision} has another tokenizer: its tokens differ from {revisions[0]}'s")
        ids = mine
        logprobs = lm.trace_ids([ids], output_logits=False)[0].token_logprobs.tolist()
        total = sum(logprobs)
        columns[revision] = logprobs
        summaries[revision] = {"total_logprob": total, "mean_logprob": total / len(logprobs),
                               "perplexity": math.exp(-total / len(logprobs)), "bits": -total / math.log(2)}  # fmt: skip
        tokenizer, lm = lm.tokenizer, None  # (these weights go before the next revision's load)

    def piece(token: int) -> str:
        return tokenizer.decode([token])

    if args.json:
        records = [{"position": t + 1, "id": ids[t + 1], "token": piece(ids[t + 1]),
                    "logprob": {r: columns[r][t] for r in revisions}} for t in range(len(ids) - 1)]  # fmt: skip
        print(json.dumps({"tokens": records, "summary": summaries}, indent=2, ensure_ascii=False))
        return 0
    width = max(10, *(len(r) for r in revisions))
    print(f"{'pos':>5}  {'token':<16} " + " ".join(f"{r:>{width}}" for r in revisions))
    for t in range(len(ids) - 1):
        token = json.dumps(piece(ids[t + 1]), ensure_ascii=False)
        print(f"{t + 1:>5}  {token:<16} " + " ".join(f"{columns[r][t]:>{width}.3f}" for r in revisions))
    for r in revisions:
        print(
            f"{r}: mean log-probability {summaries[r]['mean_logprob']:.4f}, perplexity {summaries[r]['perplexity']:.4f}"
        )
    return 0


def _save_trace(trace, path: str) -> None:
    """The trace's tensors in a safetensors file (written whole, then renamed into place)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {"tokens": torch.tensor(trace.tokens), "token_logprobs": trace.token_logprobs}
    for i, h in enumerate(trace.hidden_states or ()):
        tensors[f"hidden_states.{i}"] = h
    for i, a in enumerate(trace.attentions or ()):
        tensors[f"attentions.{i}"] = a
    out = Path(path)
    partial = out.with_name(out.name + ".partial")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, partial)
    except (OSError, SafetensorError) as e:
        raise NeolmError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from None
    partial.replace(out)


def results_table(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) rows from the harness's results, in task order."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append((metrics.get("alias", task), metric, float(value),
                         float(stderr) if isinstance(stderr, (int, float)) else None))  # fmt: skip
    return rows


def format_table(rows) -> str:
    lines = ["| Task | Metric | Value | Stderr |", "| --- | --- | ---: | ---: |"]
    for task, metric, value, stderr in rows:
        err = "" if stderr is None or math.isnan(stderr) else f"{stderr:.4f}"
        lines.append(f"| {task} | {metric} | {value:.4f} | {err} |")
    return "\n".join(lines)


def format_sweep(tables: dict[str, list]) -> str:
    """One row per (task, metric), one column per revision: value (± stderr)."""
    revisions = list(tables)
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for revision, table in tables.items():
        for task, metric, value, stderr in table:
            err = "" if stderr is None or math.isnan(stderr) else f" ± {stderr:.4f}"
            rows.setdefault((task, metric), {})[revision] = f"{value:.4f}{err}"
    lines = ["| Task | Metric | " + " | ".join(revisions) + " |", "| --- | --- |" + " ---: |" * len(revisions)]
    for (task, metric), cells in rows.items():
        lines.append(f"| {task} | {metric} | " + " | ".join(cells.get(r, "") for r in revisions) + " |")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError:
        raise NeolmError("neolm eval needs lm-evaluation-harness: pip install 'neolm[eval]'") from None
    from neolm.eval import tasks

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names and not args.text:
        raise NeolmError("no tasks: pass --tasks (e.g. lambada_openai,hellaswag) and/or --text FILE...")
    if args.batch_size < 1:
        raise NeolmError("--batch-size must be at least 1")
    _revisions(args)  # (checked before the tasks load)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise NeolmError(f"--data-dir {args.data_dir} is not a folder")
    for name in ("lm_eval", "datasets", "huggingface_hub"):  # their notes and retries; errors come as ours
        logging.getLogger(name).setLevel(logging.INFO if args.verbose else logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="neolm-eval-") as tmp:
        manager = tasks.task_manager()
        specs = tasks.build(names, args.data_dir, args.text, Path(tmp), manager=manager)
        try:
            loaded = manager.load(specs)
        except NeolmError:
            raise
        except Exception as e:  # noqa: BLE001  (the datasets library: no network, a bad file, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = "" if args.data_dir else "; offline, pass --data-dir DIR with <task>_<split>.jsonl files"
            raise NeolmError(f"could not load the task data: {first}{hint}") from None
        revisions = _revisions(args)
        runs = {}
        for revision in revisions:
            if revision is not None:
                args.revision = revision
                print(f"neolm eval: revision {revision}", file=sys.stderr, flush=True)
            runs[revision] = _evaluate(args, lm_eval, manager, loaded)
    if revisions == [None]:
        results = runs[None]
        Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(format_table(results_table(results)))
        n = results["neolm"]
        print(f"\n{n['requests']:,} requests, {n['tokens']:,} scored tokens in {n['seconds']:.1f}s "
              f"({n['requests_per_second']:.1f} requests/s, {n['tokens_per_second']:,.0f} tokens/s); results in "
              f"{args.output}")  # fmt: skip
        return 0
    Path(args.output).write_text(json.dumps({"revisions": runs}, indent=2, default=str) + "\n")
    print(format_sweep({rev: results_table(results) for rev, results in runs.items()}))
    seconds = sum(results["neolm"]["wall_seconds"] for results in runs.values())
    print(f"\n{len(runs)} revisions in {seconds:.1f}s; results in {args.output}")
    return 0


def _revisions(args) -> list[str | None]:
    """The revisions to evaluate: --revisions' list, else [None] (the one model as given)."""
    if not args.revisions:
        return [None]
    if args.revision:
        raise NeolmError("give --revision or --revisions, not both")
    revisions = [r.strip() for r in args.revisions.split(",") if r.strip()]
    if not revisions or len(set(revisions)) != len(revisions):
        raise NeolmError(f"--revisions must list distinct revisions, got {args.revisions!r}")
    return revisions


def _evaluate(args, lm_eval, manager, loaded) -> dict:
    """The harness's results for the model (at args.revision), with neolm's speed figures."""
    from neolm.eval.harness import NeolmLM

    lm = _load(args)
    backend = NeolmLM(lm=lm, batch_size=args.batch_size, max_length=_max_length(args, lm),
                      share_context=not args.no_share_context)  # fmt: skip
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the harness prints progress notes; stdout is the table
        results = lm_eval.simple_evaluate(
            model=backend, tasks=list(loaded["tasks"].values()), task_manager=manager, limit=args.limit,
            num_fewshot=args.num_fewshot, bootstrap_iters=args.bootstrap_iters, log_samples=False,
            random_seed=args.seed,
            numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    stats = backend.stats
    results["config"]["model"] = lm.source
    results["config"]["model_revision"] = args.revision or ""
    results["neolm"] = {**stats, "requests_per_second": stats["requests"] / max(stats["seconds"], 1e-9),
                        "tokens_per_second": stats["tokens"] / max(stats["seconds"], 1e-9),
                        "wall_seconds": seconds, "batch_size": args.batch_size}  # fmt: skip
    results.pop("samples", None)  # per-document records: tens of MB for a full task
    return results
